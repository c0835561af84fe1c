"""What Qwen-Image and Z-Image add to :class:`.transformer.TransformerFamily`: single files with or without the
``model.diffusion_model.`` prefix, continuing from a LoRA through the pipeline's own ``lora_state_dict`` converter
rescaled to the run's alpha/rank, and the single-file export naming (``single_file_name``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from ....errors import ConfigError
from .base import first_line

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
                                                     local_files_only=True, torch_dtype=torch.float32)

    # --- continuing from a LoRA ----------------------------------------------------------------------------------
    def apply_network_weights(self, path: Path, modules: Mapping[str, torch.nn.Module]) -> None:
        """Any LoRA the pipeline's ``lora_state_dict`` reads (our two exports, kohya/ComfyUI/ai-toolkit files),
        rescaled to this run's adapter scale and set into the transformer's adapter."""
        import diffusers
        from peft import set_peft_model_state_dict

        path = Path(path).expanduser()
        file = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
        try:
            state, metadata = getattr(diffusers, self.pipeline_class).lora_state_dict(
                str(file), return_lora_metadata=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"network_weights: cannot read '{path}' as a {self.title} LoRA: {first_line(exc)}") from None
        module = modules[self.denoiser_name]
        peft_config = module.peft_config["default"]
        run_scale = peft_config.lora_alpha / peft_config.r
        # diffusers' converters fold kohya alphas into the weights (scale 1); its own format keeps lora_alpha
        prefix = f"{self.denoiser_name}."
        metadata = {k.removeprefix(prefix): v for k, v in (metadata or {}).items()}  # "transformer.lora_alpha"
        file_scale = 1.0
        if metadata.get("lora_alpha") and metadata.get("r"):
            file_scale = float(metadata["lora_alpha"]) / float(metadata["r"])
        ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not ours:
            raise ConfigError(f"network_weights: '{path}' holds no {self.title} transformer LoRA tensors")
        expected = {k.replace(".default", "") for k in _peft_keys(module)}
        missing = sorted(expected - set(ours))
        if missing:
            raise ConfigError(f"network_weights: '{path}' lacks {len(missing)} of the run's LoRA tensors, e.g. "
                              f"{missing[0]}; train with the same target_modules")
        for key, tensor in ours.items():
            if key.endswith("lora_A.weight") and tensor.shape[0] != peft_config.r:
                raise ConfigError(f"network_weights: '{path}' has rank {tensor.shape[0]}, this run lora_rank "
                                  f"{peft_config.r}; set lora_rank: {tensor.shape[0]}")
        scaled = {k: (v * (file_scale / run_scale) if k.endswith("lora_B.weight") else v).float()
                  for k, v in ours.items() if k in expected}
        set_peft_model_state_dict(module, scaled, adapter_name="default")

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


def _peft_keys(module: torch.nn.Module) -> list[str]:
    from peft.utils import get_peft_model_state_dict

    return list(get_peft_model_state_dict(module).keys())
