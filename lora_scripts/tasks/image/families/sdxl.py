"""SDXL: two CLIP text encoders whose penultimate hidden states the UNet sees side by side, plus "added conditions":
the second encoder's pooled (projected) embedding and six size numbers (original size, crop corner, target size)."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from .base import Components
from .sd import UNetFamily


class SDXL(UNetFamily):
    name = ldm_name = "sdxl"
    title = "SDXL"
    pipeline_class = "StableDiffusionXLPipeline"
    native_resolution = 1024
    num_text_encoders = 2
    text_encoder_lora = (0, 1)
    lora_loader_parts = ("unet", "text_encoder", "text_encoder_2")
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    size_keys: ClassVar[tuple[str, ...]] = ("time_ids",)

    @classmethod
    def matches_unet_config(cls, unet_config: Mapping[str, Any]) -> bool:
        return unet_config.get("addition_embed_type") == "text_time"

    def _encoder_classes(self) -> list[tuple[str, Any]]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return [("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)]

    def encode_prompt(self, text_encoders: list[torch.nn.Module], tokens: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        hidden, pooled = encode_sdxl_prompt(text_encoders, [tokens[k] for k in self.token_keys])
        return {"hidden": hidden, "pooled": pooled}

    def meta_conditioning(self, components: Components, batch_size: int) -> dict[str, torch.Tensor]:
        out = super().meta_conditioning(components, batch_size)
        out["pooled"] = torch.zeros(batch_size, components.extra["text_configs"][-1].projection_dim)
        return out

    def size_conditioning(self, crop: Any, target_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """(original h, w, crop top, left, target h, w)."""
        return {"time_ids": torch.tensor([*crop.original_hw, *crop.top_left, *target_hw], dtype=torch.float32)}

    def added_conditioning(self, cond: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
        return {"text_embeds": cond["pooled"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}

    def pipeline(self, components: Components, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]):
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
            tokenizer=components.tokenizers[0], tokenizer_2=components.tokenizers[1], unet=denoiser,
            scheduler=DDIMScheduler.from_config(components.scheduler.config),
        )


def encode_sdxl_prompt(text_encoders: list[torch.nn.Module], input_ids: list[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states for cross-attention, pooled embedding) as StableDiffusionXLPipeline encodes a prompt."""
    hidden = []
    pooled = None
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's projected pooled output (``text_embeds``)
    return torch.cat(hidden, dim=-1), pooled
