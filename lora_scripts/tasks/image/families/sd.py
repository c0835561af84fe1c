"""Stable Diffusion 1.x / 2.x: a UNet conditioned on one CLIP text encoder's last hidden state, DDPM training
(epsilon or v-prediction, from the scheduler). :class:`UNetFamily` is shared with SDXL (``sdxl.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from ....errors import ConfigError
from ..objectives import DDPMObjective
from .base import Components, Family, first_line


class UNetFamily(Family):
    """The UNet families (SD 1.x, 2.x, SDXL): diffusers folders, hub ids and A1111-style single files."""

    denoiser_name = "unet"
    denoiser_class = "UNet2DConditionModel"
    default_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]
    text_encoder_lora = (0,)
    lora_loader_parts = ("unet", "text_encoder")
    native_resolution = 512
    ldm_name: ClassVar[str] = ""  # the single-file family name in models/single_file.py
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"

    @classmethod
    def matches_model_index(cls, model_index: Mapping[str, Any]) -> bool:
        return False  # told apart by the UNet config (see families.detect_folder)

    @classmethod
    def matches_unet_config(cls, unet_config: Mapping[str, Any]) -> bool:
        raise NotImplementedError

    def check_single_file(self, path: Path) -> None:
        from ....models.single_file import check_single_file

        found = check_single_file(path, self.cfg.base_model_config)
        if found != self.ldm_name:
            from . import family_class

            raise ConfigError(f"model_family: '{path}' holds {family_class(found).title} weights, not "
                              f"{self.title}; set model_family: {found} or remove model_family")

    # --- loading -------------------------------------------------------------------------------------------------
    def _encoder_classes(self) -> list[tuple[str, Any]]:
        from transformers import CLIPTextModel

        return [("text_encoder", CLIPTextModel)]

    def load(self, base_model: str) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTokenizer

        if _is_single_file(base_model):
            from ....models.single_file import load_single_file

            parts = load_single_file(base_model, self.cfg.base_model_config, torch_dtype=self.load_dtype)
            names = [name for name, _ in self._encoder_classes()]
            return Components(denoiser=parts["unet"], vae=parts["vae"],
                              scheduler=DDPMScheduler.from_config(parts["scheduler"].config),
                              text_encoders=[parts[name] for name in names],
                              tokenizers=[parts[name.replace("text_encoder", "tokenizer")] for name in names])
        try:
            encoders = self._encoder_classes()
            return Components(
                denoiser=UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", torch_dtype=self.load_dtype),
                vae=AutoencoderKL.from_pretrained(base_model, subfolder="vae", torch_dtype=self.load_dtype),
                scheduler=DDPMScheduler.from_pretrained(base_model, subfolder="scheduler"),
                text_encoders=[cls.from_pretrained(base_model, subfolder=name, dtype=self.load_dtype) for name, cls in encoders],
                tokenizers=[CLIPTokenizer.from_pretrained(base_model, subfolder=name.replace("text_encoder", "tokenizer"))
                            for name, _ in encoders],
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"base_model: could not load '{base_model}': {first_line(exc)}") from None

    def meta_components(self, base_model: str) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig

        try:
            if _is_single_file(base_model):
                from ....models.single_file import load_single_file_configs

                configs = load_single_file_configs(base_model, self.cfg.base_model_config)
                unet_config, vae_config = configs["unet"], configs["vae"]
                te_configs = [configs[name] for name, _ in self._encoder_classes()]
                scheduler = DDPMScheduler.from_config(configs["scheduler"])
            else:
                unet_config = UNet2DConditionModel.load_config(base_model, subfolder="unet")
                vae_config = AutoencoderKL.load_config(base_model, subfolder="vae")
                te_configs = [CLIPTextConfig.from_pretrained(base_model, subfolder=name)
                              for name, _ in self._encoder_classes()]
                scheduler = DDPMScheduler.from_pretrained(base_model, subfolder="scheduler")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"base_model: could not read the configs of '{base_model}': {first_line(exc)}") from None
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
            vae = AutoencoderKL.from_config(vae_config)
            encoders = [cls(config) for (_, cls), config in zip(self._encoder_classes(), te_configs)]
        return Components(unet, vae, encoders, [], scheduler, extra={"text_configs": te_configs})

    # --- prompts -------------------------------------------------------------------------------------------------
    def encode_prompt(self, text_encoders: list[torch.nn.Module], tokens: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        return {"hidden": text_encoders[0](tokens["input_ids"])[0]}

    def meta_conditioning(self, components: Components, batch_size: int) -> dict[str, torch.Tensor]:
        """Zero conditioning tensors of the cached shapes, for the memory estimate."""
        configs = components.extra["text_configs"]
        tokens = configs[0].max_position_embeddings
        return {"hidden": torch.zeros(batch_size, tokens, sum(c.hidden_size for c in configs))}

    # --- objective and denoiser ----------------------------------------------------------------------------------
    def objective(self, scheduler: Any) -> DDPMObjective:
        return DDPMObjective(scheduler, self.cfg)

    def noise(self, objective: DDPMObjective, latents: torch.Tensor, generators: list[torch.Generator]):
        return objective.noise(latents, generators)

    def added_conditioning(self, cond: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Any] | None:
        return None

    def denoise(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dtype = denoiser.dtype
        return denoiser(noisy.to(dtype), timesteps, cond["hidden"].to(dtype),
                        added_cond_kwargs=self.added_conditioning(cond, dtype)).sample

    # --- sampling ------------------------------------------------------------------------------------------------
    def pipeline(self, components: Components, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=components.vae, text_encoder=text_encoders[0], tokenizer=components.tokenizers[0], unet=denoiser,
            scheduler=DDIMScheduler.from_config(components.scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )

    # --- export --------------------------------------------------------------------------------------------------
    def kohya_tensors(self, parts: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float,
                      conv_alpha: float | None, denoiser_config: Any) -> dict[str, torch.Tensor]:
        from ....export.kohya import kohya_state_dict

        return kohya_state_dict(parts, family=self.ldm_name, alpha=alpha, conv_alpha=conv_alpha,
                                unet_config=denoiser_config)

    def version_label(self, prediction_type: str | None) -> str:
        from ....export.kohya import base_model_version

        return base_model_version(self.ldm_name, prediction_type == "v_prediction")


class SD1(UNetFamily):
    name = ldm_name = "sd1"
    title = "SD 1.x"
    pipeline_class = "StableDiffusionPipeline"
    modelspec_architecture = "stable-diffusion-v1/lora"

    @classmethod
    def matches_unet_config(cls, unet_config: Mapping[str, Any]) -> bool:
        return unet_config.get("addition_embed_type") != "text_time" and unet_config.get("cross_attention_dim") != 1024


class SD2(SD1):
    name = ldm_name = "sd2"
    title = "SD 2.x"
    modelspec_architecture = "stable-diffusion-v2-768-v/lora"

    @classmethod
    def matches_unet_config(cls, unet_config: Mapping[str, Any]) -> bool:
        return unet_config.get("addition_embed_type") != "text_time" and unet_config.get("cross_attention_dim") == 1024


def _is_single_file(base_model: str) -> bool:
    from . import is_single_file

    return is_single_file(base_model)


def unet_config_of(folder: Path) -> dict[str, Any] | None:
    """A diffusers folder's ``unet/config.json``, or None."""
    path = folder / "unet" / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

