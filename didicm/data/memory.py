"""Data sets held in memory as uint8 arrays (digits, IDX, CIFAR): per-sample access and a batched fast path."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .augment import pixel_augment
from .base import ClassificationDataset
from .degradations import DegradationPipeline

__all__ = ["InMemoryDataset"]

_CHUNK = 2048  # images per chunk in tensors(): bounds the float32 working memory


class InMemoryDataset(ClassificationDataset):
    """Images stored as uint8 [N, C, H, W]; transforms run on demand.

    The deterministic transform is: pixels / 255 -> resize to ``load_size`` (bilinear, antialiased, only if
    the stored size differs; default ``image_size``) -> degradation (whose ``resize=r`` may shrink the images
    to ``image_size``) (seeded by ``source_index`` and ``stream``) -> normalize.
    ``__getitem__`` inserts the random augmentation before normalizing when ``augment`` is set.

    Args:
        images: [N, C, H, W] uint8.
        labels: [N] int.
        source_index: [N] int, each image's position in its source file; seeds its degradation, so an image
            is degraded the same way whichever split or subset it ends up in.
        stream: which source file (0 train, 1 test), so train and test image k get different noise.
        Other args: see ``ClassificationDataset``.
    """

    def __init__(self, name: str, split: str, images: np.ndarray, labels: np.ndarray, source_index: np.ndarray,
                 stream: int, classes: Sequence[str], image_size: int, mean: Sequence[float], std: Sequence[float],
                 degradation: DegradationPipeline, augment: bool, hflip: bool, load_size: int | None = None):
        super().__init__(name, split, classes, images.shape[1], image_size, torch.from_numpy(labels.astype(np.int64)),
                         mean, std, degradation, augment, hflip)
        self.images = images
        self.source_index = np.asarray(source_index, dtype=np.int64)
        self.stream = int(stream)
        self.load_size = int(load_size or image_size)
        self._augment_fn = pixel_augment(self.image_size, self.hflip) if augment else None
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    def _pixels(self, rows: slice | np.ndarray) -> torch.Tensor:
        """[B, C, H, W] float in [0, 1], resized and degraded (not normalized)."""
        batch = torch.from_numpy(np.ascontiguousarray(self.images[rows])).float().div_(255.0)
        if batch.shape[-1] != self.load_size or batch.shape[-2] != self.load_size:
            batch = TF.resize(batch, [self.load_size, self.load_size], interpolation=InterpolationMode.BILINEAR,
                              antialias=True).clamp_(0.0, 1.0)
        if len(self.degradation):
            batch = self.degradation(batch, index=self.source_index[rows].tolist(), stream=self.stream)
        return batch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} images")
        index %= len(self)
        image = self._pixels(slice(index, index + 1))[0]
        if self._augment_fn is not None:
            image = self._augment_fn(image)
        return self.normalize(image), int(self.targets[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images after the deterministic transforms, normalized, and the labels (cached after the first call).

        Returns:
            images [N, C, image_size, image_size] float32 and labels [N] int64. Augmentation is not applied:
            use ``batch_augment()`` on training batches.
        """
        if self._tensors is None:
            out = torch.empty(len(self), self.in_chans, self.image_size, self.image_size)
            for start in range(0, len(self), _CHUNK):
                rows = slice(start, min(start + _CHUNK, len(self)))
                out[rows] = self.normalize(self._pixels(rows))
            self._tensors = (out, self.targets.clone())
        return self._tensors
