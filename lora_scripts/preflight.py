"""Memory estimate and recommended batch size, without loading any weights.

How: the task builds its real model from the config files alone on the ``meta`` device and attaches LoRA as in
training; the parameters are swapped for fake tensors (torch's FakeTensorMode: shapes and dtypes, no storage) and one
real training step (the task's own loss, backward, AdamW) runs under torch's MemTracker, which records the peak bytes
of parameters, activations and temporaries. So gradient checkpointing, attention shapes, logits and caches are
counted as they really happen, not by a formula. Optimizer states are added by hand (AdamW: 2 fp32 tensors per LoRA
parameter) because they are allocated after the peak of the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .config import TrainConfig
from .errors import ConfigError

GiB = 2**30
# What a CPU training process holds beyond its tensors (allocator and library buffers: oneDNN scratch space, the
# DataLoader, autograd bookkeeping). Measured as the constant gap in benchmarks/memory_estimate_calibration.py
# (14-29 MiB over eight configs); on a GPU the CUDA context is outside max_memory_allocated, so nothing is added.
CPU_RUNTIME_OVERHEAD = 24 * 2**20


@dataclass
class MemoryEstimate:
    """Bytes per part for one training step at ``batch_size``; ``total`` is the predicted peak."""

    batch_size: int
    parts: dict[str, int] = field(default_factory=dict)
    capacity: int | None = None  # bytes of memory available, when known
    recommended_batch_size: int | None = None
    recommended_accumulation: int | None = None

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def render(self) -> str:
        unit, scale = ("GiB", GiB) if self.total >= GiB else ("MiB", 2**20)
        lines = [f"memory estimate for batch_size {self.batch_size}:"]
        lines += [f"  {name:<34}{value / scale:>10.1f} {unit}" for name, value in self.parts.items()]
        lines.append(f"  {'total':<34}{self.total / scale:>10.1f} {unit}")
        if self.capacity is not None:
            lines.append(f"  {'available':<34}{self.capacity / scale:>10.1f} {unit}")
        if self.recommended_batch_size is not None:
            lines.append(f"recommended: batch_size {self.recommended_batch_size}, gradient_accumulation_steps "
                         f"{self.recommended_accumulation} (same effective batch)")
        elif self.capacity is not None:
            lines.append("even batch_size 1 does not fit: enable gradient_checkpointing, mixed_precision: bf16, or "
                         "lower resolution / max_seq_length")
        return "\n".join(lines)


def _memory_tracker():
    """torch's MemTracker without grad hooks: it registers one on every parameter, which frozen ones refuse."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenFriendlyTracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    return FrozenFriendlyTracker()


def _materialize_fake(module: torch.nn.Module, frozen_dtype: torch.dtype) -> None:
    """Replace meta parameters and buffers by fake CPU tensors (trainable ones fp32, frozen ones ``frozen_dtype``)."""
    for mod in module.modules():
        for name, param in list(mod._parameters.items()):
            if param is not None:
                dtype = torch.float32 if param.requires_grad or not param.is_floating_point() else frozen_dtype
                mod._parameters[name] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=dtype), requires_grad=param.requires_grad
                )
        for name, buf in list(mod._buffers.items()):
            if buf is not None:
                dtype = frozen_dtype if buf.is_floating_point() else buf.dtype
                mod._buffers[name] = torch.empty(buf.shape, dtype=dtype)


