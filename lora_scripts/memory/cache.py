"""Estimate results on disk, per (model fingerprint, settings): a repeated ``estimate`` or the pre-flight of a
``train`` that was estimated before answers without building the model.

Where: ``$LORA_SCRIPTS_ESTIMATE_CACHE`` or ``~/.cache/lora-scripts/estimate/`` (``$XDG_CACHE_HOME`` respected).
The model fingerprint hashes the configs the model is built from (every ``*.json`` of a diffusers / transformers
folder, a single file's safetensors header), never the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

VERSION = 1  # bump when what is measured changes


def cache_dir() -> Path:
    if os.environ.get("LORA_SCRIPTS_ESTIMATE_CACHE"):
        return Path(os.environ["LORA_SCRIPTS_ESTIMATE_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lora-scripts" / "estimate"


def _hash_path(digest: Any, path: Path) -> None:
    if path.is_dir():
        for child in sorted(path.rglob("*.json")):
            if child.stat().st_size < 4 * 2**20:
                digest.update(str(child.relative_to(path)).encode())
                digest.update(child.read_bytes())
    elif path.is_file():
        with open(path, "rb") as fh:
            head = fh.read(8)
            if path.suffix == ".safetensors" and len(head) == 8:
                digest.update(fh.read(min(int.from_bytes(head, "little"), 64 * 2**20)))
            else:
                stat = path.stat()
                digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        digest.update(str(path).encode())  # a hub id


def fingerprint(cfg: Any) -> str:
    """Hash of what the estimate's model is built from: the base model's configs and the component paths."""
    digest = hashlib.sha256()
    for key in ("base_model", "base_model_config", "vae_path", "text_encoder_path", "text_encoder_2_path",
                "text_encoder_3_path"):
        value = getattr(cfg, key, None)
        if value is not None:
            digest.update(key.encode())
            _hash_path(digest, Path(str(value)).expanduser())
    return digest.hexdigest()[:24]


def cache_key(cfg: Any, extra: dict[str, Any]) -> str:
    import torch

    from .. import __version__

    # every key that shapes the step, except the ones the estimate varies itself (see budget.SETTINGS)
    fields = ("task", "model_family", "lora_rank", "lora_alpha", "target_modules", "use_dora", "use_rslora",
              "conv_rank", "lora_dropout", "resolution", "bucket", "cache_latents", "cache_text_embeddings",
              "text_max_length", "train_text_encoder", "max_seq_length", "packing", "objective", "quantization",
              "network_weights", "trust_remote_code", "batch_size")
    data = {k: str(getattr(cfg, k, None)) for k in fields}
    data.update({k: str(v) for k, v in extra.items()}, model=fingerprint(cfg), torch=torch.__version__,
                lora_scripts=__version__, version=VERSION)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


def load(key: str) -> dict[str, Any] | None:
    path = cache_dir() / f"{key}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def store(key: str, value: dict[str, Any]) -> None:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(value), encoding="utf-8")
        os.replace(tmp, folder / f"{key}.json")
    except OSError:  # a read-only home: the estimate still answers, only slower next time
        pass
