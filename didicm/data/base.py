"""The dataset interface every didicm data set implements, and the split/subset rules shared by all of them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .augment import BatchAugment, crop_padding
from .degradations import DegradationPipeline

__all__ = ["ClassificationDataset", "stratified_split", "class_balanced_subset", "official_ratio_subset",
           "VAL_SPLIT_SEED", "RATIO_RULES", "OFFICIAL_RATIO_SEED"]

# The validation split is carved with this seed whatever the run's seed, so every run tunes on the same
# images; the run's ``seed`` only picks the data-ratio subset.
VAL_SPLIT_SEED = 0

# data_ratio rules: 'didicm' (class_balanced_subset: nested subsets, at least one image per class, run seed) or
# 'official' (the official train.py: torch.randperm per class with seed 42, floor(n_c * r) images).
RATIO_RULES = ("didicm", "official")
OFFICIAL_RATIO_SEED = 42


class ClassificationDataset(Dataset):
    """A labelled image data set: items are (image [C, H, W] float, normalized; label int).

    Attributes:
        name: the data set's name (e.g. 'fashion-mnist').
        split: 'train', 'val' or 'test'.
        classes: class names, index = label.
        num_classes: len(classes).
        in_chans: C.
        image_size: H = W of the returned images.
        targets: [N] int64 labels.
        mean, std: per-channel normalization in [0, 1] pixel units (image = (pixel - mean) / std).
        degradation: the DegradationPipeline applied before normalization (possibly empty).
        augment: whether random train augmentation is applied in ``__getitem__``.
        hflip: whether horizontal flips are part of the augmentation for this data set.

    In-memory data sets (``InMemoryDataset``) also have ``tensors()``, the whole set as two tensors; file-backed
    ones (``FolderDataset``) deliberately do not, so ``hasattr(ds, "tensors")`` tells a loader which path to take.
    """

    def __init__(self, name: str, split: str, classes: Sequence[str], in_chans: int, image_size: int,
                 targets: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 degradation: DegradationPipeline, augment: bool, hflip: bool):
        self.name = name
        self.split = split
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.in_chans = int(in_chans)
        self.image_size = int(image_size)
        self.targets = targets.long()
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.degradation = degradation
        self.augment = bool(augment)
        self.hflip = bool(hflip)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, size={len(self)}, "
                f"num_classes={self.num_classes}, in_chans={self.in_chans}, image_size={self.image_size}, "
                f"degradation={str(self.degradation) or None!r}, augment={self.augment})")

    @property
    def preprocess(self) -> dict:
        """How an image file becomes this set's evaluation input (saved with a model, read by `didicm predict`):
        in-memory sets hold images at one size, so a file is resized to the input size, aspect ignored."""
        return {"geometry": "resize", "interpolation": "bilinear"}

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[..., C, H, W] float in [0, 1] -> normalized with this set's mean/std."""
        mean = torch.tensor(self.mean, dtype=images.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(-1, 1, 1)
        return (images - mean) / std

    def batch_augment(self) -> BatchAugment:
        """The train augmentation in batch form, for images from ``tensors()`` (already normalized)."""
        fill = [-m / s for m, s in zip(self.mean, self.std, strict=True)]
        return BatchAugment(crop_padding(self.image_size), self.hflip, fill)


def _check_val_size(val_size: int | float, total: int) -> int:
    """Turn val_size (a count, or a fraction in (0, 1)) into a count, checking it leaves training data."""
    if isinstance(val_size, bool) or not isinstance(val_size, int | float | np.integer | np.floating):
        raise ConfigError(f"val_size must be a count (int) or a fraction in (0, 1), got {val_size!r}")
    if isinstance(val_size, float | np.floating):
        if not 0 < val_size < 1:
            raise ConfigError(f"val_size as a fraction must lie in (0, 1), got {val_size}")
        count = int(np.ceil(val_size * total))
    else:
        count = int(val_size)
    if not 0 <= count < total:
        raise ConfigError(f"val_size={val_size} must leave training data: the training pool has {total} images")
    return count


def stratified_split(labels: np.ndarray, val_size: int | float, seed: int = VAL_SPLIT_SEED
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Split indices 0..N-1 into (train, val), class proportions kept, fixed by ``seed``.

    Args:
        labels: [N] int labels.
        val_size: number of validation images, or a fraction in (0, 1) of N; 0 gives an empty val set.
        seed: the split's seed.
    Returns:
        (train indices, val indices), each sorted, disjoint, covering 0..N-1.
    Raises:
        ConfigError: val_size is invalid, or too small/large to hold every class.
    """
    labels = np.asarray(labels)
    count = _check_val_size(val_size, len(labels))
    everything = np.arange(len(labels))
    if count == 0:
        return everything, everything[:0]
    from sklearn.model_selection import train_test_split  # imported only when needed: about 1 s and 80 MB

    try:
        train, val = train_test_split(everything, test_size=count, stratify=labels, random_state=seed)
    except ValueError as err:
        # sklearn refuses when a class has a single image or val_size is below the number of classes.
        raise ConfigError(f"cannot carve a stratified validation split of {count} images from {len(labels)}: "
                          f"{err}. Choose a val_size between the number of classes and the pool size.") from err
    return np.sort(train), np.sort(val)


def class_balanced_subset(labels: np.ndarray, ratio: float, seed: int = 0) -> np.ndarray:
    """Keep a fraction ``ratio`` of every class, chosen at random with a fixed seed.

    Each class keeps ``max(1, round(ratio * n_c))`` images. The choice depends only on (labels, ratio, seed),
    so every method trained on the subset sees the same images; subsets for smaller ratios are contained
    in those for larger ratios (the same per-class permutation is cut shorter).

    Args:
        labels: [N] int labels.
        ratio: in (0, 1].
        seed: subset seed.
    Returns:
        Sorted indices into labels.
    Raises:
        ConfigError: ratio outside (0, 1].
    """
    def pick(cls: int, size: int) -> np.ndarray:
        order = np.random.default_rng([int(seed), int(cls)]).permutation(size)
        return order[:max(1, int(np.floor(ratio * size + 0.5)))]

    return _per_class_subset(labels, ratio, pick)


def official_ratio_subset(labels: np.ndarray, ratio: float) -> np.ndarray:
    """The official data-ratio rule: for each class, the first floor(n_c * ratio) entries of
    ``torch.randperm(n_c)`` drawn from a generator seeded with 42 (a fresh generator per class), applied to the
    class's files in list order (timm's natural order for folders).

    Returns:
        Sorted indices into labels (a class can end up empty when n_c * ratio < 1, as officially).
    Raises:
        ConfigError: ratio outside (0, 1].
    """
    def pick(cls: int, size: int) -> np.ndarray:
        order = torch.randperm(size, generator=torch.Generator().manual_seed(OFFICIAL_RATIO_SEED))
        return order[:int(size * ratio)].numpy()

    return _per_class_subset(labels, ratio, pick)


def _per_class_subset(labels: np.ndarray, ratio: float, pick) -> np.ndarray:
    """Sorted indices of the images ``pick(class, class size)`` keeps of each class (positions within the class,
    in list order); every index when ratio is 1. The ratio is checked here for both rules."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float | np.integer | np.floating) \
            or not 0 < ratio <= 1:
        raise ConfigError(f"data_ratio must lie in (0, 1], got {ratio!r}; use 1.0 for the full training set")
    labels = np.asarray(labels)
    if ratio == 1:
        return np.arange(len(labels))
    keep = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        keep.append(members[pick(int(cls), len(members))])
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)
