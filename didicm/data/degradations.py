"""Image degradations with a severity, composable from a spec string, reproducible per sample.

A spec is a comma-separated list ``name=value`` applied left to right, e.g. ``"resolution=7,noise=0.1"``:

- ``resolution=r``: area-downsample to r x r (mean over each pixel's footprint), then bilinear resize back
  to the input size, so every resolution feeds the same network (the study's protocol). r >= the image
  size is a no-op.
- ``resize=r``: area-downsample to r x r and keep it there: the network sees r x r images (the paper's
  protocol, the official ``--input-size r``; cheaper than ``resolution`` at low r). r >= the image size is a
  no-op. A data set built with it reports ``image_size`` r.
- ``noise=s``: add Gaussian noise of std s in [0, 1] pixel units, then clip to [0, 1] (a sensor saturates).
- ``blur=s``: Gaussian blur with sigma s pixels (kernel covering +-3 sigma, capped by the image size).
- ``jpeg=q``: JPEG encode/decode (Pillow) at quality q in 1..100 (8-bit quantization included).

Degradations act on un-normalized images in [0, 1], ``[C, H, W]`` or ``[B, C, H, W]`` float. Randomness is
drawn from a generator seeded by (seed, stream, sample index, position in the spec), never from the global
RNG, so a test set is degraded identically for every method, epoch and batch composition.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..errors import ConfigError, InputError

__all__ = [
    "Degradation", "Resolution", "Resize", "GaussianNoise", "GaussianBlur", "Jpeg", "DegradationPipeline",
    "parse_degradation", "DEGRADATIONS",
]

_MASK64 = (1 << 64) - 1


def _mix64(*values: int) -> int:
    """Hash integers into one 63-bit seed (splitmix64 finalizer), so nearby indices get unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1  # torch.Generator.manual_seed wants a value that fits int64


class Degradation:
    """One degradation with a severity. Subclasses implement ``_apply`` on a [B, C, H, W] float batch."""

    name: str = ""
    is_random: bool = False

    def __init__(self, value: float):
        self.value = value

    def __repr__(self) -> str:
        return f"{self.name}={self.value:g}"

    def _apply(self, images: torch.Tensor, seeds: list[int] | None) -> torch.Tensor:
        raise NotImplementedError

    def output_size(self, size: int) -> int:
        """The side of the output for a square input of side ``size`` (most degradations keep it)."""
        return size


class Resolution(Degradation):
    """Area-downsample to ``size`` x ``size``, then bilinear resize back to the input's H x W."""

    name = "resolution"

    def __init__(self, value: float):
        if value != int(value) or value < 1:
            raise ConfigError(f"resolution must be an integer >= 1 (pixels per side), got {value:g}")
        super().__init__(int(value))

    def _apply(self, images: torch.Tensor, seeds: list[int] | None) -> torch.Tensor:
        height, width = images.shape[-2:]
        if self.value >= height and self.value >= width:
            return images
        small = F.interpolate(images, size=(min(self.value, height), min(self.value, width)), mode="area")
        # Upsampling: antialias is irrelevant; bilinear with half-pixel centres like PIL/torchvision Resize.
        return TF.resize(small, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)


class Resize(Resolution):
    """Area-downsample to ``size`` x ``size`` (mean over each output pixel's footprint) and stop there."""

    name = "resize"

    def output_size(self, size: int) -> int:
        return min(self.value, size)

    def _apply(self, images: torch.Tensor, seeds: list[int] | None) -> torch.Tensor:
        height, width = images.shape[-2:]
        if self.value >= height and self.value >= width:
            return images
        return F.interpolate(images, size=(min(self.value, height), min(self.value, width)), mode="area")


