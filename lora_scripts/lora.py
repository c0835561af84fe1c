"""The peft LoRA settings shared by every task, and what consumers that only read ``alpha`` need to see."""

from __future__ import annotations

import math
from typing import Any

from .config import TrainConfig


def make_lora_config(cfg: TrainConfig, target_modules: Any, task_type: str | None = None):
    """A peft ``LoraConfig`` from the run's config (rank, alpha, dropout, rsLoRA)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, target_modules=target_modules,
        use_rslora=cfg.use_rslora, init_lora_weights=True, task_type=task_type,
    )


def effective_alpha(cfg: TrainConfig) -> float:
    """The alpha that gives the trained scale under the classic ``alpha / rank`` rule (kohya, A1111, ComfyUI,
    diffusers): rsLoRA scales by ``alpha / sqrt(rank)``, i.e. ``alpha * sqrt(rank) / rank``."""
    return cfg.alpha * math.sqrt(cfg.lora_rank) if cfg.use_rslora else cfg.alpha