def measure_step(task: Any, batch_size: int, frozen_dtype: torch.dtype) -> dict[str, int]:
    """Peak bytes of one fake training step of ``task`` at ``batch_size``, by kind."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    modules, model, make_batch = task.memory_probe()
    with FakeTensorMode(allow_non_fake_inputs=True):
        for module in modules:
            _materialize_fake(module, frozen_dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        tracker = _memory_tracker()
        tracker.track_external(*modules, optimizer)
        batch = make_batch(batch_size)
        autocast = torch.autocast("cpu", dtype=frozen_dtype, enabled=frozen_dtype != torch.float32)
        with tracker:
            with autocast:
                loss = task.loss(model, batch)
            loss.backward()
        peak = tracker.get_tracker_snapshot("peak")
    counts = next(iter(peak.values())) if peak else {}
    by_kind = {str(k).rsplit(".", 1)[-1].lower(): int(v) for k, v in counts.items() if str(k) != "Total"}
    lora = sum(p.numel() for p in params) * 4
    return {
        "frozen weights": by_kind.get("param", 0) + by_kind.get("buffer", 0) - lora,
        "LoRA weights": lora,
        "LoRA gradients": lora,
        "optimizer states (AdamW)": 2 * lora,
        "activations": by_kind.get("act", 0),
        "temporaries": by_kind.get("temp", 0) + by_kind.get("oth", 0),
    }


def free_device_memory() -> int | None:
    """Free bytes on the current CUDA device, or None without a GPU."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    return None


def parse_size(text: str) -> int:
    """``24GB`` / ``24GiB`` / ``16g`` / ``8000MB`` -> bytes (GB taken as GiB, as GPU makers label cards)."""
    import re

    match = re.fullmatch(r"\s*([\d.]+)\s*([gGmM])?[iI]?[bB]?\s*", text)
    if not match:
        raise ConfigError(f"--vram: cannot read {text!r}; write e.g. 24GB or 8000MB")
    value, unit = float(match.group(1)), (match.group(2) or "g").lower()
    return int(value * (GiB if unit == "g" else 2**20))


def estimate_memory(cfg: TrainConfig, capacity: int | None = None) -> MemoryEstimate:
    """Estimate the peak memory of ``cfg`` and recommend a batch layout that fits ``capacity`` (default: free GPU)."""
    from .tasks.base import make_task

    task = make_task(cfg)
    task.check_base_model()
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
    frozen_dtype = half if (half is not None and torch.cuda.is_available()) else torch.float32
    one = measure_step(task, 1, frozen_dtype)
    at_batch = measure_step(task, cfg.batch_size, frozen_dtype) if cfg.batch_size > 1 else one
    if not torch.cuda.is_available():
        one["runtime overhead (CPU)"] = at_batch["runtime overhead (CPU)"] = CPU_RUNTIME_OVERHEAD
    estimate = MemoryEstimate(cfg.batch_size, at_batch, capacity if capacity is not None else free_device_memory())
    if estimate.capacity is not None:
        # activations and temporaries grow linearly with the batch; the rest does not
        per_sample = max(0.0, (at_batch["activations"] + at_batch["temporaries"] - one["activations"]
                               - one["temporaries"]) / max(cfg.batch_size - 1, 1)) or float(
            one["activations"] + one["temporaries"])
        fixed = sum(one.values()) - per_sample
        budget = 0.9 * estimate.capacity  # allocator fragmentation and the CUDA context
        effective = cfg.batch_size * cfg.gradient_accumulation_steps
        fits = int((budget - fixed) // per_sample) if per_sample and budget > fixed else 0
        if fits >= 1:
            batch = min(cfg.batch_size if fits >= cfg.batch_size else fits, effective)
            while effective % batch:  # keep the effective batch exactly
                batch -= 1
            estimate.recommended_batch_size = batch
            estimate.recommended_accumulation = effective // batch
    return estimate


def check_fits(cfg: TrainConfig, force: bool = False) -> MemoryEstimate | None:
    """On a GPU: refuse a run that clearly exceeds free memory (unless ``force``). Returns the estimate, if any."""
    if not torch.cuda.is_available():
        return None
    estimate = estimate_memory(cfg)
    if estimate.capacity is not None and estimate.total > estimate.capacity and not force:
        advice = (f"batch_size: {estimate.recommended_batch_size} with gradient_accumulation_steps: "
                  f"{estimate.recommended_accumulation}" if estimate.recommended_batch_size
                  else "gradient_checkpointing: true, mixed_precision: bf16, or a smaller resolution/max_seq_length")
        raise ConfigError(
            f"memory: this run needs about {estimate.total / GiB:.1f} GiB but {estimate.capacity / GiB:.1f} GiB is "
            f"free; set {advice} (lora-scripts estimate --config ... shows the breakdown; --force trains anyway)"
        )
    return estimate
