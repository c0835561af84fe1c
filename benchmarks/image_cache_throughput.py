"""Images/s of image-LoRA training with and without the latent / text-embedding caches, on the demo model.

    .venv/bin/python benchmarks/image_cache_throughput.py [--epochs 8] [--repeats 3] [--resolution 64]

Trains the tiny demo model on 12 synthetic images for --epochs epochs per run (batch 4), three modes alternating so
machine noise hits them alike: no cache, cache_latents, cache_latents + cache_text_embeddings. Images/s counts time
in training steps; the one-off cache build is reported separately (each run starts with an empty cache). Prints
medians and ratios. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

MODES = {"no cache": {}, "latents": {"cache_latents": True},
         "latents+text": {"cache_latents": True, "cache_text_embeddings": True}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()

    from lora_scripts.cli import quiet_libraries
    from lora_scripts.config import build_config
    from lora_scripts.testing import make_captioned_images, make_tiny_sd_model, tiny_image_config
    from lora_scripts.train.loop import Trainer

    quiet_libraries()
    tmp = Path(tempfile.mkdtemp())
    model = make_tiny_sd_model(tmp / "tiny-sd")
    data = make_captioned_images(tmp / "data", count=12, size=args.resolution + 16)
    speed: dict[str, list[float]] = {m: [] for m in MODES}
    build: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(args.repeats):
        for mode, extra in MODES.items():
            cfg = build_config(tiny_image_config(
                model, data, tmp / f"out-{rep}-{mode}", batch_size=4, max_train_steps=None, epochs=args.epochs,
                save_steps=0, resolution=args.resolution, logging={"tensorboard": False, "loss_csv": False}, **extra))
            trainer = Trainer(cfg, show_progress=False)
            t0 = time.perf_counter()
            result = trainer.run()
            wall = time.perf_counter() - t0
            images = result.steps * trainer.plan.samples_per_step
            speed[mode].append(images / result.extra["train_seconds"])
            build[mode].append(wall - result.extra["train_seconds"])
    base = statistics.median(speed["no cache"])
    print(f"{args.epochs} epochs x 12 images at {args.resolution}px, batch 4, {args.repeats} runs per mode (medians)")
    print(f"{'mode':<14}{'images/s':>10}{'vs no cache':>13}{'set-up+cache s':>16}")
    for mode in MODES:
        med = statistics.median(speed[mode])
        print(f"{mode:<14}{med:>10.1f}{med / base:>12.2f}x{statistics.median(build[mode]):>16.2f}")


if __name__ == "__main__":
    main()
