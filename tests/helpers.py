"""Helpers for tests that run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``lora-scripts ARGS`` as a user would (through ``python -m lora_scripts.cli``)."""
    return subprocess.run(
        [sys.executable, "-m", "lora_scripts.cli", *args], cwd=cwd, env=cli_env(),
        capture_output=True, text=True, timeout=timeout,
    )


def assert_same_tensors(a: Path, b: Path, atol: float = 0.0) -> None:
    """Two safetensors files hold the same keys and (within ``atol``) the same values."""
    import torch

    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        if atol == 0.0:
            assert torch.equal(ta[key], tb[key]), f"{key} differs: max {(ta[key] - tb[key]).abs().max()}"
        else:
            torch.testing.assert_close(ta[key], tb[key], atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")


def run_torchrun(config: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N train.py --config CONFIG`` on CPU (gloo), as a user would launch it."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         str(REPO_ROOT / "train.py"), "--config", str(config), "--no-progress"],
        env=cli_env(), capture_output=True, text=True, timeout=400,
    )
