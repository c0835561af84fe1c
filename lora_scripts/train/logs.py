"""Training logs: TensorBoard events, ``loss.csv`` (for Jenkins' Plot plugin and spreadsheets), optional W&B."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from ..config import LoggingConfig
from ..errors import ConfigError

CSV_COLUMNS = ["step", "epoch", "loss", "lr", "elapsed_s", "eval_loss"]


def truncate_loss_csv(path: Path, after_step: int) -> None:
    """Drop rows past ``after_step`` (written by a run that was killed after its last checkpoint)."""
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0] != CSV_COLUMNS:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= after_step]
    if len(kept) != len(rows):
        with open(path, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(kept)


class TrainingLogger:
    """Writes scalars to every enabled sink. Only the main process creates one."""

    def __init__(self, log_dir: Path, cfg: LoggingConfig, run_config: dict[str, Any], resume_step: int | None):
        self.cfg = cfg
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        self._tb = None
        self._wandb = None
        self._csv = None
        if cfg.loss_csv:
            self.csv_path = log_dir / "loss.csv"
            if resume_step is not None:
                truncate_loss_csv(self.csv_path, resume_step)
            else:
                self.csv_path.unlink(missing_ok=True)
            new = not self.csv_path.exists()
            self._csv = open(self.csv_path, "a", newline="", encoding="utf-8")
            self._csv_writer = csv.writer(self._csv)
            if new:
                self._csv_writer.writerow(CSV_COLUMNS)
            self.files.append(self.csv_path)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(log_dir), purge_step=(resume_step + 1) if resume_step else None)
            self.files.append(log_dir)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("logging.wandb: true needs the wandb package (pip install wandb)") from None
            self._wandb = wandb.init(project=cfg.wandb_project or "lora-scripts", config=run_config, resume="allow")

    def log_step(
        self, step: int, epoch: int, loss: float, lr: float, elapsed_s: float, eval_loss: float | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        if self._csv is not None:
            eval_text = "" if eval_loss is None else f"{eval_loss:.6g}"
            self._csv_writer.writerow([step, epoch, f"{loss:.6g}", f"{lr:.6g}", f"{elapsed_s:.2f}", eval_text])
            self._csv.flush()
        scalars = {"train/loss": loss, "train/lr": lr}
        if eval_loss is not None:
            scalars["eval/loss"] = eval_loss
        if metrics:  # task scalars (preference rewards/margins): TensorBoard, W&B and one JSON line per step
            scalars.update({f"train/{k}": v for k, v in metrics.items()})
            path = self.log_dir / "metrics.jsonl"
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "loss": loss, **metrics}) + "\n")
            if path not in self.files:
                self.files.append(path)
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log({**scalars, "epoch": epoch}, step=step)

    def log_samples(self, step: int, samples: list[tuple[str, Any]]) -> None:
        """Text samples to ``logs/samples.txt``, images to ``<output_dir>/samples/``; both to TensorBoard."""
        text_path = self.log_dir / "samples.txt"
        image_dir = self.log_dir.parent / "samples"
        for i, (label, value) in enumerate(samples):
            if isinstance(value, str):
                with open(text_path, "a", encoding="utf-8") as fh:
                    fh.write(f"--- step {step} | prompt: {label!r}\n{value}\n")
                if text_path not in self.files:
                    self.files.append(text_path)
                if self._tb is not None:
                    self._tb.add_text(f"samples/{i}", f"**{label}**\n\n{value}", step)
            else:  # a PIL image
                import numpy as np

                image_dir.mkdir(parents=True, exist_ok=True)
                path = image_dir / f"step-{step:06d}-{i}.png"
                value.save(path)
                if image_dir not in self.files:
                    self.files.append(image_dir)
                if self._tb is not None:
                    self._tb.add_image(f"samples/{i}", np.asarray(value.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __del__(self) -> None:  # pragma: no cover - best effort on crashes
        try:
            self.close()
        except Exception:
            pass


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MB (Linux/macOS), or peak CUDA memory when on a GPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 1024
    except (ImportError, AttributeError):
        return float("nan")
