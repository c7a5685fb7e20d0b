"""Batches from a ClassificationDataset, for training (a deterministic, resumable stream) and evaluation.

Training order is a pure function of (seed, position in the stream): epoch e is a permutation drawn from a
generator seeded with (seed, e), and every sample's augmentation is seeded with (seed, its position). So a
run resumed at step n sees exactly the batches and augmentations an uninterrupted run sees, with any number
of workers and on any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["mix_seed", "TrainStream", "eval_batches"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style mixing, so nearby inputs give unrelated seeds)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class _SeededItems(Dataset):
    """Wraps a dataset so that item (index, seed) is produced under torch's RNG seeded with ``seed``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        torch.manual_seed(seed)
        return self.dataset[index]


class TrainStream:
    """Global batches of ``batch_size`` for steps ``start``, ``start + 1``, ...; process ``rank`` of
    ``world`` gets its slice of each global batch (so the global batch does not depend on ``world``)."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1, num_workers: int = 0,
                 device: torch.device | str = "cpu"):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world, self.num_workers, self.device = rank, world, num_workers, torch.device(device)
        self.size = len(dataset)
        self._perms: dict[int, torch.Tensor] = {}
        # In-memory data sets skip per-item Python entirely; their augmentation runs on whole batches.
        self._tensors = dataset.tensors() if hasattr(dataset, "tensors") else None
        self._augment = dataset.batch_augment() if self._tensors is not None and dataset.augment else None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            # A batch can straddle two epochs: keep the two most recent permutations.
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.size, generator=generator)
        return self._perms[epoch]

    def indices(self, step: int) -> list[tuple[int, int]]:
        """(dataset index, augmentation seed) for this process's part of global batch ``step``."""
        out = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size)[self.rank::self.world]:
            epoch, offset = divmod(position, self.size)
            out.append((int(self._permutation(epoch)[offset]), mix_seed(self.seed, 1, position)))
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.size

    def batches(self, start: int, stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._tensors is not None:
            images, labels = self._tensors
            for step in range(start, stop):
                index = torch.tensor([i for i, _ in self.indices(step)])
                batch = images[index]
                if self._augment is not None:
                    generator = torch.Generator().manual_seed(mix_seed(self.seed, 3, step, self.rank))
                    batch = self._augment(batch, generator)
                yield batch.to(self.device), labels[index].to(self.device)
            return
        loader = DataLoader(_SeededItems(self.dataset), batch_sampler=[self.indices(s) for s in range(start, stop)],
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def eval_batches(dataset, batch_size: int, device: torch.device | str = "cpu",
                 num_workers: int = 0, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The data set in order (optionally its first ``limit`` items), in batches."""
    device = torch.device(device)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if hasattr(dataset, "tensors"):
        images, labels = dataset.tensors()
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            yield images[start:stop].to(device), labels[start:stop].to(device)
        return
    subset = torch.utils.data.Subset(dataset, range(count))
    for images, labels in DataLoader(subset, batch_size=batch_size, num_workers=num_workers):
        yield images.to(device), labels.to(device)
