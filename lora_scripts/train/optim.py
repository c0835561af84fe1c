"""Optimizers by name (``optimizer`` in the config). Libraries do the work; this only picks and configures.

adamw (torch), adafactor (transformers), came (came-pytorch), schedule_free_adamw (schedulefree), prodigy
(prodigyopt), adamw8bit / paged_adamw8bit (bitsandbytes, CUDA only)."""

from __future__ import annotations

from typing import Any

import torch

from ..config import TrainConfig
from ..errors import ConfigError


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter] | list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over ``params`` (tensors, or parameter groups with their own
    ``lr``); a one-line ConfigError when it cannot run here."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adamw":
        # Fused AdamW: one kernel per step on CUDA and (torch >= 2.4) on CPU, where torch's default is a Python loop
        # over tensors: 1.6 ms vs 7.4 ms per step for the 256 LoRA tensors of an SD UNet (benchmarks/optimizer_step.py).
        kwargs = dict(lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a device or dtype without a fused kernel (or an older torch)
            return torch.optim.AdamW(params, **kwargs)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    if cfg.optimizer == "came":
        # CAME (Luo et al., 2023): Adafactor's factored second moments plus a confidence-guided update; its three
        # betas and two epsilons keep the paper's defaults (came-pytorch's), which the adam_* keys do not map onto.
        try:
            from came_pytorch import CAME
        except ImportError:
            raise ConfigError("optimizer: came needs the came-pytorch package (pip install 'lora-scripts[optim]')"
                              ) from None
        return CAME(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "schedule_free_adamw":
        # Schedule-free AdamW (Defazio et al., 2024): no decay schedule needed (lr_scheduler: constant, warm-up via
        # lr_warmup_steps). It keeps two points per weight; the loop switches it to .eval() (the averaged weights)
        # around evaluation, samples, checkpoints and export, and back to .train() before steps.
        try:
            from schedulefree import AdamWScheduleFree
        except ImportError:
            raise ConfigError("optimizer: schedule_free_adamw needs the schedulefree package (pip install "
                              "'lora-scripts[optim]')") from None
        return AdamWScheduleFree(params, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon,
                                 weight_decay=cfg.weight_decay)
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("optimizer: prodigy needs the prodigyopt package (pip install prodigyopt)") from None
        return Prodigy(params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.weight_decay)
    # 8-bit AdamW variants: bitsandbytes, CUDA only
    if not torch.cuda.is_available():
        raise ConfigError(f"optimizer: {cfg.optimizer} needs a CUDA GPU (bitsandbytes); use adamw or adafactor on CPU")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"optimizer: {cfg.optimizer} needs bitsandbytes (pip install 'lora-scripts[bnb]')") from None
    cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)


def has_eval_mode(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer keeps separate training and evaluation weights (schedule-free: ``.train()`` /
    ``.eval()``); accelerate's wrapper forwards both calls."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None))
