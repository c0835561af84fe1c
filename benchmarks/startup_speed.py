"""Start-up speed: ``lora-scripts --help`` and the time from starting ``lora-scripts demo`` to its first step.

    PYTHONPATH=. python benchmarks/startup_speed.py [--repeats 5]

``--help`` runs the same code as the installed ``lora-scripts`` entry point, in a fresh interpreter each time (median
of ``--repeats``; a bare ``python -c pass`` is shown for scale). The demo's first step is read from
``training_summary.json`` (``first_step_finished_at``, a unix time) against the launch time, in a fresh output folder
each run, so it includes building the tiny model and data, loading it and the data check. Writes its table into
docs/BENCHMARKS.md. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_common import child_env, command_line, machine_info, spread, write_section  # noqa: E402

ENTRY = "import sys; from lora_scripts.cli import main; sys.exit(main())"  # what the console script runs


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL, env=child_env())
    return time.perf_counter() - t0


def demo_first_step(task: str, steps: int) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(prefix="demo-start-"))
    t0 = time.time()
    subprocess.run([sys.executable, "-c", ENTRY, "demo", "--task", task, "--output-dir", str(out), "--steps",
                    str(steps)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    summary = out / ("lora" if task == "image" else "text_lora") / "training_summary.json"
    data = json.loads(summary.read_text())
    return data["first_step_finished_at"] - t0, data["first_step_cpu_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()

    probe = subprocess.run([sys.executable, "-c", "import sys; from lora_scripts.cli import build_parser; "
                            "build_parser(); print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') "
                            "if m in sys.modules))"], capture_output=True, text=True, env=child_env(), check=True)
    python, helps, train_helps, image, text = [], [], [], [], []
    for _ in range(args.repeats):  # alternated, like the other benchmarks
        python.append(timed(["-c", "pass"]))
        helps.append(timed(["-c", ENTRY, "--help"]))
        train_helps.append(timed(["-c", ENTRY, "train", "--help"]))
    for _ in range(max(2, args.repeats // 2)):
        image.append(demo_first_step("image", 3))
        text.append(demo_first_step("text", 3))
    image_cpu, text_cpu = [c for _, c in image], [c for _, c in text]
    image, text = [w for w, _ in image], [w for w, _ in text]
    text_out = "\n".join([
        "### Start-up",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine_info()}  ",
        f"Medians (min–max) of {args.repeats} fresh processes ({len(image)} for the demos). Heavy libraries imported "
        f"by building the CLI parser: {probe.stdout.strip()}.",
        "",
        "| what | seconds (wall) | CPU seconds of the process | target |",
        "|---|---:|---:|---:|",
        f"| `python -c pass` (interpreter alone) | {spread(python, '{:.3f}')} | | |",
        f"| `lora-scripts --help` | {spread(helps, '{:.3f}')} | | < 0.5 |",
        f"| `lora-scripts train --help` | {spread(train_helps, '{:.3f}')} | | < 0.5 |",
        f"| `lora-scripts demo`: start to first step done | {spread(image, '{:.2f}')} | {spread(image_cpu, '{:.2f}')} "
        "| < 10 |",
        f"| `lora-scripts demo --task text`: start to first step done | {spread(text, '{:.2f}')} | "
        f"{spread(text_cpu, '{:.2f}')} | |",
    ])
    print(text_out)
    if not args.no_doc:
        write_section("startup", text_out)


if __name__ == "__main__":
    main()
