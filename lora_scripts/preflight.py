"""Memory estimate, and the cheapest memory settings that fit, without loading any weights.

How: the task builds its real model from the config files alone on the ``meta`` device and attaches LoRA as in
training; the parameters are swapped for fake tensors (torch's FakeTensorMode: shapes and dtypes, no storage) and one
real training step (the task's own loss, autocast, checkpointing, backward) runs under a counter of allocations
(:mod:`.memory.probe`: long block stacks cut short and extrapolated per block, which tests hold within 5% of the full
step). Weights, LoRA, gradients and optimizer states are counted from the modules, and placed on the GPU or in system
memory by the memory settings (:mod:`.memory.budget`: quantisation, block swap, offload, optimizer). Results are
cached per (model configs, settings) (:mod:`.memory.cache`).

The chooser (:func:`choose_settings`) walks this ladder, cheapest in speed first, and stops at the first rung that
fits 90% of the memory (the rest: CUDA context and allocator fragmentation):

1. ``optimizer: adamw8bit`` (for ``adamw``): the same step, 2 bytes of state per LoRA parameter instead of 8; no speed
   cost (and little gain: a LoRA's states are small);
2. ``gradient_checkpointing: true``: one extra forward of the blocks (~30% more compute), the biggest saving in
   activations;
3. a smaller ``batch_size`` with more ``gradient_accumulation_steps`` (the same effective batch and maths; costs only
   the parallelism a big model at 1024 px does not have spare);
4. ``base_quantization: fp8``: the frozen weights at one byte (a dequantisation per layer, ~10-20%, and a small change
   to the base the LoRA learns against); int8 takes the same bytes;
5. ``blocks_to_swap: N``, smallest N first: N blocks copied over PCIe twice per step, hidden behind compute while a
   block computes longer than it copies;
6. ``gradient_checkpointing: offload``: every checkpointed activation copied out and back;
7. ``base_quantization: nf4`` (the most quality lost), with the smallest N again.

Without a GPU (``train`` on CPU), ``memory_profile: auto`` plans for system memory (MemAvailable): only rungs 2 and 3
apply (8-bit optimizers and nf4 need CUDA; swap and offload move nothing on a CPU).
"""

from __future__ import annotations

import os
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
USABLE = 0.9  # of the memory given: the CUDA context and allocator fragmentation take the rest
BUDGET_ENV = "LORA_SCRIPTS_MEMORY_BUDGET"  # `memory_profile: auto`'s budget instead of the device's (tests, sharing)


@dataclass
class MemoryEstimate:
    """Bytes per part for one training step; ``parts`` is where the step runs (GPU, or system memory on a CPU run),
    ``system`` what a GPU run holds in system memory. ``choice``: the settings the chooser picked when the run as
    configured does not fit (``{}``: it fits; None: not asked, or nothing fits when ``nothing_fits``)."""

    batch_size: int
    parts: dict[str, int] = field(default_factory=dict)
    system: dict[str, int] = field(default_factory=dict)
    capacity: int | None = None  # bytes of memory available, when known
    ram: int | None = None
    on_gpu: bool = False
    choice: dict[str, Any] | None = None
    chosen: "MemoryEstimate | None" = None
    nothing_fits: bool = False
    recommended_batch_size: int | None = None
    recommended_accumulation: int | None = None

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def system_total(self) -> int:
        return sum(self.system.values())

    def render(self) -> str:
        where = "GPU" if self.on_gpu else "memory (CPU run)"
        lines = [f"memory estimate for batch_size {self.batch_size}, {where}:"]
        lines += _table(self.parts, self.capacity)
        if self.on_gpu:
            lines.append("system memory (beyond the process itself):")
            lines += _table(self.system, self.ram, "system ")
        if self.choice == {}:
            lines.append("fits as configured")
        elif self.choice:
            chosen = self.chosen
            lines.append(f"does not fit; the cheapest settings that do (about {human(chosen.total)}"
                         + (f", {human(chosen.system_total)} system memory" if chosen.on_gpu else "") + "):")
            lines.append("  " + set_line(self.choice))
        elif self.nothing_fits:
            lines.append(f"nothing fits: {self.refusal()}")
        return "\n".join(lines)

    def refusal(self) -> str:
        budget = human(self.capacity) if self.capacity is not None else "the memory given"
        return (f"no memory setting fits this run in {budget} (it needs {human(self.total)} as configured); lower "
                "resolution / max_seq_length or lora_rank, or use a bigger device")


