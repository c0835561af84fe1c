"""Small steps of deploy/jenkins/Jenkinsfile that are easier to get right (and to test) in Python than in sh.

    python deploy/jenkins/pipeline_helpers.py output-dir CONFIG      print the config's output_dir, relative to here
    python deploy/jenkins/pipeline_helpers.py fits ESTIMATE_TXT      exit 1 if `lora-scripts estimate` says it won't fit
    python deploy/jenkins/pipeline_helpers.py loss-summary LOSS_CSV OUT_CSV   one row for the Plot plugin

Run with the pipeline's venv (the project installed) from the workspace root.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path


def output_dir(config: str) -> int:
    """The output_dir the trainer will use (``--set`` overrides aside), as a path relative to the working directory
    (the Jenkins workspace). Outside it the pipeline could neither archive nor plot the results: refuse."""
    from lora_scripts.config import load_config
    from lora_scripts.errors import UserError

    try:
        out = load_config(config).output_dir
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    here = Path.cwd().resolve()
    try:
        print(out.resolve().relative_to(here).as_posix())
    except ValueError:
        print(f"error: output_dir '{out}' is outside the workspace {here}: Jenkins archives and plots only workspace "
              "files; use a relative output_dir such as ./output/my_lora", file=sys.stderr)
        return 2
    return 0


# `lora-scripts estimate` prints MemoryEstimate.render(): "  total   12.3 GiB" and, with a GPU, "  available  ..."
_LINE = re.compile(r"^\s+(total|available)\s+([\d.]+) (GiB|MiB)\s*$")


def fits(estimate_txt: str) -> int:
    """Exit 0 if the estimated total fits the free GPU memory the estimate saw, 1 if not, 2 if no GPU was seen."""
    values = {}
    for line in Path(estimate_txt).read_text(encoding="utf-8").splitlines():
        match = _LINE.match(line)
        if match:
            values[match.group(1)] = float(match.group(2)) * (2**30 if match.group(3) == "GiB" else 2**20)
    if "total" not in values:
        print(f"error: no 'total' line in {estimate_txt}: is this `lora-scripts estimate` output?", file=sys.stderr)
        return 2
    if "available" not in values:
        print("error: the estimate saw no GPU on this agent (no 'available' line): check the node's driver and "
              "CUDA_VISIBLE_DEVICES", file=sys.stderr)
        return 2
    need, free = values["total"] / 2**30, values["available"] / 2**30
    if values["total"] > values["available"]:
        print(f"error: the run needs about {need:.1f} GiB but {free:.1f} GiB is free on this GPU; see the "
              "recommendation above, or rebuild with FORCE to train anyway", file=sys.stderr)
        return 1
    print(f"pre-flight: about {need:.1f} GiB needed, {free:.1f} GiB free")
    return 0


def loss_summary(loss_csv: str, out_csv: str) -> int:
    """Write ``final_loss,min_loss,steps`` (one row) from a ``logs/loss.csv``. The Plot plugin plots one point per
    build and series, so a whole per-step curve would collapse anyway: this gives the trend across builds."""
    rows = []
    with open(loss_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                rows.append((float(row["step"]), float(row["loss"])))
            except (KeyError, TypeError, ValueError):
                continue
    if not rows:
        print(f"error: no step,loss rows in {loss_csv}", file=sys.stderr)
        return 1
    with open(out_csv, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["final_loss", "min_loss", "steps"])
        writer.writerow([rows[-1][1], min(loss for _, loss in rows), int(rows[-1][0])])
    return 0


def main(argv: list[str]) -> int:
    commands = {"output-dir": (output_dir, 1), "fits": (fits, 1), "loss-summary": (loss_summary, 2)}
    if not argv or argv[0] not in commands or len(argv) - 1 != commands[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    func, _ = commands[argv[0]]
    return func(*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