class GaussianNoise(Degradation):
    """Add N(0, std^2) per pixel (std in [0, 1] pixel units), then clip to [0, 1]."""

    name = "noise"
    is_random = True

    def __init__(self, value: float):
        if not 0 <= value <= 10:
            raise ConfigError(f"noise must be a std in [0, 10] in [0, 1] pixel units, got {value:g}")
        super().__init__(float(value))

    def _apply(self, images: torch.Tensor, seeds: list[int] | None) -> torch.Tensor:
        if self.value == 0:
            return images
        if seeds is None:
            noise = torch.randn(images.shape, dtype=images.dtype)
        else:
            noise = torch.empty_like(images)
            generator = torch.Generator()
            for row, seed in enumerate(seeds):
                generator.manual_seed(seed)
                noise[row] = torch.randn(images.shape[1:], generator=generator, dtype=images.dtype)
        return (images + self.value * noise).clamp_(0.0, 1.0)


class GaussianBlur(Degradation):
    """Gaussian blur with standard deviation ``sigma`` pixels, reflect padding at the borders."""

    name = "blur"

    def __init__(self, value: float):
        if not 0 <= value <= 100:
            raise ConfigError(f"blur must be a sigma in [0, 100] pixels, got {value:g}")
        super().__init__(float(value))

    def _apply(self, images: torch.Tensor, seeds: list[int] | None) -> torch.Tensor:
        if self.value == 0:
            return images
        height, width = images.shape[-2:]
        # +-3 sigma covers 99.7% of the mass; reflect padding needs the half-width below the image side.
        kernel = [min(2 * math.ceil(3 * self.value) + 1, 2 * ((side - 1) // 2) + 1) for side in (width, height)]
        if max(kernel) <= 1:
            return images
        return TF.gaussian_blur(images, kernel_size=kernel, sigma=[self.value, self.value])


class Jpeg(Degradation):
    """JPEG round trip at ``quality`` (1..100) through Pillow's libjpeg; works on 1- or 3-channel images.

    Pillow rather than torchvision.io: torchvision 0.29 deprecates its image codecs (moving them to TorchCodec)
    and warns on every call. Colour images get libjpeg's default 4:2:0 chroma subsampling.
    """

    name = "jpeg"

    def __init__(self, value: float):
        if value != int(value) or not 1 <= value <= 100:
            raise ConfigError(f"jpeg must be an integer quality in 1..100, got {value:g}")
        super().__init__(int(value))

    def _apply(self, images: torch.Tensor, seeds: list[int] | None) -> torch.Tensor:
        if images.shape[1] not in (1, 3):
            raise InputError(f"jpeg needs 1 or 3 channels, got {images.shape[1]}; drop the jpeg degradation "
                             "for this data set")
        pixels = (images * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [B, H, W, C]
        decoded = []
        for image in pixels:
            buffer = io.BytesIO()
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "JPEG", quality=self.value)
            buffer.seek(0)
            with Image.open(buffer) as jpeg:
                decoded.append(np.asarray(jpeg).reshape(image.shape))
        return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).to(images.dtype) / 255.0


DEGRADATIONS: dict[str, type[Degradation]] = {
    cls.name: cls for cls in (Resolution, Resize, GaussianNoise, GaussianBlur, Jpeg)
}


class DegradationPipeline:
    """An ordered composition of degradations, applied to [0, 1] images.

    Args:
        steps: the degradations, applied in order.
        seed: base seed of the random ones; the same (seed, stream, index) always gives the same output.
    """

    def __init__(self, steps: Sequence[Degradation], seed: int = 0):
        self.steps = list(steps)
        self.seed = int(seed)

    def __repr__(self) -> str:
        return ",".join(repr(step) for step in self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def output_size(self, size: int) -> int:
        """The side of the degraded images for square inputs of side ``size``."""
        for step in self.steps:
            size = step.output_size(size)
        return size

    @property
    def is_random(self) -> bool:
        return any(step.is_random for step in self.steps)

    def __call__(self, images: torch.Tensor, index: int | Sequence[int] | torch.Tensor | None = None,
                 stream: int = 0) -> torch.Tensor:
        """Degrade one image or a batch.

        Args:
            images: [C, H, W] or [B, C, H, W] float in [0, 1].
            index: the sample index (an int for one image, B ints for a batch) that seeds the random
                degradations; None draws from torch's global RNG (not reproducible).
            stream: separates seed streams of different files (e.g. 0 for train images, 1 for test images).
        Returns:
            The degraded images, same dtype, in [0, 1]; same shape unless a ``resize`` shrinks H and W.
        Raises:
            InputError: not a float tensor of 3 or 4 dims, empty, non-finite, outside [0, 1], or index count
                not matching the batch.
        """
        if not isinstance(images, torch.Tensor) or not torch.is_floating_point(images):
            raise InputError(f"degradations need a float tensor in [0, 1], got "
                             f"{getattr(images, 'dtype', type(images).__name__)}; convert uint8 images with x / 255")
        single = images.ndim == 3
        batch = images.unsqueeze(0) if single else images
        if batch.ndim != 4 or min(batch.shape) == 0:
            raise InputError(f"degradations need a non-empty [C, H, W] or [B, C, H, W] tensor, got shape "
                             f"{tuple(images.shape)}")
        if not torch.isfinite(batch).all():
            raise InputError("degradation input holds NaN or Inf; fix the image loading before degrading")
        if batch.min() < -1e-6 or batch.max() > 1 + 1e-6:
            raise InputError(f"degradation input must lie in [0, 1] (got [{float(batch.min()):.3g}, "
                             f"{float(batch.max()):.3g}]); apply degradations before normalization")
        seeds = self._seeds(index, batch.shape[0], single, stream)
        out_dtype = batch.dtype
        out = batch.float().clamp(0.0, 1.0)
        for position, step in enumerate(self.steps):
            step_seeds = None if seeds is None else [_mix64(s, position) for s in seeds]
            out = step._apply(out, step_seeds)
        out = out.clamp_(0.0, 1.0).to(out_dtype)
        return out[0] if single else out

    def _seeds(self, index, batch: int, single: bool, stream: int) -> list[int] | None:
        if index is None or not self.is_random:
            return None
        if isinstance(index, torch.Tensor):
            index = index.reshape(-1).tolist() if index.ndim else [int(index)]
        elif isinstance(index, int):
            index = [index]
        index = [int(i) for i in index]
        if len(index) != batch:
            raise InputError(f"got {len(index)} sample indices for a batch of {batch} images; pass one per image")
        return [_mix64(self.seed, stream, i) for i in index]


def parse_degradation(spec: str | None, seed: int = 0) -> DegradationPipeline:
    """Parse ``"resolution=7,noise=0.1,blur=1.0,jpeg=30"`` into a ``DegradationPipeline``.

    Args:
        spec: comma-separated ``name=value`` pairs; names from ``DEGRADATIONS``; None, "" or "none" means
            no degradation (an empty pipeline, the identity).
        seed: base seed for the random degradations (noise).
    Returns:
        The pipeline, applying the degradations in the order written.
    Raises:
        ConfigError: unknown name, missing or non-numeric value, value out of range, or a name repeated.
    """
    if spec is None:
        return DegradationPipeline([], seed)
    if not isinstance(spec, str):
        raise ConfigError(f"degradation spec must be a string like 'resolution=7,noise=0.1', got {spec!r}")
    text = spec.strip()
    if text.lower() in ("", "none", "clean"):
        return DegradationPipeline([], seed)
    steps: list[Degradation] = []
    seen: set[str] = set()
    for part in text.split(","):
        name, sep, raw_value = part.partition("=")
        name = name.strip().lower()
        if not sep or not name or not raw_value.strip():
            raise ConfigError(f"degradation {part.strip()!r} must be written name=value, e.g. 'noise=0.1' "
                              f"(spec {spec!r})")
        if name not in DEGRADATIONS:
            raise ConfigError(f"unknown degradation {name!r} in {spec!r}; choose from {sorted(DEGRADATIONS)}")
        if name in seen:
            raise ConfigError(f"degradation {name!r} appears twice in {spec!r}; give each at most once")
        try:
            value = float(raw_value)
        except ValueError:
            raise ConfigError(f"degradation {name!r} needs a number, got {raw_value.strip()!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"degradation {name!r} needs a finite number, got {raw_value.strip()!r}")
        seen.add(name)
        steps.append(DEGRADATIONS[name](value))
    return DegradationPipeline(steps, seed)
