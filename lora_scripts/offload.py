"""Memory settings that move tensors off the compute device while training: block swap (``blocks_to_swap``) and
activation offload (``gradient_checkpointing: offload``).

Block swap keeps the frozen weights of the last N transformer blocks in (pinned) CPU memory and copies each block to
the device just before it runs, the next one prefetched on a side CUDA stream, in forward and in backward, as
musubi-tuner's ``ModelOffloader`` and OneTrainer's layer offloading do. Hand-written because accelerate's offload
hooks (``cpu_offload``, ``AlignDevicesHook``) copy synchronously, for inference, and never bring weights back for
backward. Two choices differ from musubi-tuner, whose LoRA lives outside the blocks:

- peft puts the LoRA *inside* the blocks; its trainable tensors stay on the device all the time (a few MB), and only
  frozen tensors travel. The optimizer, gradient clipping, DDP and checkpoints therefore see ordinary device
  parameters, and the optimizer step is the same as without swapping.
- frozen weights never change, so a block leaving the device is not copied back: its tensors are dropped (replaced
  by an empty placeholder, so a block that runs while it is not loaded fails loudly instead of computing garbage).
- a quantised weight (``base_quantization: int8 / fp8``, a torchao tensor subclass) travels as the plain tensors it
  stores (int8 / float8 ``qdata`` and its ``scale``): 1 byte per weight, and the wrapper stays in place. A wrapper's
  ``.data`` cannot be replaced, so its inner tensors are set as its attributes: ``module.to`` gives a wrapper new
  inner tensor objects (``torch.utils.swap_tensors``), so holding on to the old ones would load the wrong objects.
  A wrapper rebuilt while its block is dropped reports its placeholder's shape; only its inner tensors are read.

The copies go through a :class:`DevicePair`. On a CUDA device it pins the host copies and copies on a side stream;
on the CPU both ends are CPU memory and a load is a real copy into new storage, so the whole mechanism (hooks,
prefetch order, placeholders, reload for backward) runs in the CPU test suite and must give bit-identical losses and
gradients to a run without swapping.

Backward: a block's autograd nodes may read its weights (a norm's scale, a linear's weight), so each block's outputs
pass through an identity autograd function whose backward loads the block (and prefetches the one before it) before
any of the block's own backward runs. With gradient checkpointing the recomputation calls the block again, which
finds it loaded. Swapping saves the most with gradient checkpointing: without it, autograd may keep views of the
weights a block used until that block's backward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .models.quantize import is_quantized_weight


@dataclass
class _Transfer:
    tensors: list[torch.Tensor]
    event: Any  # torch.cuda.Event on a CUDA device, else None


@dataclass
class _Slot:
    """Where one swapped plain tensor lives: ``owner.data`` (a plain parameter or buffer), or attribute ``name`` of
    ``owner`` (a quantised weight's ``qdata``, ``scale``…); and its host copy."""
    owner: torch.Tensor
    name: str | None
    host: torch.Tensor

    def get(self) -> torch.Tensor:
        return self.owner if self.name is None else getattr(self.owner, self.name)

    def put(self, tensor: torch.Tensor) -> None:
        if self.name is None:
            self.owner.data = tensor
        else:
            setattr(self.owner, self.name, tensor)


def _inner_slots(tensor: torch.Tensor) -> Iterator[tuple[torch.Tensor, str]]:
    """(wrapper, attribute) of every plain tensor a quantised wrapper stores its data in: its
    ``__tensor_flatten__`` names, recursively."""
    for name in tensor.__tensor_flatten__()[0]:
        inner = getattr(tensor, name)
        if inner is None:
            continue
        if is_quantized_weight(inner):
            yield from _inner_slots(inner)
        else:
            yield tensor, name


class DevicePair:
    """The host (CPU memory that holds swapped weights) and the device blocks run on, and how tensors go across.

    CUDA: host copies are pinned and loads are issued on a side stream the compute stream waits on. CPU: host and
    device are both the CPU; a load still copies into new storage, so the CPU path exercises every step but the
    stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def host_copy(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The copy a swapped tensor keeps in CPU memory for the whole run."""
        host = tensor.detach().to("cpu", dtype=dtype or tensor.dtype, copy=True)
        return host.pin_memory() if self.cuda else host

    def placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        """What a swapped tensor holds while its block is not loaded: nothing, on the device (so ``module.to`` and
        DDP's broadcasts pass over it, and a forward reading it fails)."""
        return torch.empty(0, dtype=dtype, device=self.device)

    def start(self, hosts: list[torch.Tensor]) -> _Transfer:
        """Begin copying ``hosts`` to the device (asynchronously on CUDA)."""
        if not self.cuda:
            return _Transfer([h.clone() for h in hosts], None)
        with torch.cuda.stream(self.stream):
            tensors = [h.to(self.device, non_blocking=True) for h in hosts]
            event = torch.cuda.Event()
            event.record(self.stream)
        return _Transfer(tensors, event)

    def finish(self, transfer: _Transfer) -> list[torch.Tensor]:
        """The copied tensors, usable on the current stream."""
        if transfer.event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(transfer.event)
            for tensor in transfer.tensors:  # allocated on the side stream, used (and freed) on this one
                tensor.record_stream(stream)
        return transfer.tensors


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed block being recomputed). torch has no public
    query for it; ``_current_graph_task_id`` is what ``torch.autograd.graph``'s own hooks use."""
    return torch._C._current_graph_task_id() != -1


