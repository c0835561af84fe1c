"""The kohya / A1111 / ComfyUI LoRA format: ``lora_unet_<module_path_with_underscores>.lora_down/.lora_up/.alpha``.

Written by hand because ``diffusers.utils.convert_state_dict_to_kohya`` stores ``alpha = rank`` whatever the
training alpha was, which silently rescales the LoRA in every consumer when ``lora_alpha != lora_rank``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save

from ..train.checkpoint import atomic_write_bytes


def peft_to_kohya(state_dict: Mapping[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """Rename a PEFT LoRA state dict (``<module>.lora_A.weight``) to kohya keys with the true ``alpha``."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, sep, kind = key.rpartition(".lora_")
        if not sep or kind not in ("A.weight", "B.weight"):
            raise ValueError(f"not a PEFT LoRA key: {key}")
        base = f"{prefix}_{module.replace('.', '_')}"
        out[f"{base}.lora_down.weight" if kind == "A.weight" else f"{base}.lora_up.weight"] = (
            tensor.detach().to("cpu").contiguous()
        )
        out[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def safetensors_model_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the tensor payload of a safetensors file, without its header (kohya's ``sshs_model_hash``).

    Hashing without the header keeps the hash stable when only the metadata changes.
    """
    blob = save(dict(tensors))
    header_len = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_len :]).hexdigest()


def write_kohya_lora(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a kohya-format LoRA with ``ss_*`` metadata (all values strings) atomically."""
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    meta["sshs_model_hash"] = safetensors_model_hash(tensors)
    atomic_write_bytes(Path(path), save(dict(tensors), metadata=meta))
    return Path(path)


def kohya_metadata(
    *,
    network_dim: int,
    network_alpha: float,
    base_model_version: str,
    base_model: str,
    output_name: str,
    training_started_at: float,
    training_finished_at: float,
    steps: int,
    epoch: int,
    num_train_images: int,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The ``ss_*`` fields A1111, ComfyUI and kohya's tools read to describe a LoRA."""
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(network_dim),
        "ss_network_alpha": _number(network_alpha),
        "ss_base_model_version": base_model_version,
        "ss_v2": str(base_model_version.startswith("sd_v2")),
        "ss_sd_model_name": os.path.basename(str(base_model).rstrip("/")) or str(base_model),
        "ss_output_name": output_name,
        "ss_training_started_at": str(training_started_at),
        "ss_training_finished_at": str(training_finished_at),
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_num_train_images": str(num_train_images),
    }
    meta.update(extra or {})
    return meta


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
