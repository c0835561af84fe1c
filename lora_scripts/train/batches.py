"""Which samples go into which micro-batch, on which process: a pure function of (seed, epoch, layout).

Hand-written rather than accelerate's sharded sampler so that the order is identical for 1 process with batch 2B
and 2 processes with batch B, and so that resume needs only the step number: epoch and position follow from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from ..tasks.base import SampleKey


def sample_seed(seed: int, epoch: int, slot: int) -> int:
    """A well-mixed 63-bit seed for one sample slot of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, slot]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class BatchPlan:
    """Every epoch is a seeded permutation, padded by wrapping around so that each optimizer step sees exactly
    ``batch_size * world_size * accumulation`` samples (like DistributedSampler's padding)."""

    num_samples: int
    batch_size: int
    world_size: int
    accumulation: int
    seed: int
    # (epoch, seed, global_batch) -> a custom order (by length, by bucket); its length must not change per epoch
    order_fn: Callable[[int, int, int], np.ndarray | None] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def samples_per_step(self) -> int:
        return self.global_batch * self.accumulation

    @cached_property
    def epoch_length(self) -> int:
        """Samples in one epoch before padding (a custom order may pad buckets)."""
        return len(self._order(0))

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.epoch_length / self.samples_per_step))

    def _order(self, epoch: int) -> np.ndarray:
        order = self.order_fn(epoch, self.seed, self.global_batch) if self.order_fn else None
        if order is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return order

    def epoch_order(self, epoch: int) -> np.ndarray:
        order = self._order(epoch)
        total = self.steps_per_epoch * self.samples_per_step
        return np.resize(order, total)  # np.resize repeats from the start to pad

    def micro_batches(self, epoch: int, rank: int, start_step: int = 0) -> list[list[SampleKey]]:
        """This process's micro-batches for ``epoch``, from optimizer step ``start_step`` of the epoch on."""
        order = self.epoch_order(epoch)
        batches = []
        for micro in range(start_step * self.accumulation, self.steps_per_epoch * self.accumulation):
            first = micro * self.global_batch + rank * self.batch_size
            slots = range(first, first + self.batch_size)
            batches.append([(int(order[s]), sample_seed(self.seed, epoch, s)) for s in slots])
        return batches
