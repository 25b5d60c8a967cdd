"""A training loader whose order is reproducible per epoch and resumable mid-epoch.

A plain shuffled ``DataLoader`` draws each epoch's order from a generator that has advanced through all earlier
epochs (or from the global RNG), so a run resumed from a checkpoint sees another order than an uninterrupted one, and
Lightning restarts a mid-epoch resume with a fresh iterator (other batches). Here:

- :class:`EpochShuffleSampler`: the order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone; Lightning
  calls ``set_epoch`` at every epoch start;
- :class:`ResumableLoader`: a ``DataLoader`` over that sampler with Lightning's ``state_dict`` / ``load_state_dict``
  interface: its position (epoch, batches done) is stored in every checkpoint and restored on resume, so the
  resumed run continues with exactly the batches the uninterrupted run would have seen.

Under DDP Lightning replaces the sampler by a ``DistributedSampler`` (order from seed and epoch as well); the loader's
state then only records the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

#: marks the state of this loader inside a checkpoint (``meddiff.runs.loop_state`` sets its position when a
#: checkpoint is written between two batches)
STATE_MARKER = "meddiff_resumable_loader"


def _derive(*entropy: int) -> int:
    """A 63-bit seed from several integers (independent streams for different tuples)."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochShuffleSampler(Sampler[int]):
    """Indices ``0..n-1`` in an order drawn from ``(seed, epoch)``; ``start`` skips the first samples once (resume)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(_derive(self.seed, epoch))).tolist()

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        yield from self.order(self.epoch)[start:]

    def __len__(self) -> int:
        return self.n


class ResumableLoader(DataLoader):
    """A shuffling ``DataLoader`` (see the module docstring). ``seed`` None draws one from torch's global RNG (so
    ``seed_everything`` still decides it); the seed is part of the state, so a resume keeps it."""

    def __init__(self, dataset: Dataset, batch_size: int | None = 1, seed: int | None = None,
                 sampler: Sampler | None = None, **kwargs: Any) -> None:
        kwargs.pop("shuffle", None)  # the order is the sampler's
        if sampler is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()).item())
            sampler = EpochShuffleSampler(len(dataset), seed)  # type: ignore[arg-type]
        self.seed = seed
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._epoch = 0
        self._batches_done = 0

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        self._epoch = getattr(sampler, "epoch", self._epoch)
        # the iterator draws its workers' base seed from the loader's generator (else from the global RNG, which
        # would then differ between a resumed and an uninterrupted run): one per epoch, from (seed, epoch)
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(_derive(self.seed, self._epoch, 1))
        start = getattr(sampler, "start", 0)
        self._batches_done = start // self.batch_size if self.batch_size else 0
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {STATE_MARKER: True, "seed": self.seed, "epoch": self._epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sampler = self.sampler
        if not isinstance(sampler, EpochShuffleSampler) or not state_dict.get(STATE_MARKER):
            return
        epoch, done = int(state_dict["epoch"]), int(state_dict["batches_done"])
        if done >= len(self):  # the epoch was complete: the next one starts from its beginning
            epoch, done = epoch + 1, 0
        if state_dict.get("seed") is not None:
            sampler.seed = self.seed = int(state_dict["seed"])
        sampler.epoch = self._epoch = epoch
        sampler.start = done * (self.batch_size or 1)
