"""What differs between the Stable Diffusion families the image task trains.

SD 1.x / 2.x: one CLIP text encoder whose last hidden state conditions the UNet.
SDXL: two text encoders; the UNet sees their penultimate hidden states side by side, plus "added conditions": the
second encoder's pooled (projected) embedding and six size numbers (original size, crop corner, target size).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.images import Crop
from ..errors import ConfigError
from .base import require_hub_id

SD1, SD2, SDXL = "sd1", "sd2", "sdxl"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP attention, as diffusers' scripts train
SDXL_RESOLUTION = 1024  # the default resolution for SDXL (512 for the others, the config default)


def family_of_folder(folder: Path) -> str:
    """The family of a local diffusers folder, from its UNet config only."""
    from ..export.kohya import model_family

    return model_family(json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8")))


def time_ids(crop: Crop, target_hw: tuple[int, int]) -> torch.Tensor:
    """SDXL's size conditioning: (original h, w, crop top, left, target h, w)."""
    return torch.tensor([*crop.original_hw, *crop.top_left, *target_hw], dtype=torch.float32)


def encode_prompt(text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor], family: str
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states for cross-attention, pooled embedding or None) the way each family's pipeline encodes."""
    if family != SDXL:
        return text_encoders[0](input_ids[0])[0], None
    hidden = []
    pooled = None
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's projected pooled output (``text_embeds``)
    return torch.cat(hidden, dim=-1), pooled


class LoRANetwork(torch.nn.Module):
    """Every module that carries trainable LoRA, as one module: the UNet and, with ``train_text_encoder``, the text
    encoders. The loop wraps this one module for DDP, so text-encoder gradients are synchronised too; the prompt is
    encoded inside ``forward`` when the text encoders train."""

    def __init__(self, unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module], family: str) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoders = torch.nn.ModuleList(text_encoders)
        self.family = family

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, *, input_ids: Sequence[torch.Tensor] | None = None,
                hidden: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids is not None:
            hidden, pooled = encode_prompt(list(self.text_encoders), input_ids, self.family)
        dtype = self.unet.dtype
        added = None
        if self.family == SDXL:
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        return self.unet(noisy.to(dtype), timesteps, hidden.to(dtype), added_cond_kwargs=added).sample


def is_single_file(base_model: str) -> bool:
    """An A1111-style checkpoint file (rather than a diffusers folder or hub id)?"""
    return Path(base_model).expanduser().is_file() or base_model.endswith(SINGLE_FILE_SUFFIXES)


def check_diffusers_model_path(base_model: str) -> Path | None:
    """Return the local folder for ``base_model``, None for a hub id, or raise ConfigError."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        if not (path / "unet" / "config.json").is_file():
            raise ConfigError(
                f"base_model: '{base_model}' is not a diffusers Stable Diffusion folder (no unet/config.json); "
                "expected the layout written by StableDiffusionPipeline.save_pretrained, or a single-file checkpoint"
            )
        return path
    require_hub_id(base_model)
    return None


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v-prediction."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr
