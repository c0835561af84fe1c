"""One fake training step, measured fast: the real model on fake tensors, its repeated block stacks cut short.

The step is the ground truth (the task's own loss, autocast, checkpointing, backward), run on fake tensors (shapes and
dtypes, no storage) under :class:`~.tracker.AllocationCounter`. Its cost is per op, not per byte: a 1024 px step
costs what a 64 px one does, so a smaller probe resolution saves nothing. What costs is the number of ops, and a
DiT's ops are its blocks (FLUX.1: 57, Qwen-Image: 60). So every long stack of identical blocks (an ``nn.ModuleList``
of at least :data:`MIN_STACK` same-class modules) of the trained model is cut to its last block (it can differ:
SD3's context-pre-only block), the step is measured so, then once per group of stacks with one block more (the
first), and each phase's peak is extrapolated linearly in each stack's depth when these steps run fewer modules
than one whole step (SDXL's seven 10-deep attention stacks are one group: two steps of about a third of its ops).
The frozen text encoders' stacks run their last layer only, unextrapolated (:func:`frozen_stacks`). Activations
grow by one block's worth per block, checkpointed or not. What the model caches between steps (Qwen-Image's per-shape RoPE
frequencies) only the first step creates: every later one counts it from the forward's start
(:meth:`_PhaseCounter.carry_in`), else the difference passes for the blocks'. Peaks are kept per phase (encoding before the denoiser, forward, backward) and
per stack last entered, so a VAE-encoding peak, which depth does not move, is not stretched with the blocks, and the
backward peak among FLUX's double blocks and the one among its single blocks are extended each on its own (their
maximum is not linear in depth: which one wins changes with it). Activations are proportional to
the batch (nothing in a step's activations is shared across samples), so one batch size is probed and the others
scale; tests hold both shortcuts within 5% of the full step.
"""

from __future__ import annotations

import contextlib
import gc
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch

from .tracker import AllocationCounter

MIN_STACK = 6  # shorter lists (UNet resnets, Z-Image's two refiners) run whole
BASE_KEEP = 1  # blocks of each stack in the base step (the last one); the increment steps run one more
PHASES = ("prepare", "forward", "backward")


@dataclass
class StepPeaks:
    """Bytes a step allocates beyond the weights, at ``batch_size``: per phase, the peak of everything, the peak
    without the checkpointed blocks' saved inputs (what stays on the GPU under ``offload``), the most of those inputs
    alive at once (what offload holds in system memory) and the largest one block's inputs (in flight)."""

    batch_size: int
    peak: dict[str, int] = field(default_factory=dict)
    peak_resident: dict[str, int] = field(default_factory=dict)
    peak_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    offloaded: int = 0
    offload_block: int = 0

    def scaled(self, batch_size: int, keep: int = 0) -> "StepPeaks":
        """These peaks at another batch size: activations are per sample, except ``keep`` bytes that are not (the
        autocast copies of the LoRA weights)."""
        f = batch_size / self.batch_size

        def per_sample(value: int) -> int:
            return int(min(keep, value) + max(value - keep, 0) * f)

        return StepPeaks(batch_size, {k: per_sample(v) for k, v in self.peak.items()},
                         {k: per_sample(v) for k, v in self.peak_resident.items()},
                         {p: {k: per_sample(v) if k == "activations" else int(v * f) for k, v in d.items()}
                          for p, d in self.peak_kind.items()},
                         int(self.offloaded * f), int(self.offload_block * f))

    @property
    def total(self) -> int:
        return max(self.peak.values(), default=0)

    def parts(self) -> dict[str, int]:
        """Activations (made in forward) and temporaries (made in backward) at the highest phase peak."""
        phase = max(self.peak, key=self.peak.get) if self.peak else None
        kinds = self.peak_kind.get(phase, {}) if phase else {}
        return {"activations": kinds.get("activations", 0), "temporaries": kinds.get("temporaries", 0)}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StepPeaks":
        return cls(**data)


