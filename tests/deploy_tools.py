"""Where the deployment linters live (``make tools`` installs them under .tools/) and how tests call them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".tools"
_PATHS = {
    "checkov": TOOLS / "venv" / "bin" / "checkov",
    "kubernetes-validate": TOOLS / "venv" / "bin" / "kubernetes-validate",
    "hadolint": TOOLS / "venv" / "bin" / "hadolint",
    "yamllint": TOOLS / "venv" / "bin" / "yamllint",
    "npm-groovy-lint": TOOLS / "npm" / "node_modules" / ".bin" / "npm-groovy-lint",
}


def tool(name: str) -> str:
    """The path of linter ``name``; skips the test (with the way to get it) when it is not installed."""
    path = _PATHS[name]
    if not path.exists():
        pytest.skip(f"{name} is not installed: run `make tools` (make test does)")
    if name == "npm-groovy-lint" and shutil.which("java") is None:
        pytest.skip("npm-groovy-lint needs a Java runtime: apt-get install default-jre-headless (.ci/run does)")
    return str(path)


def run_tool(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run linter ``name`` from the repository root and return the finished process (output as text)."""
    return subprocess.run([tool(name), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
