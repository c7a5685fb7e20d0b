"""Batches from a ClassificationDataset, for training (a deterministic, resumable stream) and evaluation.

Training order is a pure function of (seed, position in the stream): epoch e is a permutation drawn from a
generator seeded with (seed, e), and every sample is produced with torch's, numpy's and Python's RNGs all seeded
with (seed, its position), so timm's random crop (Python's ``random``) and RandAugment (numpy) repeat too. A run
resumed at step n therefore sees exactly the batches and augmentations an uninterrupted run sees, with any number
of workers and on any number of processes. Nothing is built per step up front: each step's indices are drawn when
the DataLoader asks for them.

File-backed data sets are decoded in DataLoader workers, which hand over uint8 pixels; normalization (and timm's
random erasing, as in timm's prefetcher) runs on the device.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from .errors import ConfigError

__all__ = ["mix_seed", "seed_all", "TrainStream", "DeviceNormalize", "eval_batches", "repeated_epoch_length",
           "shard_range"]

# timm's RepeatAugSampler rounds an epoch down to a multiple of this many samples
REPEAT_ROUND = 256


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style mixing, so nearby inputs give unrelated seeds)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


def seed_all(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` (timm's transforms draw from all three)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def repeated_epoch_length(size: int, repeats: int) -> int:
    """Samples per epoch with repeated augmentation (timm's RepeatAugSampler: the data set's size rounded down
    to a multiple of 256 when it holds at least 256; every image then appears ``repeats`` times in a row)."""
    if repeats <= 1:
        return size
    return size // REPEAT_ROUND * REPEAT_ROUND if size >= REPEAT_ROUND else size


class _SeededItems(Dataset):
    """Wraps a dataset so that item (index, seed) is produced with every RNG seeded with ``seed``; returns
    unnormalized pixels when the dataset offers them (``pixels``), normalized images otherwise."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._get = dataset.pixels if hasattr(dataset, "pixels") else dataset.__getitem__

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        seed_all(seed)
        return self._get(index)


