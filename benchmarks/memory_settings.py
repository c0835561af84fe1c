"""What the memory settings cost and save on a small FLUX-shaped transformer with LoRA: forward + backward + AdamW
per step, for no checkpointing, ``gradient_checkpointing: true / offload`` and ``blocks_to_swap``, and
``base_quantization: int8`` without and with ``blocks_to_swap``.

    PYTHONPATH=. python benchmarks/memory_settings.py [--steps 6] [--width 256] [--tokens 1024] [--device cuda]

Columns: median s/step; peak device memory (CUDA: ``torch.cuda.max_memory_allocated``; on the CPU, where host and
device are the same memory, "-"); the peak of frozen block weights held on the device (counted from the blocks'
tensors, at their stored size, whenever a block is loaded: what block swap saves, on any device); and whether the
LoRA after the steps equals the plain run's (int8 rows: the int8 run's) bit for bit. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(width: int, double: int, single: int, int8: bool):
    """The transformer on the CPU, int8 (torchao, as ``base_quantization: int8`` stores it) if asked, with LoRA."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from lora_scripts.models.quantize import quantize_frozen

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
                                   attention_head_dim=64, num_attention_heads=width // 64, joint_attention_dim=64,
                                   pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(16, 24, 24))
    model.requires_grad_(False)
    if int8:
        quantize_frozen(model, "int8", torch.device("cpu"), torch.float32)
    model.add_adapter(LoraConfig(r=16, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"]))
    return model


def frozen_block_bytes(blocks) -> int:
    from lora_scripts.models.quantize import storage_tensors

    return sum(t.numel() * t.element_size() for b in blocks for p in b.parameters() if not p.requires_grad
               for t in storage_tensors(p))


def run(setting: str, args, device: torch.device) -> dict:
    from lora_scripts.offload import BlockSwap, DevicePair, checkpoint_offloaded

    model = build(args.width, args.double, args.single, setting.startswith("int8"))
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    swap_count = int(setting.split()[-1]) if "swap" in setting else 0
    if setting not in ("plain", "int8"):
        model.enable_gradient_checkpointing(checkpoint_offloaded if "offload" in setting else None)
    peak_block_bytes = [0]
    if swap_count:
        swap = BlockSwap(blocks, swap_count, DevicePair(device), torch.float32)
        with swap.held_back(model):
            model.to(device)
        swap.install()
        ensure = swap._ensure

        def counting(index: int) -> None:
            ensure(index)
            peak_block_bytes[0] = max(peak_block_bytes[0], frozen_block_bytes(blocks))

        swap._ensure = counting
    else:
        model.to(device)
        peak_block_bytes[0] = frozen_block_bytes(blocks)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    side = int(args.tokens ** 0.5)
    inputs = dict(hidden_states=torch.randn(1, side * side, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 64, 64, generator=g), pooled_projections=torch.randn(1, 64),
                  timestep=torch.tensor([0.5]), img_ids=torch.zeros(side * side, 3), txt_ids=torch.zeros(64, 3),
                  guidance=torch.tensor([1.0]), return_dict=False)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        out = model(**inputs)[0]
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    lora = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {
        "s_per_step": statistics.median(times[1:] or times),
        "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "block_weights_mb": peak_block_bytes[0] / 2**20,
        "lora": lora,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--width", type=int, default=256, help="a multiple of 64 (heads of 64)")
    parser.add_argument("--double", type=int, default=4)
    parser.add_argument("--single", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024, help="image tokens (a square number)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    blocks = args.double + args.single
    settings = ["plain", "checkpointing", "checkpointing offload", f"swap {blocks // 2}", f"swap {blocks}", "int8",
                f"int8 swap {blocks // 2}"]
    results = {s: run(s, args, device) for s in settings}
    print(f"FLUX-shaped transformer: {args.double} double + {args.single} single blocks, width {args.width}, "
          f"{args.tokens} image tokens + 64 text tokens, LoRA r16, batch 1, {args.steps} steps on {device}")
    print("swap N: blocks_to_swap N with gradient_checkpointing; int8: base_quantization int8")
    print(f"| {'setting':<24} | s/step | peak device MB | block weights on device MB | LoRA = plain |")
    print(f"|{'-' * 26}|--------|----------------|----------------------------|--------------|")
    for name, r in results.items():
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        reference = results["int8" if name.startswith("int8") else "plain"]["lora"]
        same = all(torch.equal(reference[k], r["lora"][k]) for k in reference)
        print(f"| {name:<24} | {r['s_per_step']:6.3f} | {peak:>14} | {r['block_weights_mb']:26.1f} | "
              f"{'yes' if same else 'no':>12} |")


if __name__ == "__main__":
    main()
