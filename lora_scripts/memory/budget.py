"""Where each byte of a run lives, GPU or system memory, for given memory settings: bytes held and moved, no
fudge factors.

- frozen weights: every frozen parameter and buffer in the compute dtype; with ``base_quantization`` the weights of
  the linears that get quantised (the denoiser's or LM's, and those of text encoders of 1B+ parameters; never the
  LoRA) at their quantised size: fp8 / int8 one byte per weight plus one fp32 scale per output row; nf4
  bitsandbytes' layout (half a byte per weight, an 8-bit absmax per 64 weights, an fp32 absmax per 256 of those)
  plus one dequantised copy of the largest such weight while it runs;
- ``blocks_to_swap: N``: the last N of the family's swap blocks (:meth:`Family.swap_blocks`) held in system
  memory; the GPU holds two buffers of the largest of them (the running block and the prefetched one);
- LoRA weights and gradients in fp32; optimizer states by optimizer: AdamW and schedule-free AdamW 8 bytes per
  parameter, 8-bit AdamW 2 (plus an fp32 absmax per 256; tensors under 4096 elements stay 32-bit, as
  bitsandbytes does), Adafactor its factored second moment (rows + columns), CAME its first moment plus two
  factored statistics, Prodigy 16;
- activations and temporaries: the probed step (:mod:`.probe`); ``gradient_checkpointing: offload`` moves the
  checkpointed blocks' saved inputs to system memory and keeps two blocks' worth in flight on the GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .probe import StepPeaks

LARGE_ENCODER = 10**9  # text encoders this big (T5-XXL, Qwen2.5-VL, Qwen3-4B) are quantised with the denoiser
SETTINGS = ("gradient_checkpointing", "optimizer", "base_quantization", "blocks_to_swap", "batch_size",
            "gradient_accumulation_steps")


@dataclass
class ModelBytes:
    """What the model holds, counted from its modules (no step needed)."""

    frozen: int = 0                   # frozen parameters and buffers, compute dtype
    frozen_params: int = 0            # their element count
    quant_numel: int = 0              # weights of the linears base_quantization quantises
    quant_rows: int = 0               # their output rows (one scale each)
    quant_largest: int = 0            # elements of the largest one (dequantised while it runs)
    blocks: list[list[int]] = field(default_factory=list)  # per swap block: [frozen bytes, quant numel, quant rows]
    lora_shapes: list[list[int]] = field(default_factory=list)
    dtype_bytes: int = 2

    @property
    def lora_params(self) -> int:
        return sum(_numel(s) for s in self.lora_shapes)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelBytes":
        return cls(**data)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def count_model(modules: list[torch.nn.Module], model: torch.nn.Module, swap_blocks: list[torch.nn.Module],
                dtype: torch.dtype) -> ModelBytes:
    """Count ``modules`` (the first is the denoiser or LM; meta or fake tensors) as they would sit in ``dtype``."""
    size = torch.finfo(dtype).bits // 8
    out = ModelBytes(dtype_bytes=size)
    seen: set[int] = set()
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) in seen or getattr(tensor, "requires_grad", False):
                continue
            seen.add(id(tensor))
            out.frozen += tensor.numel() * (size if tensor.is_floating_point() else tensor.element_size())
            out.frozen_params += tensor.numel()
    quantised = [m for i, m in enumerate(modules)
                 if i == 0 or sum(p.numel() for p in m.parameters()) >= LARGE_ENCODER]
    linear_ids: set[int] = set()
    for module in quantised:
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear) and not layer.weight.requires_grad and id(layer) not in linear_ids:
                linear_ids.add(id(layer))
                out.quant_numel += layer.weight.numel()
                out.quant_rows += layer.weight.shape[0]
                out.quant_largest = max(out.quant_largest, layer.weight.numel())
    for block in swap_blocks:
        frozen = sum(t.numel() * size for t in (*block.parameters(), *block.buffers())
                     if not t.requires_grad and t.is_floating_point())
        layers = [m for m in block.modules() if isinstance(m, torch.nn.Linear) and id(m) in linear_ids]
        out.blocks.append([frozen, sum(m.weight.numel() for m in layers), sum(m.weight.shape[0] for m in layers)])
    out.lora_shapes = [list(p.shape) for p in model.parameters() if p.requires_grad]
    return out


def quantised_bytes(numel: int, rows: int, quantization: str) -> int:
    """Bytes of ``numel`` weights in ``rows`` output rows stored as ``quantization``."""
    if quantization in ("fp8", "int8"):
        return numel + 4 * rows
    if quantization == "nf4":  # bitsandbytes Linear4bit: blocksize 64, double-quantised absmax
        blocks = -(-numel // 64)
        return -(-numel // 2) + blocks + 4 * -(-blocks // 256)
    raise ValueError(quantization)


def optimizer_bytes(name: str, shapes: list[list[int]]) -> int:
    """Optimizer state bytes for fp32 parameters of ``shapes``."""
    total = 0
    for shape in shapes:
        n = _numel(shape)
        factored = len(shape) >= 2 and min(shape[-1], shape[-2]) > 1
        rows_cols = 4 * (_numel(shape[:-1]) + _numel(shape[:-2] + shape[-1:])) if factored else 4 * n
        if name in ("adamw", "schedule_free_adamw"):
            total += 8 * n
        elif name in ("adamw8bit", "paged_adamw8bit"):
            total += 2 * n + 8 * -(-n // 256) if n >= 4096 else 8 * n
        elif name == "adafactor":
            total += rows_cols
        elif name == "came":
            total += 4 * n + 2 * rows_cols
        else:  # prodigy: exp_avg, exp_avg_sq, s, p0
            total += 16 * n
    return total


def place(model: ModelBytes, step: StepPeaks, settings: dict[str, Any], on_gpu: bool
          ) -> tuple[dict[str, int], dict[str, int]]:
    """(GPU parts, system-memory parts) of a run with ``settings`` (the keys of :data:`SETTINGS`); ``step`` is
    the probe with the same checkpointing (on for ``offload``) at ``settings['batch_size']``. Without a GPU every
    part is in system memory and swap/offload change nothing."""
    quant = settings.get("base_quantization", "none")
    swap = int(settings.get("blocks_to_swap", 0)) if on_gpu else 0
    offload = settings.get("gradient_checkpointing") == "offload" and on_gpu
    size = model.dtype_bytes

    def stored(frozen: int, numel: int, rows: int) -> int:
        return frozen if quant == "none" else frozen - numel * size + quantised_bytes(numel, rows, quant)

    swapped = model.blocks[len(model.blocks) - swap:] if swap else []
    swapped_bytes = sum(stored(*b) for b in swapped)
    gpu: dict[str, int] = {}
    system: dict[str, int] = {}
    gpu["frozen weights" + (f" ({quant})" if quant != "none" else "")] = (
        stored(model.frozen, model.quant_numel, model.quant_rows) - swapped_bytes)
    if quant != "none":
        gpu["dequantised weight in use"] = model.quant_largest * size
    if swapped:
        gpu[f"swap buffers (2 of {swap} blocks)"] = 2 * max(stored(*b) for b in swapped)
        system[f"swapped blocks ({swap})"] = swapped_bytes
    lora = 4 * model.lora_params
    gpu["LoRA weights"] = lora
    gpu["LoRA gradients"] = lora
    gpu[f"optimizer states ({settings.get('optimizer', 'adamw')})"] = optimizer_bytes(
        settings.get("optimizer", "adamw"), model.lora_shapes)
    if offload:
        resident = max(step.peak_resident.values(), default=0)
        gpu["activations and temporaries"] = resident + 2 * step.offload_block
        system["offloaded activations"] = step.offloaded
    else:
        gpu.update(step.parts())
    if not on_gpu:
        return {}, {**gpu, **system}
    return gpu, system
