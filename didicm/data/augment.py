"""Light train-time augmentation for small images: random crop with zero padding, horizontal flip where sensible.

Flips are enabled per data set (``DatasetSpec.hflip``): clothes (Fashion-MNIST) and natural photos (CIFAR,
folders) mean the same mirrored, digits do not (a mirrored 2, 3, 7 is not a digit), so digits and generic
IDX sets are never flipped. Padding is ``max(1, image_size // 8)`` pixels: 1 at 8 px, 3 at 28 px, 4 at 32 px.

Two forms do the same thing: ``pixel_augment`` (per sample, torchvision v2, in [0, 1] pixel space, used by
``__getitem__``) and ``BatchAugment`` (a whole normalized batch at once, for the ``tensors()`` fast path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from ..errors import InputError

__all__ = ["crop_padding", "pixel_augment", "BatchAugment"]


def crop_padding(image_size: int) -> int:
    """Zero padding (pixels per side) of the random crop: an eighth of the image, at least 1."""
    return max(1, int(image_size) // 8)


def pixel_augment(image_size: int, hflip: bool) -> v2.Compose:
    """Per-sample augmentation of a [C, H, W] float image in [0, 1] (before normalization; pads with black)."""
    steps: list = [v2.RandomCrop(image_size, padding=crop_padding(image_size), fill=0)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    return v2.Compose(steps)


class BatchAugment:
    """Random crop with padding (and optional horizontal flip), drawn independently per image of a batch.

    Works on normalized images: the padding value is the normalized black ``(0 - mean) / std`` so that it
    equals ``pixel_augment`` followed by normalization.

    Args:
        padding: pixels added on each side before cropping back to H x W.
        hflip: flip each image left-right with probability 1/2.
        fill: per-channel padding value (C floats), e.g. ``[-m / s for m, s in zip(mean, std)]``.
    """

    def __init__(self, padding: int, hflip: bool, fill: Sequence[float]):
        self.padding = int(padding)
        self.hflip = bool(hflip)
        self.fill = [float(f) for f in fill]

    def __repr__(self) -> str:
        return f"BatchAugment(padding={self.padding}, hflip={self.hflip})"

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch.

        Args:
            images: [B, C, H, W] float, normalized.
            generator: optional torch.Generator for reproducible draws.
        Returns:
            [B, C, H, W] float, each image shifted by up to ``padding`` pixels and possibly flipped.
        """
        if images.ndim != 4 or images.shape[1] != len(self.fill):
            raise InputError(f"BatchAugment expects [B, {len(self.fill)}, H, W] images, got {tuple(images.shape)}")
        batch, chans, height, width = images.shape
        pad = self.padding
        padded = images.new_empty(batch, chans, height + 2 * pad, width + 2 * pad)
        fill = torch.tensor(self.fill, dtype=images.dtype).to(images.device, non_blocking=True)
        padded[:] = fill.view(1, chans, 1, 1)
        padded[:, :, pad:pad + height, pad:pad + width] = images
        # One offset pair per image; gather the H x W window with advanced indexing instead of a Python loop.
        draw_on = generator.device if generator is not None else "cpu"  # a CUDA generator draws on the GPU
        # non_blocking: a CPU draw for GPU images must not wait for the GPU's queue
        dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=draw_on).to(images.device,
                                                                                            non_blocking=True)
        dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=draw_on).to(images.device,
                                                                                            non_blocking=True)
        rows = (dy[:, None] + torch.arange(height, device=images.device))[:, :, None]  # [B, H, 1]
        cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, :]  # [B, 1, W]
        batch_index = torch.arange(batch, device=images.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch_index, rows, cols].permute(0, 3, 1, 2)  # [B, C, H, W]
        if self.hflip:
            flip = torch.rand(batch, generator=generator, device=draw_on) < 0.5
            flip = flip.to(images.device, non_blocking=True)
            out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return out.contiguous()
