"""Time of one AdamW step over the LoRA tensors of the image benchmark's UNet: torch's default (a Python loop over
tensors on CPU), foreach and fused, alternated, in CPU time.

    PYTHONPATH=. python benchmarks/optimizer_step.py [--repeats 30] [--threads 1]

Why ``make_optimizer`` asks for ``fused=True``. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig

    from image_speed import MODELS, TARGETS, build_modules

    torch.set_num_threads(args.threads)
    unet, _ = build_modules(MODELS["small"])
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    variants = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizers = {k: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kw) for k, kw in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, opt in optimizers.items():
            t0 = time.process_time()
            opt.step()
            times[name].append(time.process_time() - t0)
    print(f"AdamW step over {len(params)} LoRA tensors ({sum(p.numel() for p in params)} values), "
          f"{args.threads} thread(s), median CPU ms of {args.repeats}:")
    for name, values in times.items():
        print(f"  {name:<8} {statistics.median(values[3:]) * 1e3:.2f}")


if __name__ == "__main__":
    main()
