"""The loss curve of a run as a PNG beside its ``loss.csv`` (matplotlib, headless)."""

from __future__ import annotations

import csv
from pathlib import Path


NO_MATPLOTLIB = "not drawn: pip install 'lora-scripts[demo]' (matplotlib) for loss.png"


def plot_loss(loss_csv: Path, title: str = "training loss") -> Path | str:
    """Plot ``loss.csv`` (columns ``step``, ``loss``) to ``loss.png`` in the same folder; returns its path, or (no
    matplotlib: it is an extra, kept out of the trainer's and the Docker image's dependencies) what to install."""
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
    ax.plot([s for s, _ in rows], [v for _, v in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = loss_csv.with_suffix(".png")
    fig.savefig(out)
    plt.close(fig)
    return out
