"""Atomic, resumable training checkpoints: ``<output_dir>/checkpoints/step-<N>/``.

A checkpoint is written into ``step-<N>.tmp`` beside its target, every file fsynced, then the folder is renamed.
A rename is atomic, so a folder named ``step-<N>`` is always complete and ``latest`` never points at a partial
write, even after ``kill -9`` or a power cut. Old checkpoints are pruned only after the new one is in place.

Contents: ``adapter.safetensors`` (trainable LoRA tensors by parameter name), ``optimizer.pt``, ``scheduler.pt``,
``rng_state_<rank>.pt`` (one per process), ``config.yaml`` (the resolved config) and ``state.json`` (step, epoch,
position in the epoch, batch layout).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def fsync_tree(path: Path) -> None:
    """fsync every file in a folder, then the folder itself."""
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def temp_checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}.tmp"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def remove_stale_temporaries(root: Path) -> None:
    """Delete half-written ``*.tmp`` checkpoint folders left by a killed run."""
    if root.is_dir():
        for child in root.iterdir():
            if child.name.endswith(".tmp") and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def finalize_checkpoint(tmp: Path, final: Path, state: dict[str, Any]) -> None:
    """Write ``state.json`` last, fsync everything and rename the folder into place."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    fsync_tree(tmp)
    if final.exists():  # a re-run of the same step: replace it only once the new one is complete
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def prune_checkpoints(root: Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; return the deleted folders."""
    if not keep_last:
        return []
    found = list_checkpoints(root)
    doomed = [path for _, path in found[:-keep_last]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
