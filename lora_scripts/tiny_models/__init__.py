"""Tiny models of the transformer image families, built from config objects in seconds (tests, the demo and
benchmarks). One module per family, each with ``make_tiny_model(folder, seed=0) -> Path`` (a diffusers folder with
``model_index.json``, loadable by the family's pipeline) and ``write_single_file(model_dir, path) -> Path`` (the
transformer in the family's original single-file layout, as the model is downloaded)."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType


def tiny_family_module(family: str) -> ModuleType:
    """The tiny-model module of ``family`` (``flux``, ``sd3``…); ImportError if there is none."""
    return importlib.import_module(f"{__name__}.{family}")


def make_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny ``family`` model in the diffusers layout to ``folder``."""
    return tiny_family_module(family).make_tiny_model(Path(folder), seed=seed)
