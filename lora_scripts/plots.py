"""The loss curve of a run as a PNG beside its ``loss.csv`` (matplotlib, headless)."""

from __future__ import annotations

import csv
from pathlib import Path


NO_MATPLOTLIB = "not drawn: pip install 'lora-scripts[demo]' (matplotlib) for loss.png"


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_loss(loss_csv: Path, title: str = "training loss") -> Path | str:
    """Plot ``loss.csv`` (columns ``step``, ``loss``) to ``loss.png`` in the same folder, per step and as a moving
    average; returns its path, or (no matplotlib: it is an extra, kept out of the trainer's and the Docker image's
    dependencies) what to install.

    A diffusion loss jumps by 10x from step to step (each sample draws its own timestep: nearly clean latents are
    easy, nearly pure noise is hard), so the trend only shows in the average."""
    try:
        import matplotlib
    except ImportError:
        return NO_MATPLOTLIB

    matplotlib.use("Agg")  # no display on a server or in CI
    import matplotlib.pyplot as plt

    loss_csv = Path(loss_csv)
    with open(loss_csv, encoding="utf-8") as fh:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh) if r.get("loss")]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps, losses = [s for s, _ in rows], [v for _, v in rows]
    window = max(1, len(rows) // 10)
    ax.plot(steps, losses, lw=0.8, alpha=0.35, label="per step")
    ax.plot(steps, moving_average(losses, window), lw=2.0, label=f"mean of the last {window} steps")
    ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = loss_csv.with_suffix(".png")
    fig.savefig(out)
    plt.close(fig)
    return out
