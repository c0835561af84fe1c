"""The small protocol a task implements so that one training loop serves images and text.

The loop owns everything that is the same for every task: accelerate, the optimizer, the schedule, accumulation,
checkpoints, resume, logging. A task owns its data, its model and its loss. If the loop ever needs
``if task == ...``, a method is missing here.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch.utils.data import Dataset

    from ..config import TrainConfig


@dataclass
class DataSummary:
    """Result of the data check that runs before any model is loaded."""

    num_samples: int
    dataset_hash: str
    description: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunInfo:
    """Facts about a finished run that exports record as metadata and provenance."""

    started_at: float
    finished_at: float
    steps: int
    epoch: int
    num_samples: int
    dataset_hash: str
    config_json: str
    version: str

    def provenance(self) -> dict[str, str]:
        return {
            "lora_scripts_version": self.version,
            "lora_scripts_dataset_hash": self.dataset_hash,
            "lora_scripts_config": self.config_json,
        }


SampleKey = tuple[int, int]
"""What the loop asks a dataset for: (sample index, per-sample seed).

The per-sample seed drives every random draw for that sample (crop, flip, noise, timestep), so results do not depend
on how samples are split across batches, processes or resumed runs.
"""


class Task(ABC):
    """One kind of LoRA training (image, text)."""

    name: str = "task"

    def __init__(self, cfg: "TrainConfig") -> None:
        self.cfg = cfg

    # --- before any model is loaded ------------------------------------------------------------------------------
    @abstractmethod
    def check_base_model(self) -> None:
        """Raise ConfigError if ``base_model`` cannot be what this task loads (cheap path checks only)."""

    @abstractmethod
    def check_data(self) -> DataSummary:
        """Read and validate all training data; raise DataError naming the file and line."""

    # --- model and data ------------------------------------------------------------------------------------------
    @abstractmethod
    def load_model(self, device: "torch.device", weight_dtype: "torch.dtype") -> "torch.nn.Module":
        """Load the frozen base model, attach LoRA and return the module whose trainable parameters are LoRA."""

    @abstractmethod
    def enable_gradient_checkpointing(self, model: "torch.nn.Module") -> None:
        """Turn on activation checkpointing in the trainable module."""

    @abstractmethod
    def dataset(self, summary: DataSummary) -> "Dataset":
        """A map-style dataset indexed by :data:`SampleKey`."""

    @abstractmethod
    def collate(self, items: list[Any]) -> dict[str, Any]:
        """Stack dataset items into a batch."""

    @abstractmethod
    def loss_count(self, batch: dict[str, Any]) -> int:
        """How many loss elements (samples, or label tokens) a micro-batch holds; read from the batch, no forward."""

    @abstractmethod
    def loss(self, model: "torch.nn.Module", batch: dict[str, Any]) -> "torch.Tensor":
        """The *sum* of per-element losses of one micro-batch.

        The loop divides by the element count of the whole accumulated global batch (from :meth:`loss_count`), so
        the gradient does not depend on how that batch is split into micro-batches or processes.
        """

    def memory_probe(self) -> tuple[list["torch.nn.Module"], "torch.nn.Module", Any]:
        """For the memory estimate: (all modules built on the meta device from config files only, the trainable
        module with LoRA attached, ``make_batch(batch_size)`` returning a worst-case batch). Sets up whatever
        :meth:`loss` reads. No weights are loaded."""
        raise NotImplementedError

    # --- optional hooks (defaults: nothing) ----------------------------------------------------------------------
    def swap_blocks(self, model: "torch.nn.Module") -> list["torch.nn.Module"]:
        """The blocks ``blocks_to_swap`` can keep in system memory, in the order they run (none by default)."""
        return []

    def epoch_order(self, epoch: int, seed: int, global_batch: int) -> "np.ndarray | None":
        """A custom sample order for ``epoch`` (grouped by length or bucket), or None for a seeded shuffle.

        Consecutive runs of ``global_batch`` entries form one batch across all processes."""
        return None

    def param_groups(self, model: "torch.nn.Module") -> "list[dict[str, Any]] | None":
        """Optimizer parameter groups with their own settings (e.g. a text-encoder learning rate), or None for one
        group of every trainable parameter at ``learning_rate``."""
        return None

    def shard_classes(self, model: "torch.nn.Module") -> list[str]:
        """``fsdp``: class names of the blocks FSDP shards one by one (each gathered just before it runs)."""
        from ..errors import ConfigError

        raise ConfigError(f"fsdp: the {self.name} task cannot shard its model; remove fsdp")

    def validation_dataset(self) -> "Dataset | None":
        """Held-out samples (keyed like :meth:`dataset`) whose mean loss is logged as ``eval_loss``."""
        return None

    def step_metrics(self) -> dict[str, float]:
        """Extra scalars of the steps since the last call (e.g. preference rewards and margins), logged with the
        loss to TensorBoard, W&B and ``logs/metrics.jsonl``; the task resets them when asked."""
        return {}

    def generate_samples(self, model: "torch.nn.Module") -> list[tuple[str, Any]]:
        """(label, output) for each configured sample prompt; output is a str (text) or a PIL image (image)."""
        return []

    def export_warnings(self) -> list[str]:
        """What consumers of the exported files cannot apply as trained (written to training_summary.json)."""
        return []

    # --- output --------------------------------------------------------------------------------------------------
    @abstractmethod
    def export(self, model: "torch.nn.Module", output_dir: Path, run: RunInfo) -> list[Path]:
        """Write the final LoRA in the formats the ecosystem loads; return the files written."""


HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def require_hub_id(value: str, what: str = "base_model") -> None:
    """For a ``value`` that is not an existing path: accept a hub id (``org/name``), else say it was not found."""
    looks_like_path = value.startswith((".", "/", "~")) or "\\" in value or value.count("/") != 1
    if looks_like_path or not HUB_ID_RE.match(value):
        from ..errors import ConfigError

        raise ConfigError(f"{what} not found: '{value}' (no such folder, and not a hub id like org/name)")


def make_task(cfg: "TrainConfig") -> Task:
    """The task named by ``cfg.task``."""
    if cfg.task == "image":
        from .image import ImageTask

        return ImageTask(cfg)
    from .text import TextTask

    return TextTask(cfg)
