"""The peft LoRA settings shared by every task, and what consumers that only read ``alpha`` need to see.

Network variants, all through peft: plain LoRA, rsLoRA (``use_rslora``), DoRA (``use_dora``), for images LoHa and
LoKr (``network_type``) and, for the UNet, LoCon (``conv_rank``/``conv_alpha``: the adapter on the ResNet 3x3 convs
too, with their own rank and alpha through peft's ``rank_pattern``/``alpha_pattern``).
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


def make_image_adapter_config(cfg: TrainConfig, target_modules: list[str]):
    """The peft config of an image part's adapter as ``network_type`` says: :func:`make_lora_config`, or peft's
    ``LoHaConfig`` / ``LoKrConfig`` (LyCORIS's algorithms; ``lokr_factor`` and ``lokr_decompose_both`` are
    LyCORIS's ``factor`` / ``decompose_both``). LoHa/LoKr keep peft's plain layout for convs (no Tucker
    ``use_effective_conv2d``), which LyCORIS's files hold as ``(rank, in * k * k)`` factors."""
    if cfg.network_type == "loha":
        from peft import LoHaConfig

        return LoHaConfig(r=cfg.lora_rank, alpha=cfg.alpha, target_modules=list(target_modules), init_weights=True,
                          use_effective_conv2d=False)
    if cfg.network_type == "lokr":
        from peft import LoKrConfig

        return LoKrConfig(r=cfg.lora_rank, alpha=cfg.alpha, target_modules=list(target_modules), init_weights=True,
                          use_effective_conv2d=False, decompose_both=cfg.lokr_decompose_both,
                          decompose_factor=cfg.lokr_factor)
    return make_lora_config(cfg, list(target_modules))


def make_unet_lora_config(cfg: TrainConfig, target_modules: list[str]):
    """The UNet's adapter config (:func:`make_image_adapter_config`) on ``target_modules`` plus, when ``conv_rank`` is
    set, LoCon on the ResNet 3x3 convs with rank ``conv_rank`` and alpha ``conv_alpha`` (default ``conv_rank``)."""
    if cfg.conv_rank is None:
        return make_image_adapter_config(cfg, list(target_modules))
    lora_config = make_image_adapter_config(cfg, sorted(set(target_modules) | set(LOCON_TARGET_MODULES)))
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


# Measured on the same DoRA file: LyCORIS reproduces the trained output; the others load it but compute another one.
DORA_WARNING = (
    "use_dora: only LyCORIS (lycoris-lora) reproduces this DoRA LoRA as trained; ComfyUI loads it but divides by "
    "the norm of the base weight instead of the merged one, A1111 takes the norm over the input axis, sd-scripts "
    "ignores dora_scale and diffusers' SD/SDXL loaders drop it, so all of them apply a different result"
)


def image_export_warnings(cfg: TrainConfig) -> list[str]:
    """What consumers of an image LoRA's files cannot apply as trained (printed at export, and written to
    ``training_summary.json``)."""
    out = []
    if cfg.use_dora:
        out.append(DORA_WARNING)
    if cfg.network_type != "lora":
        out.append(f"network_type: {cfg.network_type}: the LyCORIS-layout file loads in LyCORIS, ComfyUI and A1111; "
                   "sd-scripts' networks.lora and diffusers' SD loaders cannot read it (no diffusers/ folder is written)")
    return out