def human(nbytes: int) -> str:
    """``12.3 GiB`` or ``456.7 MiB``."""
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"


def _table(parts: dict[str, int], capacity: int | None, prefix: str = "") -> list[str]:
    """One breakdown; ``prefix`` names the system-memory totals apart (CI helpers read the GPU's ``total`` line)."""
    total = sum(parts.values())
    unit, scale = ("GiB", GiB) if max(total, capacity or 0) >= GiB else ("MiB", 2**20)
    lines = [f"  {name:<38}{value / scale:>10.2f} {unit}" for name, value in parts.items()]
    lines.append(f"  {prefix + 'total':<38}{total / scale:>10.2f} {unit}")
    if capacity is not None:
        lines.append(f"  {prefix + 'available':<38}{capacity / scale:>10.2f} {unit}")
    return lines


def set_line(choice: dict[str, Any]) -> str:
    """The settings as ``--set`` arguments a user can paste."""
    def value(v: Any) -> str:
        return "true" if v is True else "false" if v is False else str(v)

    return " ".join(f"--set {k}={value(v)}" for k, v in choice.items())


# --- probing ---------------------------------------------------------------------------------------------------

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


def probe(cfg: TrainConfig, checkpointing: bool, dtype: torch.dtype, full: bool = False,
          use_cache: bool = True) -> tuple[Any, Any]:
    """(ModelBytes, StepPeaks at ``cfg.batch_size``) of ``cfg`` with checkpointing on or off; cached on disk."""
    from .memory import cache
    from .memory.budget import ModelBytes, count_model
    from .memory.probe import StepPeaks, measure_peaks

    key = cache.cache_key(cfg, {"checkpointing": checkpointing, "dtype": dtype, "full": full})
    hit = cache.load(key) if use_cache else None
    if hit is not None:
        return ModelBytes.from_json(hit["model"]), StepPeaks.from_json(hit["step"])
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .tasks.base import make_task

    task = make_task(cfg.model_copy(update={"gradient_checkpointing": checkpointing}))
    task.check_base_model()
    modules, model, make_batch = task.memory_probe()
    counted = count_model(modules, model, task.swap_blocks(model), dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for module in modules:
            _materialize_fake(module, dtype)
        step = measure_peaks(task, model, make_batch, modules, cfg.batch_size, dtype, full=full)
    if use_cache:
        cache.store(key, {"model": counted.to_json(), "step": step.to_json()})
    return counted, step


def measure_step(task: Any, batch_size: int, frozen_dtype: torch.dtype) -> dict[str, int]:
    """Peak bytes of one full fake training step of ``task`` at ``batch_size`` under torch's MemTracker, by kind.
    The slow reference the fast probe is checked against (tests, benchmarks); never on the estimate's path."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenFriendlyTracker(MemTracker):  # no grad hooks: frozen parameters refuse them
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):  # type: ignore[no-untyped-def]
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    modules, model, make_batch = task.memory_probe()
    with FakeTensorMode(allow_non_fake_inputs=True):
        for module in modules:
            _materialize_fake(module, frozen_dtype)
        tracker = FrozenFriendlyTracker()
        tracker.track_external(*modules)
        batch = make_batch(batch_size)
        autocast = torch.autocast("cpu", dtype=frozen_dtype, enabled=frozen_dtype != torch.float32)
        with tracker:
            with autocast:
                loss = task.loss(model, batch)
            loss.backward()
        peak = tracker.get_tracker_snapshot("peak")
    counts = next(iter(peak.values())) if peak else {}
    by_kind = {str(k).rsplit(".", 1)[-1].lower(): int(v) for k, v in counts.items() if str(k) != "Total"}
    return {"activations": by_kind.get("act", 0), "temporaries": by_kind.get("temp", 0) + by_kind.get("oth", 0)}


# --- placing and choosing ----------------------------------------------------------------------------------------

def _dtype(cfg: TrainConfig, on_gpu: bool) -> torch.dtype:
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
    return half if (half is not None and on_gpu) else torch.float32  # CPU autocast keeps fp32 masters


class _Planner:
    """Probes (at most one per checkpointing mode) and places them for any settings."""

    def __init__(self, cfg: TrainConfig, on_gpu: bool, full: bool = False) -> None:
        self.cfg, self.on_gpu, self.full = cfg, on_gpu, full
        self.dtype = _dtype(cfg, on_gpu)
        self._probes: dict[bool, tuple[Any, Any]] = {}

    def settings(self) -> dict[str, Any]:
        from .memory.budget import SETTINGS

        return {k: getattr(self.cfg, k) for k in SETTINGS}

    def model(self) -> Any:
        return self._probe(bool(self.cfg.gradient_checkpointing))[0]

    def _probe(self, checkpointing: bool) -> tuple[Any, Any]:
        if checkpointing not in self._probes:
            self._probes[checkpointing] = probe(self.cfg, checkpointing, self.dtype, full=self.full)
        return self._probes[checkpointing]

    def estimate(self, settings: dict[str, Any]) -> MemoryEstimate:
        from .memory.budget import place

        counted, step = self._probe(bool(settings["gradient_checkpointing"]))
        batch = settings["batch_size"]
        if batch != step.batch_size:
            step = step.scaled(batch)
        gpu, system = place(counted, step, settings, self.on_gpu)
        if not self.on_gpu:
            system = {**system, "runtime overhead (CPU)": CPU_RUNTIME_OVERHEAD}
            return MemoryEstimate(batch, system, {}, on_gpu=False)
        return MemoryEstimate(batch, gpu, system, on_gpu=True)


def _fits(est: MemoryEstimate, capacity: int | None, ram: int | None) -> bool:
    if capacity is not None and est.total > USABLE * capacity:
        return False
    return not (est.on_gpu and ram is not None and est.system_total > USABLE * ram)


def choose_settings(planner: _Planner, capacity: int | None, ram: int | None
                    ) -> tuple[dict[str, Any] | None, MemoryEstimate | None]:
    """The first rung of the ladder (module docstring) that fits: (changed settings, their estimate), ``({}, …)``
    when the run fits as configured, ``(None, None)`` when nothing does."""
    base = planner.settings()
    on_gpu = planner.on_gpu
    effective = base["batch_size"] * base["gradient_accumulation_steps"]
    batches = [b for b in range(base["batch_size"], 0, -1) if effective % b == 0]
    blocks = len(planner.model().blocks) if on_gpu else 0
    rungs: list[tuple[dict[str, Any], bool, bool]] = [({}, False, False)]  # (changes, smaller batches, swap)
    if on_gpu and base["optimizer"] == "adamw":
        rungs.append(({"optimizer": "adamw8bit"}, False, False))
    if not base["gradient_checkpointing"]:
        rungs.append(({"gradient_checkpointing": True}, False, False))
    rungs.append(({}, True, False))
    if on_gpu:
        if base["base_quantization"] == "none":
            rungs.append(({"base_quantization": "fp8"}, True, False))
        if blocks > 2:
            rungs.append(({}, True, True))
        if base["gradient_checkpointing"] != "offload":
            rungs.append(({"gradient_checkpointing": "offload"}, True, True))
        if base["base_quantization"] != "nf4":
            rungs.append(({"base_quantization": "nf4"}, True, True))
    settings = dict(base)
    for changes, smaller, swap in rungs:
        settings.update(changes)
        swaps = range(max(settings["blocks_to_swap"], 1), blocks - 1) if swap else [settings["blocks_to_swap"]]
        for n in swaps:
            for batch in batches if smaller else [base["batch_size"]]:
                trial = {**settings, "blocks_to_swap": n, "batch_size": batch,
                         "gradient_accumulation_steps": effective // batch}
                est = planner.estimate(trial)
                if _fits(est, capacity, ram):
                    return {k: v for k, v in trial.items() if v != base[k]}, est
    return None, None


def estimate_memory(cfg: TrainConfig, capacity: int | None = None, ram: int | None = None,
                    gpu: bool | None = None, choose: bool = True, full: bool = False) -> MemoryEstimate:
    """Estimate the peak memory of ``cfg`` and, when ``capacity`` (default: the free GPU memory) is known, the
    cheapest settings that fit it. ``gpu``: plan for a GPU (default: when one is present or ``capacity`` is given)."""
    if capacity is None:
        capacity = free_device_memory()
    on_gpu = torch.cuda.is_available() or capacity is not None if gpu is None else gpu
    if not on_gpu and capacity is None:
        capacity = ram  # a CPU run: everything is in system memory
    planner = _Planner(cfg, on_gpu, full=full)
    estimate = planner.estimate(planner.settings())
    estimate.capacity, estimate.ram = capacity, ram
    if choose and (capacity is not None or ram is not None):
        choice, chosen = choose_settings(planner, capacity, ram)
        estimate.choice, estimate.chosen, estimate.nothing_fits = choice, chosen, choice is None
        if choice is not None and set(choice) <= {"batch_size", "gradient_accumulation_steps"}:
            estimate.recommended_batch_size = choice.get("batch_size", cfg.batch_size)
            estimate.recommended_accumulation = choice.get("gradient_accumulation_steps",
                                                           cfg.gradient_accumulation_steps)
    return estimate


# --- the device ----------------------------------------------------------------------------------------------------

def free_device_memory() -> int | None:
    """Free bytes on the current CUDA device, or None without a GPU."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    return None


def available_system_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_size(text: str, flag: str = "--vram") -> int:
    """``24GB`` / ``24GiB`` / ``16g`` / ``8000MB`` -> bytes (GB taken as GiB, as GPU makers label cards)."""
    import re

    match = re.fullmatch(r"\s*([\d.]+)\s*([gGmM])?[iI]?[bB]?\s*", text)
    if not match:
        raise ConfigError(f"{flag}: cannot read {text!r}; write e.g. 24GB or 8000MB")
    value, unit = float(match.group(1)), (match.group(2) or "g").lower()
    return int(value * (GiB if unit == "g" else 2**20))


def memory_budget() -> tuple[int | None, bool]:
    """(bytes ``memory_profile: auto`` plans for, whether that is GPU memory): ``$LORA_SCRIPTS_MEMORY_BUDGET`` if
    set, else the free GPU memory, else MemAvailable on a CPU run."""
    on_gpu = torch.cuda.is_available()
    if os.environ.get(BUDGET_ENV):
        return parse_size(os.environ[BUDGET_ENV], BUDGET_ENV), on_gpu
    return (free_device_memory() if on_gpu else available_system_memory()), on_gpu


def auto_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What ``memory_profile: auto`` changes in ``cfg`` (``{}`` when it fits); ConfigError (one line) when nothing
    fits."""
    budget, on_gpu = memory_budget()
    if budget is None:
        return {}
    planner = _Planner(cfg, on_gpu)
    choice, _ = choose_settings(planner, budget, None)
    if choice is None:
        est = planner.estimate(planner.settings())
        est.capacity = budget
        raise ConfigError(f"memory_profile: auto: {est.refusal()}")
    return choice


PREFLIGHT_SECONDS = float(os.environ.get("LORA_SCRIPTS_PREFLIGHT_SECONDS", "10"))


def check_fits(cfg: TrainConfig, force: bool = False) -> MemoryEstimate | None:
    """On a GPU: refuse a run that clearly exceeds free memory (unless ``force``). Returns the estimate, if any.
    Bounded: a first estimate of a model that takes longer than ``PREFLIGHT_SECONDS`` (a slow CPU, a new family
    with long stacks it cannot cut) is skipped with a note, and ``train`` goes on; a cached one answers at once."""
    if not torch.cuda.is_available():
        return None
    import time

    from .memory.tracker import AllocationCounter, EstimateTimeout

    AllocationCounter.deadline = time.monotonic() + PREFLIGHT_SECONDS
    try:
        estimate = estimate_memory(cfg, choose=False)
        if estimate.capacity is not None and estimate.total > estimate.capacity:
            estimate = estimate_memory(cfg)
    except EstimateTimeout:
        print(f"memory pre-flight skipped: the estimate took over {PREFLIGHT_SECONDS:g} s (`lora-scripts estimate` "
              "runs it unbounded and caches it for the next train)")
        return None
    finally:
        AllocationCounter.deadline = None
    if estimate.capacity is not None and estimate.total > estimate.capacity and not force:
        advice = (set_line(estimate.choice) + " (or memory_profile: auto)" if estimate.choice
                  else "a smaller resolution/max_seq_length")
        raise ConfigError(
            f"memory: this run needs about {estimate.total / GiB:.1f} GiB but {estimate.capacity / GiB:.1f} GiB is "
            f"free; {advice} (lora-scripts estimate --config ... shows the breakdown; --force trains anyway)"
        )
    return estimate
