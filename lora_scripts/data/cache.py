"""On-disk caches of VAE latents and text-encoder outputs (``cache_latents``, ``cache_text_embeddings``).

An entry's file name is a hash of everything its value depends on (image bytes or caption, the model's weights and
config, the crop size), so a changed image, model or bucket simply misses and is recomputed: no stale entries are
ever read. Latents are stored as the VAE's distribution (mean, std), not a sample, so the per-sample noise drawn in
training is the same with and without the cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..train.checkpoint import atomic_write_bytes


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's config and every parameter and buffer (its identity for cache keys)."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        digest.update(json.dumps(data, sort_keys=True, default=str).encode())
    from ..models.quantize import storage_tensors

    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        # a quantised weight (base_quantization) is hashed as what it stores, with its kind: a quantised T5's
        # embeddings are not the full-precision one's
        if type(tensor) is not torch.Tensor:
            digest.update(type(tensor).__name__.encode())
        for stored in storage_tensors(tensor.detach()):
            # the bytes in place (no .tobytes() copy): about 2 s for SD1.5's VAE + text encoder instead of 3
            digest.update(memoryview(stored.to("cpu").contiguous().view(torch.uint8).numpy()))
    return digest.hexdigest()


def entry_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


class TensorCache:
    """A folder of small safetensors files, one per key, written atomically.

    Entries read or written are also kept in memory up to ``memory_bytes`` (then read from disk again), so an epoch
    after the first costs no file reads: each entry is read every epoch, and parsing a file is a measurable share
    of a cached training step (benchmarks/image_speed.py)."""

    def __init__(self, folder: Path, memory_bytes: int = 1 << 30):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.memory_bytes = memory_bytes
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self._held = 0

    def _remember(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if key not in self._memory and self._held + size <= self.memory_bytes:
            self._memory[key] = tensors
            self._held += size

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        data = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        atomic_write_bytes(self.path(key), save(data))
        self._remember(key, data)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """The entry's tensors (shared with the in-memory copy: do not modify them in place)."""
        entry = self._memory.get(key)
        if entry is None:
            entry = load_file(str(self.path(key)))
            self._remember(key, entry)
        return entry
