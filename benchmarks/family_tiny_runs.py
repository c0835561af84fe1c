"""Every image family's tiny model trained through the CLI, side by side: s/step (median over the run) and peak
memory, from each run's ``training_summary.json``.

    PYTHONPATH=. python benchmarks/family_tiny_runs.py [--steps 8] [--families flux chroma ...] [--print-only]

Each family runs in a fresh process on the same 8 captioned 32 px images, batch 2, rank 4, `text_max_length` 16.
Writes its table into docs/BENCHMARKS.md unless ``--print-only``. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_common import child_env, command_line, machine_info, publish  # noqa: E402


def run_family(family: str, root: Path, data: Path, steps: int) -> dict:
    from lora_scripts.testing import make_tiny_sd_model, tiny_image_config
    from lora_scripts.tiny_models import make_tiny_model

    model = root / f"tiny-{family}"
    if family == "sd1":
        make_tiny_sd_model(model)
    else:
        make_tiny_model(family, model)
    raw = tiny_image_config(model, data, root / f"out-{family}", max_train_steps=steps, save_steps=steps,
                            text_max_length=16, logging={"tensorboard": False})
    config = root / f"{family}.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "lora_scripts.cli", "train", "--config", str(config), "--no-progress"],
                   check=True, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((root / f"out-{family}" / "training_summary.json").read_text(encoding="utf-8"))


def main() -> None:
    from lora_scripts.tasks.image.families import NAMES
    from lora_scripts.testing import make_captioned_images
    from lora_scripts.tiny_models import tiny_family_module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--families", nargs="*", default=None)
    parser.add_argument("--print-only", action="store_true")
    args = parser.parse_args()
    families = args.families
    if families is None:
        families = ["sd1"]
        for name in NAMES:
            try:
                tiny_family_module(name)
                families.append(name)
            except ImportError:
                pass
    root = Path(tempfile.mkdtemp(prefix="family-runs-"))
    data = make_captioned_images(root / "data", count=8)
    rows = ["| family | s/step (median) | peak memory (MB) | final loss |", "|---|---|---|---|"]
    for family in families:
        summary = run_family(family, root, data, args.steps)
        rows.append(f"| {family} | {summary['seconds_per_step']:.3f} | {summary['peak_memory_mb']:.0f} | "
                    f"{summary['final_loss']:.4f} |")
    header = ["## Image families: tiny models", "", f"`{command_line()}`", "", machine_info()]
    publish("Image families: tiny models", header, rows, [], args.print_only)


if __name__ == "__main__":
    main()
