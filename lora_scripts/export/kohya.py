"""The kohya / A1111 / ComfyUI LoRA format: ``lora_unet_<module_path_with_underscores>.lora_down/.lora_up/.alpha``.

Written by hand because ``diffusers.utils.convert_state_dict_to_kohya`` stores ``alpha = rank`` whatever the
training alpha was (which silently rescales the LoRA in every consumer when ``lora_alpha != lora_rank``), names every
UNet by its diffusers path (sd-scripts names SDXL by its LDM blocks) and writes DoRA's magnitude in peft's shape.

Key layout, as sd-scripts writes it (and A1111's ``extensions-builtin/Lora`` and ComfyUI's ``comfy/lora.py`` read):

- SD 1.x / 2.x: ``lora_unet_<diffusers module path>`` (sd-scripts trains these on the diffusers UNet) and
  ``lora_te_text_model_<...>``.
- SDXL: ``lora_unet_<LDM/SGM path>`` (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``, resnets as
  ``in_layers_2``/``out_layers_3``, downsamplers ``input_blocks_N_0_op``), ``lora_te1_text_model_<...>`` (CLIP-L) and
  ``lora_te2_text_model_<...>`` (OpenCLIP-G).
- Per module: ``.lora_down.weight`` (peft ``lora_A``), ``.lora_up.weight`` (``lora_B``), ``.alpha`` (the true alpha:
  a 3x3-conv LoCon module gets ``conv_alpha``), and for DoRA ``.dora_scale``, peft's ``lora_magnitude_vector`` in the
  LyCORIS ``wd_on_output`` layout (its default): ``(out, 1)`` for linear layers, ``(out, 1, 1, 1)`` for convs. peft's
  DoRA normalises per output channel, so this is the only layout that holds it exactly. Consumers: only LyCORIS
  reproduces the trained result. ComfyUI (recent) reads the axis from ``dora_scale.shape[0] == out`` but divides by
  the norm of the base weight instead of the merged one; A1111's Lora extension only knows the input axis
  ``(1, in)``; sd-scripts ignores ``dora_scale``; diffusers' SD/SDXL loaders drop it with a warning
  (:data:`lora_scripts.lora.DORA_WARNING`, printed at export).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from ..train.checkpoint import atomic_write_bytes

FAMILIES = ("sd1", "sd2", "sdxl")
PART_PREFIXES = {
    "sd1": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sd2": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_PEFT_SUFFIXES = {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
                  ".lora_magnitude_vector": "dora_scale", ".lora_magnitude_vector.weight": "dora_scale"}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")


def model_family(unet_config: Mapping[str, Any]) -> str:
    """``sdxl`` (UNet with ``text_time`` added conditioning), ``sd2`` (1024-wide cross-attention) or ``sd1``."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if unet_config.get("cross_attention_dim") == 1024 else "sd1"


def text_encoder_path(module_path: str) -> str:
    """A CLIP text-encoder module path as sd-scripts names it: under ``text_model.`` (transformers 5's
    ``CLIPTextModel`` has no ``text_model`` level; ``CLIPTextModelWithProjection`` and older versions do)."""
    return module_path if module_path.startswith(("text_model.", "text_projection")) else f"text_model.{module_path}"


def kohya_module_name(part: str, module_path: str, *, family: str, unet_config: Mapping[str, Any] | None = None) -> str:
    """The kohya name (without ``.lora_down.weight``) of the module ``module_path`` of ``part`` (``unet``,
    ``text_encoder`` or ``text_encoder_2``), e.g. ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``
    (SD1) or ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` (SDXL: needs ``unet_config``)."""
    _check_family(family)
    prefixes = PART_PREFIXES[family]
    if part not in prefixes:
        raise ValueError(f"a {family} model has no part {part!r} (expected one of {', '.join(prefixes)})")
    if part == "unet":
        if family == "sdxl":
            if unet_config is None:
                raise ValueError("SDXL kohya names use the LDM block layout: pass unet_config (unet.config)")
            from ..models.ldm import unet_module_to_ldm

            module_path = unet_module_to_ldm(module_path, unet_config)
    else:
        module_path = text_encoder_path(module_path)
    return f"{prefixes[part]}_{module_path.replace('.', '_')}"


def split_peft_key(key: str) -> tuple[str, str]:
    """``down_blocks.0...to_q.lora_A.weight`` -> (``down_blocks.0...to_q``, ``lora_down.weight``); the kohya suffix is
    one of ``lora_down.weight``, ``lora_up.weight``, ``dora_scale``. Raises ValueError for other keys."""
    for suffix, kind in _PEFT_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    raise ValueError(f"not a PEFT LoRA key: {key} (expected .lora_A.weight, .lora_B.weight or .lora_magnitude_vector; "
                     "lora_bias and other peft variants have no kohya layout)")


