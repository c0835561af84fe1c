"""Counting the bytes a (fake) training step allocates: the current total, its peak, and by kind at the peak.

torch's MemTracker answers the same question but, on every op, walks every module it has seen to update per-module
peaks and deep-copies snapshots in module hooks: for a full-size UNet or DiT that is minutes of Python per step.
The estimate needs only the process-wide peak split into activations (forward) and temporaries (backward), so this
counter is a TorchDispatchMode that sees each op's outputs once, registers each new storage with a weak reference
(its bytes come off when the storage dies) and keeps the running maximum. Same accounting as MemTracker for
storages (views share one), no module bookkeeping; tests compare the two on tiny models.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, in_kernel_invocation_manager
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Ops whose output shares its input's storage (so there is nothing to count) and that a model calls by the thousand
# (a LoRA linear's transposes and views, autograd's detaches): about half of a step's ops. FakeTensorMode runs each
# through its cache-key machinery (~0.15 ms); their meta kernel alone is ~0.02 ms.
_STORAGE_SHARING = frozenset({
    _aten.view.default, _aten._unsafe_view.default, _aten.t.default, _aten.transpose.int, _aten.detach.default,
    _aten.permute.default, _aten.expand.default, _aten.unsqueeze.default, _aten.squeeze.dim, _aten.alias.default,
})


class EstimateTimeout(Exception):
    """The step ran past its deadline (the GPU pre-flight bounds its wait)."""


class AllocationCounter(TorchDispatchMode):
    """Peak bytes of the storages created under this mode, by ``kind`` (set ``counter.kind`` between phases)."""

    deadline: float | None = None  # time.monotonic() after which the next op raises EstimateTimeout

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.kind = "activations"
        self.current = 0
        self.peak = 0
        self.by_kind: dict[str, int] = {}
        self.peak_by_kind: dict[str, int] = {}
        self._live: dict[int, tuple[weakref.ref, int, str]] = {}

    def _forget(self, key: int, ref: weakref.ref) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[0] is ref:
            del self._live[key]
            _, nbytes, kind = entry
            self.current -= nbytes
            self.by_kind[kind] -= nbytes

    def exclude(self, tensors: Any) -> None:
        """Storages that exist before the step (parameters, buffers) and are counted apart: their views (a
        transposed weight) are not new allocations."""
        for tensor in tensors:
            self.track(tensor, counted=False)

    def uncount(self, tensor: torch.Tensor) -> None:
        """Stop counting ``tensor``'s storage (a LoRA gradient once accumulated: the estimate adds every one of
        them apart, and they do not grow with the batch as activations do)."""
        storage = tensor.untyped_storage()
        entry = self._live.get(id(storage))
        if entry is not None and entry[0]() is storage and entry[1]:
            ref, nbytes, kind = entry
            self._live[id(storage)] = (ref, 0, kind)
            self.current -= nbytes
            self.by_kind[kind] -= nbytes

    def track(self, tensor: torch.Tensor, counted: bool = True) -> None:
        """Count ``tensor``'s storage if it is new (an op's output that is not a view of a known storage)."""
        self.track_storage(tensor.untyped_storage(), counted)

    def track_storage(self, storage: torch.UntypedStorage, counted: bool = True) -> None:
        """Count ``storage`` if it is new."""
        key = id(storage)
        entry = self._live.get(key)
        if entry is not None and entry[0]() is storage:
            return
        nbytes = storage.nbytes() if counted else 0
        ref = weakref.ref(storage, lambda dead, key=key: self._forget(key, dead))
        self._live[key] = (ref, nbytes, self.kind)
        self.current += nbytes
        self.by_kind[self.kind] = self.by_kind.get(self.kind, 0) + nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_by_kind = dict(self.by_kind)

    def __enter__(self) -> "AllocationCounter":
        if self.deadline is not None:
            # checked as each module starts, in forward: raising inside an op (or through backward) aborts torch
            def check(*_: Any) -> None:
                if time.monotonic() > (self.deadline or float("inf")):
                    raise EstimateTimeout

            self._deadline_hook = torch.nn.modules.module.register_module_forward_pre_hook(check)
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        hook = self.__dict__.pop("_deadline_hook", None)
        if hook is not None:
            hook.remove()
        super().__exit__(*args)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        if func in _STORAGE_SHARING:
            source = args[0]
            # a fake tensor holding no constant (FakeTensorMode tracks small real values it may need later)
            if type(source) is FakeTensor and source.constant is None:
                with in_kernel_invocation_manager(source.fake_mode):
                    out = func(*args, **(kwargs or {}))
                return FakeTensor(source.fake_mode, out, source.fake_device)
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out
