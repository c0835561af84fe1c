"""Shared fixtures: a tiny Stable Diffusion model (built once per session) and small captioned image sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _estimate_cache(tmp_path_factory, monkeypatch):
    """Memory estimates are cached in a per-session folder, never in the user's ~/.cache."""
    if "LORA_SCRIPTS_ESTIMATE_CACHE" not in os.environ:
        monkeypatch.setenv("LORA_SCRIPTS_ESTIMATE_CACHE", str(tmp_path_factory.getbasetemp() / "estimate-cache"))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from lora_scripts.testing import make_tiny_sd_model

    return make_tiny_sd_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from lora_scripts.testing import make_tiny_sdxl_model

    return make_tiny_sdxl_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture()
def image_data(tmp_path) -> Path:
    from lora_scripts.testing import make_captioned_images

    return make_captioned_images(tmp_path / "data", count=6)


@pytest.fixture()
def make_cfg(tiny_sd, image_data, tmp_path):
    """Build a validated config for the tiny model; keyword arguments override keys."""
    from lora_scripts.config import build_config
    from lora_scripts.testing import tiny_image_config

    def make(output: str = "out", **overrides):
        return build_config(tiny_image_config(tiny_sd, image_data, tmp_path / output, **overrides))

    return make


@pytest.fixture()
def write_config(tiny_sd, image_data, tmp_path):
    """Write a YAML config for the tiny model and return its path."""
    from lora_scripts.testing import tiny_image_config

    def write(name: str = "cfg.yaml", output: str = "out", **overrides) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tiny_image_config(tiny_sd, image_data, tmp_path / output, **overrides)))
        return path

    return write


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny-model tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): one intra-op thread
    is fastest for them, and on a busy machine much faster than several."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