def kohya_dora_scale(magnitude: torch.Tensor) -> torch.Tensor:
    """peft's ``lora_magnitude_vector`` -> kohya/LyCORIS ``dora_scale``: ``(out,)`` -> ``(out, 1)`` for linear layers,
    ``(1, out, 1, 1)`` -> ``(out, 1, 1, 1)`` for convs (both: the norm of each output channel)."""
    if magnitude.dim() == 1:
        return magnitude.reshape(-1, 1)
    return magnitude.reshape(-1, *([1] * (magnitude.dim() - 1)))


def kohya_state_dict(
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    family: str,
    alpha: float,
    conv_alpha: float | None = None,
    unet_config: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The kohya-format tensors of a LoRA, from peft state dicts.

    ``parts`` maps ``"unet"``, ``"text_encoder"`` and (SDXL) ``"text_encoder_2"`` to
    ``peft.utils.get_peft_model_state_dict(module)`` of that module (any part may be missing). ``family`` is ``sd1``,
    ``sd2`` or ``sdxl``; ``unet_config`` (``unet.config``) is needed for SDXL's LDM block names. ``alpha`` is written
    for every module whose ``lora_A`` is a linear layer or 1x1 conv, ``conv_alpha`` (default ``alpha``) for 3x3-conv
    LoCon modules; pass the alphas under the classic ``alpha / rank`` rule (:func:`lora_scripts.lora.effective_alpha`
    for rsLoRA). Tensors are written as float32, detached, on the CPU.
    """
    _check_family(family)
    out: dict[str, torch.Tensor] = {}
    for part, state in parts.items():
        names: dict[str, str] = {}
        for key, tensor in state.items():
            module, kind = split_peft_key(key)
            if module not in names:
                names[module] = kohya_module_name(part, module, family=family, unet_config=unet_config)
            tensor = tensor.detach().to("cpu", torch.float32).contiguous()
            if kind == "dora_scale":
                tensor = kohya_dora_scale(tensor)
            out[f"{names[module]}.{kind}"] = tensor
            if kind == "lora_down.weight":
                is_conv = tensor.dim() == 4 and tuple(tensor.shape[2:]) != (1, 1)
                value = conv_alpha if is_conv and conv_alpha is not None else alpha
                out[f"{names[module]}.alpha"] = torch.tensor(float(value), dtype=torch.float32)
    for key in out:
        if key.endswith(".lora_down.weight") and key.replace(".lora_down.", ".lora_up.") not in out:
            raise ValueError(f"{key} has no matching lora_up (lora_B) tensor")
    return out


def kohya_network_args(*, conv_rank: int | None = None, conv_alpha: float | None = None,
                       use_dora: bool = False) -> dict[str, str]:
    """``ss_network_args`` as sd-scripts records ``--network_args`` (string values): ``conv_dim``/``conv_alpha`` for
    LoCon, and LyCORIS's ``dora_wd`` for DoRA."""
    args: dict[str, str] = {}
    if conv_rank is not None:
        args["conv_dim"] = str(conv_rank)
        args["conv_alpha"] = _number(conv_alpha if conv_alpha is not None else conv_rank)
    if use_dora:
        args["dora_wd"] = "True"
    return args


def base_model_version(family: str, v_prediction: bool = False) -> str:
    """kohya's ``ss_base_model_version``: ``sd_v1``, ``sd_v2`` (``sd_v2_v`` for v-prediction), ``sdxl_base_v1-0``."""
    _check_family(family)
    version = BASE_MODEL_VERSIONS[family]
    return version + "_v" if v_prediction and family != "sdxl" else version


def peft_to_kohya(state_dict: Mapping[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """Rename a PEFT LoRA state dict (``<module>.lora_A.weight``) to kohya keys with the true ``alpha`` (one part,
    diffusers paths: the SD 1.x UNet; :func:`kohya_state_dict` covers every part, SDXL names and variants)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, kind = split_peft_key(key)
        base = f"{prefix}_{module.replace('.', '_')}"
        tensor = tensor.detach().to("cpu").contiguous()
        out[f"{base}.{kind}"] = kohya_dora_scale(tensor) if kind == "dora_scale" else tensor
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
    network_args: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The ``ss_*`` fields A1111, ComfyUI and kohya's tools read to describe a LoRA. ``network_args``
    (:func:`kohya_network_args`) becomes ``ss_network_args`` (JSON), as sd-scripts writes it."""
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
    if network_args:
        meta["ss_network_args"] = json.dumps(dict(network_args))
    meta.update(extra or {})
    return meta


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
