"""The weight update of a LoRA module, and low-rank LoRAs cut from updates by SVD: ``resize``, ``merge --rank``
(LoRA + LoRA) and ``extract`` (a fine-tuned checkpoint minus its base), as sd-scripts' ``networks/resize_lora.py``,
``svd_merge_lora.py`` and ``extract_lora_from_models.py`` do it (written here on torch.linalg: peft and diffusers
have no SVD tools).

A rank-``k`` cut keeps the ``k`` largest singular values; its relative error is ``sqrt(sum of the dropped s^2) /
sqrt(sum of all s^2)`` (Frobenius norm of the dropped part over the update's), and "retained energy" is
``1 - error^2``. The cut's factors are balanced (``sqrt(s)`` on each side) and ``alpha`` = its rank, so every
consumer applies scale 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .files import Module

DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")


def module_delta(module: Module) -> torch.Tensor:
    """The module's weight update as a 2-D ``(out, in * k * k)`` matrix, scale included (DoRA's magnitude is not
    part of it: see :func:`lora_scripts.lora_tools.merge.apply_modules`)."""
    t = module.tensors
    if module.algo == "lora":
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * module.scale
    if module.algo == "loha":
        w1 = t["hada_w1_a"] @ t["hada_w1_b"]
        w2 = t["hada_w2_a"] @ t["hada_w2_b"]
        return w1 * w2 * module.scale
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    w2 = w2.reshape(w2.shape[0], -1)
    return torch.kron(w1, w2) * module.scale


def conv_shape(module: Module) -> tuple[int, ...] | None:
    """The ``(k, k)`` kernel of a LoRA conv module (None for linear / 1x1)."""
    down = module.tensors.get("lora_down.weight")
    if down is not None and down.dim() == 4:
        return tuple(down.shape[2:])
    return None


@dataclass
class Cut:
    """A rank-``rank`` LoRA module cut from an update, and what the cut lost."""

    module: Module
    rank: int
    error: float  # relative Frobenius error of the cut
    retained: float  # 1 - error^2: the fraction of the update's energy kept


def choose_rank(s: torch.Tensor, rank: int | None, dynamic: tuple[str, float] | None) -> int:
    """The rank to keep for singular values ``s`` (descending): ``rank``, or the dynamic rule as sd-scripts'
    resize_lora reads it: ``sv_ratio=X`` keeps s >= s_max / X; ``sv_fro=X`` the fewest whose Frobenius norm is >= X
    of the whole; ``sv_cumulative=X`` the fewest whose sum is >= X of the whole. At most ``rank`` when both given."""
    limit = len(s) if rank is None else min(rank, len(s))
    if dynamic is None:
        return max(1, limit)
    method, value = dynamic
    if method == "sv_ratio":
        keep = int((s >= s[0] / value).sum())
    else:
        values = s ** 2 if method == "sv_fro" else s
        total = float(values.sum())
        cumulative = torch.cumsum(values, 0) / (total if total > 0 else 1.0)
        if method == "sv_fro":
            cumulative = cumulative.sqrt()
        keep = int((cumulative < value - 1e-7).sum()) + 1
    return max(1, min(keep, limit))


def cut(name: str, delta: torch.Tensor, rank: int | None, dynamic: tuple[str, float] | None = None,
        kernel: tuple[int, ...] | None = None, dora_scale: torch.Tensor | None = None) -> Cut:
    """The rank-chosen SVD cut of the 2-D ``delta`` as a kohya LoRA module named ``name`` (a conv with ``kernel``:
    down ``(r, in, k, k)``, up ``(out, r, 1, 1)``)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = choose_rank(s, rank, dynamic)
    total = float((s ** 2).sum())
    dropped = float((s[keep:] ** 2).sum())
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    root = s[:keep].sqrt()
    up = (u[:, :keep] * root).float()
    down = (root[:, None] * vh[:keep]).float()
    if kernel is not None:
        down = down.reshape(keep, -1, *kernel)
        up = up.reshape(up.shape[0], keep, 1, 1)
    tensors = {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous()}
    if dora_scale is not None:
        tensors["dora_scale"] = dora_scale
    return Cut(Module(name, tensors, float(keep)), keep, error, 1.0 - error ** 2)


def parse_dynamic(text: str | None) -> tuple[str, float] | None:
    """``sv_fro=0.9`` -> (``sv_fro``, 0.9); None stays None; anything else is a one-line ConfigError."""
    if text is None:
        return None
    method, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if method not in DYNAMIC or not number > 0 or (method != "sv_ratio" and number > 1):
        raise ConfigError(f"--dynamic: '{text}' is not METHOD=X with METHOD one of {', '.join(DYNAMIC)} (sv_ratio: "
                          "X > 0, the largest over the smallest kept singular value; sv_fro / sv_cumulative: 0 < X "
                          "<= 1, the fraction kept), e.g. --dynamic sv_fro=0.9")
    return method, number