class DeviceNormalize:
    """Pixels -> normalized float images on the device: uint8 in [0, 255] or float in [0, 1] (degraded images);
    already normalized float images pass through. Optionally timm's RandomErasing afterwards, as in timm's
    prefetcher (it draws from torch's and Python's RNGs, which the trainer seeds per step)."""

    def __init__(self, mean, std, device, erasing: dict | None = None):
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.mean255, self.std255 = self.mean * 255.0, self.std * 255.0
        self.erasing = None
        if erasing and erasing.get("probability", 0) > 0:
            from timm.data.random_erasing import RandomErasing
            self.erasing = RandomErasing(erasing["probability"], mode=erasing.get("mode", "pixel"),
                                         max_count=erasing.get("count", 1), device=str(self.device))

    def __call__(self, images: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        # in place on the one float copy: a batch of 224 px images is about 40 MB per temporary
        if images.dtype == torch.uint8:
            images = images.float().sub_(self.mean255).div_(self.std255)
        elif not normalized:
            images = images.float().sub(self.mean).div_(self.std)
        if self.erasing is not None:
            images = self.erasing(images)
        return images


class _Steps:
    """The batch sampler of a TrainStream: yields each step's [(index, seed), ...] only when asked."""

    def __init__(self, stream: TrainStream, start: int, stop: int):
        self.stream, self.start, self.stop = stream, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.stream.indices(step)


class TrainStream:
    """Global batches of ``batch_size`` for steps ``start``, ``start + 1``, ...; process ``rank`` of
    ``world`` gets its slice of each global batch (so the global batch does not depend on ``world``).

    Args:
        repeats: repeated augmentation (timm's ``--aug-repeats``): each epoch's permutation with every image
            repeated this many times in a row, cut to ``repeated_epoch_length``; consecutive copies go to
            consecutive ranks (as RepeatAugSampler's ``indices[rank::world]``) with different augmentations.
            0 or 1: off.
        erasing: timm random-erasing options {probability, mode, count}, applied on the device.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1, num_workers: int = 0,
                 device: torch.device | str = "cpu", repeats: int = 0, erasing: dict | None = None,
                 prefetch_factor: int = 2):
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0:
            raise ConfigError(f"repeats (data.aug_repeats) must be a non-negative integer, got {repeats!r}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world, self.num_workers, self.device = rank, world, num_workers, torch.device(device)
        self.size = len(dataset)
        self.repeats = max(1, repeats)
        self.epoch_length = repeated_epoch_length(self.size, self.repeats)
        self.prefetch_factor = prefetch_factor
        self._perms: dict[int, np.ndarray] = {}
        self._orders: dict[int, torch.Tensor] = {}
        # In-memory data sets skip per-item Python entirely; their augmentation runs on whole batches.
        self._tensors = dataset.tensors() if hasattr(dataset, "tensors") else None
        self._augment = dataset.batch_augment() if self._tensors is not None and dataset.augment else None
        # in-memory sets are normalized already; plain tensor sets (tests) have no statistics
        stats = (dataset.mean, dataset.std) if isinstance(getattr(dataset, "mean", None), tuple | list) \
            else ((0.0,), (1.0,))
        self.normalize = DeviceNormalize(*stats, self.device, erasing)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            # A batch can straddle two epochs: keep the two most recent permutations.
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.size, generator=generator).numpy()
        return self._perms[epoch]

    def indices(self, step: int) -> list[tuple[int, int]]:
        """(dataset index, augmentation seed) for this process's part of global batch ``step``."""
        out = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size)[self.rank::self.world]:
            epoch, offset = divmod(position, self.epoch_length)
            out.append((int(self._permutation(epoch)[offset // self.repeats]), mix_seed(self.seed, 1, position)))
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.epoch_length

    def steps_per_epoch(self) -> float:
        return self.epoch_length / self.batch_size

    def _order(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s dataset indices in stream order (each repeated ``repeats`` times), on the device."""
        if epoch not in self._orders:
            order = torch.from_numpy(self._permutation(epoch))
            if self.repeats > 1:
                order = order.repeat_interleave(self.repeats)[:self.epoch_length]
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order.to(self.device)
        return self._orders[epoch]

    def device_indices(self, step: int) -> torch.Tensor:
        """The dataset indices of ``indices(step)`` as a tensor on the device, cut from per-epoch orders that are
        copied there once per epoch: no host-to-device copy, and so no host sync, per step."""
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)[self.rank::self.world]
        parts, position = [], positions.start
        while position < positions.stop:
            epoch, offset = divmod(position, self.epoch_length)
            end = min(self.epoch_length, offset + positions.stop - position)
            parts.append(self._order(epoch)[offset:end:self.world])
            position += len(range(offset, end, self.world)) * self.world
        if not parts:  # a global batch smaller than the world leaves this rank nothing
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def batches(self, start: int, stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._tensors is not None:
            # the whole set is copied to the device once; batches are gathered there
            images, labels = (t.to(self.device) for t in self._tensors)
            for step in range(start, stop):
                index = self.device_indices(step)
                batch = images[index]
                if self._augment is not None:
                    generator = torch.Generator().manual_seed(mix_seed(self.seed, 3, step, self.rank))
                    batch = self._augment(batch, generator)
                yield self.normalize(batch, normalized=True), labels[index]
            return
        extra = dict(prefetch_factor=self.prefetch_factor, persistent_workers=False) if self.num_workers else {}
        loader = DataLoader(_SeededItems(self.dataset), batch_sampler=_Steps(self, start, stop),
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda", **extra)
        for images, labels in loader:
            yield self.normalize(images, normalized=not hasattr(self.dataset, "pixels")), \
                labels.to(self.device, non_blocking=True)


def shard_range(count: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``count`` items (shares differ by at most one)."""
    return range(count * rank // world, count * (rank + 1) // world)


class _Plain(Dataset):
    def __init__(self, dataset, rows: range):
        self.dataset, self.rows = dataset, rows
        self._get = dataset.pixels if hasattr(dataset, "pixels") else dataset.__getitem__

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self._get(self.rows[index])


def eval_batches(dataset, batch_size: int, device: torch.device | str = "cpu",
                 num_workers: int = 0, limit: int | None = None, rank: int | None = None,
                 world: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The data set in order (optionally its first ``limit`` items), in batches of normalized images.

    ``rank``/``world``: this process's contiguous shard only (default: the whole set; pass
    ``world=dist.get_world_size()`` to shard, then reduce the results, e.g. ``evaluate(..., distributed=True)``).
    File-backed sets are decoded in ``num_workers`` workers and normalized on the device.
    """
    device = torch.device(device)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    rows = shard_range(count, rank or 0, world or 1)
    if hasattr(dataset, "tensors"):
        images, labels = dataset.tensors()
        for start in range(rows.start, rows.stop, batch_size):
            stop = min(start + batch_size, rows.stop)
            yield images[start:stop].to(device), labels[start:stop].to(device)
        return
    normalize = DeviceNormalize(dataset.mean, dataset.std, device)
    loader = DataLoader(_Plain(dataset, rows), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    for images, labels in loader:
        yield normalize(images, normalized=not hasattr(dataset, "pixels")), labels.to(device, non_blocking=True)


def world_info() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
