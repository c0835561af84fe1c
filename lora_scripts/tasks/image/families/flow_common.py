"""What Qwen-Image and Z-Image add to :class:`.transformer.TransformerFamily`: single files with or without the
``model.diffusion_model.`` prefix, and the single-file export naming (``single_file_name``). Continuing from a LoRA
is the base's (``TransformerFamily.apply_network_weights``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch


PREFIX_LDM = "model.diffusion_model."


def strip_prefix(shapes: Mapping[str, Any]) -> dict[str, Any]:
    """Tensor names without ComfyUI's / the original checkpoints' ``model.diffusion_model.`` prefix."""
    return {k[len(PREFIX_LDM):] if k.startswith(PREFIX_LDM) else k: v for k, v in shapes.items()}


class FlowLoRAMixin:
    """Continuation and single-file export naming for :class:`.transformer.TransformerFamily` subclasses."""

    title: ClassVar[str]
    pipeline_class: ClassVar[str]
    denoiser_name: ClassVar[str]

    def load_single_file_denoiser(self, path: Path) -> torch.nn.Module:
        """The transformer from a single file with or without the ``model.diffusion_model.`` prefix (diffusers'
        identity mapping for Qwen-Image does not strip it), through ``from_single_file`` and the config folder."""
        from safetensors.torch import load_file

        state = strip_prefix(load_file(str(path)))
        return self._denoiser_cls().from_single_file(state, config=str(self.config_folder()), subfolder="transformer",
                                                     local_files_only=True, torch_dtype=self.load_dtype)

    # --- export --------------------------------------------------------------------------------------------------
    def kohya_tensors(self, parts: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float,
                      conv_alpha: float | None, denoiser_config: Any) -> dict[str, torch.Tensor]:
        """The transformer's LoRA as ``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` with the
        family's ComfyUI names (:meth:`single_file_name`)."""
        from ....export.kohya import kohya_dora_scale, split_peft_key

        out: dict[str, torch.Tensor] = {}
        for key, tensor in parts[self.denoiser_name].items():
            module, kind = split_peft_key(key)
            name = self.single_file_name(module)
            tensor = tensor.detach().cpu().contiguous()
            out[f"{name}.{kind}"] = kohya_dora_scale(tensor) if kind == "dora_scale" else tensor
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        return out

    def single_file_name(self, module: str) -> str:
        """The single-file key of a transformer module (diffusers path)."""
        raise NotImplementedError

