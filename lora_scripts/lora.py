"""The peft LoRA settings shared by every task, and what consumers that only read ``alpha`` need to see.

Network variants, all through peft: plain LoRA, rsLoRA (``use_rslora``), DoRA (``use_dora``) and, for the UNet,
LoCon (``conv_rank``/``conv_alpha``: LoRA on the ResNet 3x3 convs too, with their own rank and alpha through peft's
``rank_pattern``/``alpha_pattern``).
"""

from __future__ import annotations

import math
from typing import Any

from .config import TrainConfig

# The UNet's 3x3 convs that kohya's LoCon (sd-scripts ``conv_dim``) adapts: the two convs of every ResnetBlock2D and
# the down/upsampler convs. peft matches list entries as module-name suffixes and pattern keys as ``(.*\.)?KEY$``, so
# these names hit exactly those modules (``conv_in``/``conv_out``/``conv_shortcut`` and the VAE are not matched).
LOCON_TARGET_MODULES = ["conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]


def make_lora_config(cfg: TrainConfig, target_modules: Any, task_type: str | None = None):
    """A peft ``LoraConfig`` from the run's config (rank, alpha, dropout, rsLoRA, DoRA) for ``target_modules``."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, target_modules=target_modules,
        use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, init_lora_weights=True, task_type=task_type,
    )


def make_unet_lora_config(cfg: TrainConfig, target_modules: list[str]):
    """The UNet's ``LoraConfig``: :func:`make_lora_config` on ``target_modules`` plus, when ``conv_rank`` is set,
    LoCon on the ResNet 3x3 convs with rank ``conv_rank`` and alpha ``conv_alpha`` (default ``conv_rank``)."""
    if cfg.conv_rank is None:
        return make_lora_config(cfg, list(target_modules))
    lora_config = make_lora_config(cfg, sorted(set(target_modules) | set(LOCON_TARGET_MODULES)))
    lora_config.rank_pattern = {name: cfg.conv_rank for name in LOCON_TARGET_MODULES}
    lora_config.alpha_pattern = {name: conv_alpha(cfg) for name in LOCON_TARGET_MODULES}
    return lora_config


def conv_alpha(cfg: TrainConfig) -> float | None:
    """The conv (LoCon) alpha as configured (defaults to ``conv_rank``); None without LoCon."""
    if cfg.conv_rank is None:
        return None
    return float(cfg.conv_alpha if cfg.conv_alpha is not None else cfg.conv_rank)


def effective_alpha(cfg: TrainConfig) -> float:
    """The alpha that gives the trained scale under the classic ``alpha / rank`` rule (kohya, A1111, ComfyUI,
    diffusers): rsLoRA scales by ``alpha / sqrt(rank)``, i.e. ``alpha * sqrt(rank) / rank``."""
    return cfg.alpha * math.sqrt(cfg.lora_rank) if cfg.use_rslora else cfg.alpha


def effective_conv_alpha(cfg: TrainConfig) -> float | None:
    """:func:`effective_alpha` for the LoCon convs (peft's rsLoRA applies to ``alpha_pattern`` too); None without
    LoCon."""
    alpha = conv_alpha(cfg)
    if alpha is None:
        return None
    return alpha * math.sqrt(cfg.conv_rank) if cfg.use_rslora else alpha