class _PhaseCounter(AllocationCounter):
    """Peaks per phase, and the checkpointed blocks' inputs (marked by :func:`_marking_checkpoints`) apart."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "prepare"
        self.peaks: dict[str, int] = {}
        self.resident_peaks: dict[str, int] = {}
        self.kind_at_peak: dict[str, dict[str, int]] = {}
        self.marked: dict[int, int] = {}  # storage id -> bytes, checkpointed inputs alive
        self.marked_live = 0
        self.marked_peak = 0
        self.block_peak = 0
        self.carried: dict[int, Any] = {}  # storage id -> weakref: what earlier steps left in the model's caches

    def survivors(self) -> dict[int, Any]:
        """Counted storages alive after the step, and the carried ones: what the model keeps between steps
        (diffusers' per-shape RoPE caches, functools.lru_cache on module methods)."""
        alive = {key: entry[0] for key, entry in self._live.items() if entry[1] and entry[0]() is not None}
        return {**{k: r for k, r in self.carried.items() if r() is not None}, **alive}

    def carry_in(self) -> None:
        """Count what earlier steps left in the model's caches, as the model's forward starts: the step that filled
        them counted them from their creation in its forward, so every probe step counts them (else the first pays
        for them and the difference passes for the blocks': Qwen-Image's RoPE cache made its step 10% low)."""
        for ref in self.carried.values():
            storage = ref()
            if storage is not None:
                self.track_storage(storage)

    def _forget(self, key: int, ref: Any) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[0] is ref and key in self.marked:
            self.marked_live -= self.marked.pop(key)
        super()._forget(key, ref)

    segment = ""  # the stack group whose block ran last (set by forward pre-hooks, also on recompute)

    def track_storage(self, storage: torch.UntypedStorage, counted: bool = True) -> None:
        before = self.current
        super().track_storage(storage, counted)
        if self.current > before:
            phase = f"{self.phase}{self.segment}"
            if self.current > self.peaks.get(phase, -1):
                self.peaks[phase] = self.current
                self.kind_at_peak[phase] = dict(self.by_kind)
            resident = self.current - self.marked_live
            if resident > self.resident_peaks.get(phase, -1):
                self.resident_peaks[phase] = resident

    def mark(self, tensors: list[torch.Tensor]) -> None:
        """Inputs saved by one checkpointed block: offload keeps them in system memory until backward."""
        block = 0
        for tensor in tensors:
            storage = tensor.untyped_storage()
            key = id(storage)
            entry = self._live.get(key)
            if entry is None or entry[0]() is not storage or key in self.marked or not entry[1]:
                continue
            self.marked[key] = entry[1]
            self.marked_live += entry[1]
            block += entry[1]
        self.marked_peak = max(self.marked_peak, self.marked_live)
        self.block_peak = max(self.block_peak, block)


@contextlib.contextmanager
def _marking_checkpoints(counter: _PhaseCounter) -> Iterator[None]:
    """Report the tensor inputs of each non-reentrant checkpoint call (diffusers and transformers both use it)
    to ``counter``, in forward only (backward recomputes with the same inputs)."""
    import torch.utils.checkpoint as ckpt

    original = ckpt._checkpoint_without_reentrant_generator

    def wrapped(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        if counter.phase == "forward":
            counter.mark([a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)])
        return original(fn, *args, **kwargs)

    ckpt._checkpoint_without_reentrant_generator = wrapped
    try:
        yield
    finally:
        ckpt._checkpoint_without_reentrant_generator = original


def find_stacks(*roots: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The long stacks of same-class blocks under ``roots`` (DiT blocks, SDXL's 10-deep attention, LLM layers, the
    T5 and Qwen text encoders' layers)."""
    stacks, seen = [], set()
    for root in roots:
        for module in root.modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) >= MIN_STACK and id(module) not in seen:
                seen.add(id(module))
                if len({type(child) for child in module}) == 1:
                    stacks.append(module)
    return stacks


def frozen_stacks(model: torch.nn.Module, modules: list[torch.nn.Module]) -> list[torch.nn.ModuleList]:
    """The stacks of the frozen components outside ``model`` (the T5, CLIP and Qwen text encoders' layers). They run
    under ``no_grad``: their peak is one layer's work whatever their depth, so every probe step runs only their last
    layer and nothing is extrapolated (the hidden states an encoder may keep, one per layer, are kilobytes to a few
    MB: 24 × 4 MB for T5-XXL's 512 tokens, beside a denoiser step's GiBs)."""
    inside = {id(m) for m in model.modules()}
    return find_stacks(*(m for m in modules if id(m) not in inside))


def _stack_groups(stacks: list[torch.nn.ModuleList]) -> list[list[torch.nn.ModuleList]]:
    """Stacks of one block class and depth vary together (SDXL's seven 10-deep attention stacks are one group)."""
    groups: dict[tuple[type, int], list[torch.nn.ModuleList]] = {}
    for stack in stacks:
        groups.setdefault((type(stack[0]), len(stack)), []).append(stack)
    return list(groups.values())


@contextlib.contextmanager
def _cut(stacks: list[torch.nn.ModuleList], keep: int) -> Iterator[None]:
    """Temporarily keep the ``keep - 1`` first blocks and the last block of each stack."""
    saved = [stack._modules for stack in stacks]
    try:
        for stack in stacks:
            items = list(stack._modules.items())
            kept = items[: keep - 1] + items[-1:]
            stack._modules = OrderedDict((str(i), module) for i, (_, module) in enumerate(kept))
        yield
    finally:
        for stack, modules in zip(stacks, saved):
            stack._modules = modules


def _cutting_pays(model: torch.nn.Module, groups: list[list[torch.nn.ModuleList]]) -> bool:
    """Whether the 1 + len(groups) cut steps together run fewer modules than one whole step, by a margin (a DiT: a
    tenth; SDXL, whose seven 10-deep attention stacks hold about 80% of its ops: about half)."""
    def count(module: torch.nn.Module) -> int:
        return sum(1 for _ in module.modules())

    total = count(model)
    stacked = [sum(count(stack) for stack in group) for group in groups]
    depths = [len(group[0]) for group in groups]
    base = total - sum(stacked) + sum(n * BASE_KEEP / d for n, d in zip(stacked, depths))
    steps = base + sum(base + n / d for n, d in zip(stacked, depths))  # each group's step: one more block
    return steps < 0.85 * total


def _one_step(task: Any, model: torch.nn.Module, make_batch: Any, modules: list[torch.nn.Module],
              batch_size: int, dtype: torch.dtype, groups: list[list[torch.nn.ModuleList]] = (),
              carried: dict[int, Any] | None = None) -> StepPeaks:
    """One step under the counter; ``carried`` (updated) holds what the model cached in earlier steps."""
    counter = _PhaseCounter()
    counter.carried = dict(carried or {})
    counter.exclude([t for m in (*modules, model) for t in (*m.parameters(), *m.buffers())])
    # Peaks are kept per (phase, stack last entered): a backward peak among FLUX's double blocks and one among its
    # single blocks each grow linearly with depth, their maximum does not (which one wins changes with depth).
    segment_hooks = []
    for index, group in enumerate(groups):
        def enter(*_: Any, label: str = f"/stack{index}") -> None:
            counter.segment = label

        segment_hooks += [block.register_forward_pre_hook(enter) for stack in group for block in stack]

    def enter_forward(*_: Any) -> None:
        counter.phase, counter.kind, counter.segment = "forward", "activations", ""
        counter.carry_in()

    hook = model.register_forward_pre_hook(enter_forward)
    # LoRA gradients are counted apart (budget.place), whole: not again among the step's temporaries
    grad_hooks = [p.register_post_accumulate_grad_hook(lambda p: counter.uncount(p.grad))
                  for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    try:
        with counter, _marking_checkpoints(counter):
            batch = make_batch(batch_size)
            with autocast:
                loss = task.loss(model, batch)
            counter.phase, counter.kind = "backward", "temporaries"
            loss.backward()
    finally:
        hook.remove()
        for grad_hook in grad_hooks + segment_hooks:
            grad_hook.remove()
    for param in model.parameters():
        param.grad = None
    if carried is not None:
        gc.collect()  # what only reference cycles hold (autograd and checkpoint frames) is no cache
        carried.clear()
        carried.update(counter.survivors())
    return StepPeaks(batch_size, dict(counter.peaks), dict(counter.resident_peaks), dict(counter.kind_at_peak),
                     counter.marked_peak, counter.block_peak)


def _combine(base: StepPeaks, steps: list[tuple[StepPeaks, int]]) -> StepPeaks:
    """Extrapolate: ``base`` (one block per stack) plus, per stack group, (its depth - 1) times its one-block
    increment, for the
    peaks among the blocks; the peaks before them (encoding, the forward up to the first block) are the base's."""
    def extend(get: Any, stacked: bool = True) -> Any:
        value = get(base)
        for probe, blocks in steps if stacked else ():
            value += blocks * (get(probe) - get(base))
        return max(int(value), 0)

    out = StepPeaks(base.batch_size, offloaded=extend(lambda s: s.offloaded),
                    offload_block=max([base.offload_block] + [s.offload_block for s, _ in steps]))
    for phase in sorted({key for s in [base, *(p for p, _ in steps)] for key in s.peak}):
        # only the first step pays for what the model caches (:meth:`_PhaseCounter.carry_in`): later ones count
        # it from the forward's start, which would pass for depth before the first block
        stacked = "/stack" in phase
        out.peak[phase] = extend(lambda s: s.peak.get(phase, 0), stacked)
        out.peak_resident[phase] = extend(lambda s: s.peak_resident.get(phase, 0), stacked)
        kinds = base.peak_kind.get(phase, {})
        out.peak_kind[phase] = {k: extend(lambda s: s.peak_kind.get(phase, {}).get(k, 0), stacked) for k in kinds}
    return out


def measure_peaks(task: Any, model: torch.nn.Module, make_batch: Any, modules: list[torch.nn.Module],
                  batch_size: int, dtype: torch.dtype, full: bool = False) -> StepPeaks:
    """The step's peaks at ``batch_size`` (modules already fake). ``full``: run every block (the slow reference)."""
    if full:
        return _one_step(task, model, make_batch, modules, batch_size, dtype)
    groups = _stack_groups(find_stacks(model))
    if groups and not _cutting_pays(model, groups):
        groups = []
    with _cut(frozen_stacks(model, modules), BASE_KEEP):
        if not groups:
            return _one_step(task, model, make_batch, modules, batch_size, dtype)
        everything = [stack for group in groups for stack in group]
        depths = [len(group[0]) for group in groups]  # before any cut
        carried: dict[int, Any] = {}
        gc.freeze()  # the model and the libraries: the collections between steps walk only what the steps made
        try:
            with _cut(everything, BASE_KEEP):
                base = _one_step(task, model, make_batch, modules, batch_size, dtype, groups, carried)
            steps = []
            for group, depth in zip(groups, depths):
                others = [stack for stack in everything if not any(stack is g for g in group)]
                with _cut(others, BASE_KEEP), _cut(group, BASE_KEEP + 1):
                    steps.append((_one_step(task, model, make_batch, modules, batch_size, dtype, groups, carried),
                                  depth - BASE_KEEP))
        finally:
            gc.unfreeze()
    return _combine(base, steps)
