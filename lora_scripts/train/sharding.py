"""``fsdp: true``: the frozen base sharded across processes with accelerate's FSDP2 plugin (``fully_shard`` per
transformer block, then the root), and what the loop needs around it: the LoRA and optimizer state gathered whole
for checkpoints and the export, and scattered back on resume (torch.distributed.checkpoint's state-dict helpers).

accelerate 1.15 turns FSDP on only for GPU-type processes: ``AcceleratorState`` picks ``DistributedType.FSDP`` when
the distributed type is MULTI_GPU / NPU / XPU / HPU…, never MULTI_CPU, so with ``cpu=True`` it silently ignores the
plugin and wraps the model in DDP. FSDP2 itself runs on gloo (torch 2.13), so on CPU processes we switch
accelerate's state to FSDP ourselves: the CPU test suite then runs the same prepare, sharding, gathering and resume
code a GPU run does.
"""

from __future__ import annotations

from typing import Any

import torch


def fsdp_plugin() -> Any:
    """accelerate's FSDP2 plugin: wrap by transformer-block class (the task names the classes once the model is
    loaded), reshard after forward (each block gathered again for backward: the memory of one block at a time)."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")


def fsdp_in_effect(accelerator: Any, plugin: Any) -> bool:
    """Whether the model will be sharded: several processes, FSDP chosen by accelerate or (CPU processes, see the
    module docstring) by us. One process: nothing to shard, the model is prepared as usual."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
    return state.distributed_type == DistributedType.FSDP


def shard_like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``target`` (this process's shard of it when ``target`` is an FSDP2 DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        return distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements)
    return full


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state gathered whole, keyed by parameter name (every process calls it; rank 0 gets it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def set_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state from :func:`full_optimizer_state`, each process keeping its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
