"""kill -9 soak: SIGKILL a real training run many times at random moments (half of them while a checkpoint is being
written), resume after each, and check the final LoRA equals an uninterrupted run bit for bit.

    .venv/bin/python benchmarks/kill9_soak.py [--kills 30] [--steps 40] [--seed 0]

Prints one row per kill (where it struck, the newest complete checkpoint afterwards, whether it was loadable) and a
verdict. The test suite runs the same check with ten kills (tests/test_safety.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    from lora_scripts.config import build_config
    from lora_scripts.testing import make_captioned_images, make_tiny_sd_model, tiny_image_config
    from lora_scripts.train.checkpoint import latest_checkpoint
    from lora_scripts.train.loop import train

    tmp = Path(tempfile.mkdtemp())
    model, data = make_tiny_sd_model(tmp / "sd"), make_captioned_images(tmp / "data", count=8)
    common = dict(max_train_steps=args.steps, save_steps=1, lora_dropout=0.1, random_flip=True, lr_scheduler="cosine",
                  logging={"tensorboard": False})
    train(build_config(tiny_image_config(model, data, tmp / "straight", **common)), show_progress=False)
    config = tmp / "killed.yaml"
    config.write_text(yaml.safe_dump(tiny_image_config(model, data, tmp / "killed", resume="latest", **common)))
    ckpts = tmp / "killed" / "checkpoints"
    env = {**os.environ, "LORA_SCRIPTS_TEST_CHECKPOINT_DELAY": "0.2", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "lora_scripts.cli", "train", "--config", str(config), "--no-progress"]
    rng = random.Random(args.seed)
    print(f"{'kill':>4}  {'moment':<22}{'latest after kill':<20}{'complete':>9}")
    kills, bad = 0, 0
    while kills < args.kills:
        before = latest_checkpoint(ckpts)
        if before is not None and int(before.name.split("-")[1]) >= args.steps - 1:
            break
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mid_write = kills % 2 == 0
        while proc.poll() is None:
            if mid_write and ckpts.exists() and any(p.name.endswith(".tmp") for p in ckpts.iterdir()):
                break
            if not mid_write and latest_checkpoint(ckpts) != before:
                time.sleep(rng.uniform(0.0, 0.3))
                break
            time.sleep(0.01)
        if proc.poll() is not None:
            break
        proc.kill()
        proc.wait()
        kills += 1
        latest = latest_checkpoint(ckpts)
        ok = latest is None or (json.loads((latest / "state.json").read_text())["step"] == int(latest.name[5:])
                                and bool(load_file(str(latest / "adapter.safetensors"))))
        bad += not ok
        print(f"{kills:>4}  {'mid-checkpoint' if mid_write else 'random':<22}{latest.name if latest else '-':<20}"
              f"{'yes' if ok else 'NO':>9}")
    final = subprocess.run(cmd, env=env, capture_output=True, text=True)
    a = load_file(str(tmp / "straight" / "straight.safetensors"))
    b = load_file(str(tmp / "killed" / "killed.safetensors"))
    same = final.returncode == 0 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    leftovers = [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    print(f"{kills} kills, {bad} incomplete 'latest', temp folders left: {len(leftovers)}, "
          f"final LoRA bit-identical to the uninterrupted run: {same}")


if __name__ == "__main__":
    main()