class _LoadBeforeBackward(torch.autograd.Function):
    """Identity on a block's outputs; its backward runs before the block's own and loads the block."""

    @staticmethod
    def forward(ctx: Any, swap: "BlockSwap", index: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.swap, ctx.index = swap, index
        ctx.set_materialize_grads(False)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        ctx.swap.before_backward(ctx.index)
        return (None, None, *grads)


class BlockSwap:
    """Swap the frozen tensors of the last ``count`` of ``blocks`` (in the order they run) between the host and the
    device. At most two swapped blocks are on the device at a time: the one running and the one prefetched.

    Use: ``swap = BlockSwap(blocks, count, DevicePair(device), dtype)`` on the loaded model (still on the CPU); move
    the rest inside ``with swap.held_back(model): model.to(device)``; attach LoRA; then :meth:`install`."""

    def __init__(self, blocks: list[nn.Module], count: int, pair: DevicePair, dtype: torch.dtype) -> None:
        if not 0 < count <= len(blocks):
            raise ValueError(f"count must be in 1..{len(blocks)}, got {count}")
        self.blocks, self.pair, self.dtype = list(blocks), pair, dtype
        self.first = len(blocks) - count  # blocks[first:] are swapped
        self.loaded: set[int] = set()
        self.pending: dict[int, _Transfer] = {}
        self.tensors: dict[int, list[_Slot]] = {}  # index -> the block's swapped tensors
        self.loads = 0  # how many block loads were done (benchmarks and tests read it)
        self._handles: list[Any] = []

    @property
    def swapped(self) -> list[nn.Module]:
        return self.blocks[self.first:]

    @contextmanager
    def held_back(self, root: nn.Module) -> Iterator[None]:
        """Detach the swapped blocks from ``root`` for the duration (to move the rest with ``root.to(device)``)."""
        swapped = {id(b) for b in self.swapped}
        slots = [(parent, name, child) for parent in root.modules() for name, child in parent._modules.items()
                 if child is not None and id(child) in swapped]
        for parent, name, _ in slots:
            parent._modules[name] = None
        try:
            yield
        finally:
            for parent, name, child in slots:
                parent._modules[name] = child

    def install(self) -> None:
        """Move the swapped blocks' trainable tensors to the device, keep their frozen ones as host copies only, and
        register the hooks that load, prefetch and drop blocks."""
        device = self.pair.device
        for index in range(self.first, len(self.blocks)):
            entries, seen = [], set()
            for module in self.blocks[index].modules():
                for store in (module._parameters, module._buffers):
                    for name, tensor in store.items():
                        if tensor is None or id(tensor) in seen:
                            continue
                        seen.add(id(tensor))
                        if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                            tensor.data = tensor.data.to(device)  # LoRA: resident, where the optimizer expects it
                            continue
                        if is_quantized_weight(tensor):  # its qdata and scale, at their stored dtypes
                            entries.extend(self._swap_out(owner, name) for owner, name in _inner_slots(tensor))
                        else:
                            entries.append(self._swap_out(tensor, None))
            self.tensors[index] = entries
            # quantised wrappers rebuilt around their (device) placeholders, as accelerate's prepare would anyway
            self.blocks[index].to(device)
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(index)))
            self._handles.append(block.register_forward_hook(self._post_hook(index)))

    def _swap_out(self, owner: torch.Tensor, name: str | None) -> _Slot:
        """Keep a host copy of a plain tensor (``owner`` itself, or its attribute ``name``) and leave a placeholder
        in its place. Plain floating tensors are kept in the run's dtype, a quantised weight's as stored."""
        slot = _Slot(owner, name, owner)
        tensor = slot.get()
        cast = name is None and tensor.is_floating_point()
        slot.host = self.pair.host_copy(tensor, self.dtype if cast else tensor.dtype)
        slot.put(self.pair.placeholder(slot.host.dtype))
        return slot

    # --- the schedule --------------------------------------------------------------------------------------------
    def _pre_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if _in_backward():  # a checkpointed block recomputed: loaded already by its outputs' backward
                self._ensure(index)
                return
            self._keep_only({index, index + 1})
            self._ensure(index)
            self._prefetch(index + 1)
        return hook

    def _post_hook(self, index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not torch.is_grad_enabled() or _in_backward():
                return None
            return _mark_outputs(output, self, index)
        return hook

    def before_backward(self, index: int) -> None:
        """Block ``index``'s backward is next: load it, prefetch the block before it, drop the ones after it."""
        self._keep_only({index, index - 1})
        self._ensure(index)
        self._prefetch(index - 1)

    def _ensure(self, index: int) -> None:
        if index < self.first or index in self.loaded:
            return
        transfer = self.pending.pop(index, None) or self._start(index)
        for slot, loaded in zip(self.tensors[index], self.pair.finish(transfer)):
            slot.put(loaded)
        self.loaded.add(index)

    def _prefetch(self, index: int) -> None:
        if self.first <= index < len(self.blocks) and index not in self.loaded and index not in self.pending:
            self.pending[index] = self._start(index)

    def _start(self, index: int) -> _Transfer:
        self.loads += 1
        return self.pair.start([slot.host for slot in self.tensors[index]])

    def _keep_only(self, keep: set[int]) -> None:
        for index in [i for i in self.loaded if i not in keep]:
            for slot in self.tensors[index]:
                slot.put(self.pair.placeholder(slot.host.dtype))
            self.loaded.discard(index)
        for index in [i for i in self.pending if i not in keep]:
            del self.pending[index]


def _mark_outputs(output: Any, swap: BlockSwap, index: int) -> Any:
    """``output`` (a tensor or a tuple/list of tensors and other values) with its grad-carrying tensors passed
    through :class:`_LoadBeforeBackward`."""
    items = [output] if isinstance(output, torch.Tensor) else list(output) if isinstance(output, (tuple, list)) else []
    positions = [i for i, item in enumerate(items) if isinstance(item, torch.Tensor) and item.requires_grad]
    if not positions:
        return None
    marked = _LoadBeforeBackward.apply(swap, index, *[items[i] for i in positions])
    for position, tensor in zip(positions, marked):
        items[position] = tensor
    if isinstance(output, torch.Tensor):
        return items[0]
    return type(output)(items)


def checkpoint_offloaded(module: nn.Module, *args: Any) -> Any:
    """diffusers' ``gradient_checkpointing_func`` for ``gradient_checkpointing: offload``: torch's non-reentrant
    checkpoint, with the tensors it saves (the block's inputs) kept in CPU memory until backward.

    torch.utils.checkpoint saves a region's inputs through autograd's saved-tensor hooks from outside the region, so
    ``torch.autograd.graph.save_on_cpu`` around it offloads exactly those inputs, while the region's own activations
    are recomputed as usual; gradients stay on the device. ``pin_memory`` also makes the CPU path copy."""
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def _checkpoint_offloaded_call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


def enable_offloaded_checkpointing(model: nn.Module) -> None:
    """Make a transformers model's (already enabled) checkpointed layers keep their inputs in CPU memory, as
    :func:`checkpoint_offloaded` does. transformers has ``activation_checkpointing_enable(offload=True)`` doing the
    same, but it asks for pinned memory whenever no accelerator is present, which fails on a CPU-only machine; this
    pins only next to a CUDA device."""
    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=_checkpoint_offloaded_call)
