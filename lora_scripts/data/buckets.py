"""Aspect-ratio bucketing: train images near their own aspect ratio instead of cropping everything square.

Buckets are (width, height) pairs in multiples of ``step`` whose area is at most ``resolution``²; each image goes to
the bucket closest to its aspect ratio. The batch order draws every global batch from one bucket, so the images of a
micro-batch share a size on every process.
"""

from __future__ import annotations

import math

import numpy as np


def make_buckets(resolution: int, step: int = 64, min_side: int | None = None, max_side: int | None = None) -> list[tuple[int, int]]:
    """All (w, h) in multiples of ``step`` with w*h <= resolution², sides within [min_side, max_side]
    (default resolution/2 .. resolution*2), each as large as the area allows."""
    area = resolution * resolution
    min_side = min_side or max(step, resolution // 2 // step * step)
    max_side = max_side or resolution * 2
    buckets = set()
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            buckets.update({(w, h), (h, w)})
    return sorted(buckets)


def assign_bucket(
    width: int, height: int, buckets: list[tuple[int, int]], step: int = 64, no_upscale: bool = False
) -> tuple[int, int]:
    """The bucket for an image: closest aspect ratio; with ``no_upscale``, an image smaller than the buckets' area
    gets its own size rounded down to ``step`` instead (never enlarged)."""
    area = max(w * h for w, h in buckets)
    if no_upscale and width * height < area:
        return max(step, width // step * step), max(step, height // step * step)
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def bucketed_order(bucket_of: list[tuple[int, int]], global_batch: int, rng: np.random.Generator) -> np.ndarray:
    """Sample order in chunks of ``global_batch`` that never mix buckets: shuffle within each bucket, pad its last
    chunk by repeating the bucket's own samples, then shuffle the chunks."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(bucket_of):
        groups.setdefault(bucket, []).append(index)
    chunks = []
    for bucket in sorted(groups):
        members = rng.permutation(groups[bucket])
        padded = np.resize(members, math.ceil(len(members) / global_batch) * global_batch)
        chunks += [padded[i : i + global_batch] for i in range(0, len(padded), global_batch)]
    return np.concatenate([chunks[i] for i in rng.permutation(len(chunks))])
