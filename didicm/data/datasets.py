"""Data sets by name: ``create_dataset`` and ``dataset_info``.

Names (``root`` may replace the ``:<dir>`` part):

| name                       | source                                                   | split of 'test'            |
|----------------------------|----------------------------------------------------------|----------------------------|
| ``digits``                 | scikit-learn's bundled 8 x 8 digits (no download)        | fixed 20% stratified, seed 0 |
| ``fashion-mnist``          | IDX files, default /usr/share/datasets/fashion-mnist     | the t10k files             |
| ``idx:<dir>``              | any MNIST-style ``*-idx3-ubyte[.gz]`` directory          | the t10k/test files        |
| ``cifar10:<dir>``          | CIFAR-10 python pickles (read with a safe unpickler)     | ``test_batch``             |
| ``cifar100:<dir>``         | CIFAR-100 python pickles (fine labels)                   | ``test``                   |
| ``folder:<dir>``           | ``<dir>/train/<class>/*`` and ``<dir>/{test,val}/<class>/*`` | the held-out directory |

A bare directory is recognized by its contents. 'val' is carved from the training files (stratified, seed
``VAL_SPLIT_SEED`` whatever ``seed`` is) and 'train' excludes it; ``data_ratio`` then keeps a per-class
random fraction of 'train' chosen by ``seed``. 'test' is never subset and never used for tuning.

Normalization (``NORMALIZATION`` below, in [0, 1] pixel units): Fashion-MNIST and CIFAR use the usual
published training-set statistics; digits uses its own training-split statistics (measured once,
constants here); a generic IDX set computes mean/std from its training images when loaded; folders use
ImageNet's (timm's IMAGENET_DEFAULT_MEAN/STD).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import ConfigError, DataError
from .base import (
    RATIO_RULES,
    VAL_SPLIT_SEED,
    ClassificationDataset,
    class_balanced_subset,
    official_ratio_subset,
    stratified_split,
)
from .degradations import parse_degradation
from .folder import (
    IMAGE_EXTENSIONS,
    FolderDataset,
    find_test_dir,
    folder_classes,
    list_folder,
    native_folder_size,
)
from .memory import InMemoryDataset
from .readers import (
    RawSplit,
    cifar_class_names,
    find_idx_files,
    idx_header,
    load_cifar_dir,
    load_digits_splits,
    load_idx_dir,
    read_idx,
)

__all__ = ["create_dataset", "dataset_info", "resolve_source", "DataSource", "NORMALIZATION", "DEFAULT_VAL_SIZE",
           "FASHION_MNIST_ROOT", "FASHION_MNIST_CLASSES", "SPLITS", "VAL_SPLIT_SEED", "DEGRADATION_SEED"]

SPLITS = ("train", "val", "test")
DEGRADATION_SEED = 0
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]

# (mean, std) per channel, in [0, 1] pixel units.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3054,), (0.3760,)),  # measured on our 80% training split (pixels 0..16 scaled to 0..1)
    "fashion-mnist": ((0.2860,), (0.3530,)),  # 60k training images (matches the common published values)
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "folder": (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)),
}

# Validation size when val_size is None: Fashion-MNIST follows the study (5,000 of 60,000); others 10%.
DEFAULT_VAL_SIZE: dict[str, int | float] = {"fashion-mnist": 5000}
DEFAULT_VAL_FRACTION = 0.1

# Horizontal flips in augmentation: fine for clothes and photos, wrong for digits (see augment.py).
_HFLIP = {"digits": False, "fashion-mnist": True, "idx": False, "cifar10": True, "cifar100": True, "folder": True}

_ALIASES = {"fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "fmnist": "fashion-mnist", "digits": "digits", "idx": "idx", "mnist": "idx", "cifar10": "cifar10",
            "cifar-10": "cifar10", "cifar100": "cifar100", "cifar-100": "cifar100", "folder": "folder",
            "imagefolder": "folder", "imagenet": "folder"}
_NEEDS_ROOT = ("idx", "cifar10", "cifar100", "folder")
_HELP = ("known data sets: 'digits', 'fashion-mnist', 'idx:<dir>', 'cifar10:<dir>', 'cifar100:<dir>', "
         "'folder:<dir>', or a directory holding one of those layouts")


@dataclass(frozen=True)
class DataSource:
    """A resolved data set: its kind (digits, fashion-mnist, idx, cifar10, cifar100, folder) and directory."""

    kind: str
    root: Path | None

    @property
    def label(self) -> str:
        return self.kind if self.root is None or self.kind in ("digits", "fashion-mnist") else \
            f"{self.kind}:{self.root}"


def _detect_kind(path: Path) -> str | None:
    if any(path.glob("*-idx3-ubyte")) or any(path.glob("*-idx3-ubyte.gz")) or any(path.glob("*.idx3-ubyte*")):
        return "idx"
    if (path / "data_batch_1").is_file():
        return "cifar10"
    if (path / "meta").is_file() and (path / "train").is_file():
        return "cifar100"
    if (path / "train").is_dir():
        return "folder"
    return None


def resolve_source(name: str, root: str | os.PathLike | None = None) -> DataSource:
    """Map a data set name (and optional root) to a ``DataSource``.

    Raises:
        DataError: unknown name, missing directory, or a directory whose layout is not recognized.
    """
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"data set name must be a non-empty string, got {name!r}; {_HELP}")
    text = name.strip()
    prefix, sep, rest = text.partition(":")
    key = _ALIASES.get(prefix.lower()) if sep else _ALIASES.get(text.lower())
    if key is not None:
        directory = rest if sep else (os.fspath(root) if root is not None else None)
        if key == "digits":
            return DataSource("digits", None)
        if key == "fashion-mnist":
            path = Path(directory or FASHION_MNIST_ROOT)
            if not path.is_dir():
                hint = (f"install it with `{FASHION_MNIST_INSTALL}`" if directory is None else
                        f"pass the directory that holds its IDX files, or `{FASHION_MNIST_INSTALL}` and drop root")
                raise DataError(f"Fashion-MNIST not found at {path}; {hint}")
            return DataSource("fashion-mnist", path)
        if not directory:
            raise DataError(f"data set {key!r} needs a directory: write '{key}:<dir>' or pass root=<dir>")
        path = Path(directory).expanduser()
        if not path.is_dir():
            raise DataError(f"{key} directory {path} does not exist; check the path")
        return DataSource(key, path)
    path = Path(text).expanduser()
    if path.is_dir():
        kind = _detect_kind(path)
        if kind is None:
            raise DataError(f"{path}: cannot tell which data layout this directory holds; prefix the path with "
                            f"the format, e.g. 'folder:{path}'. {_HELP}")
        return DataSource(kind, path)
    if sep and len(prefix) > 1:
        raise DataError(f"unknown data set format {prefix!r} in {text!r}; {_HELP}")
    raise DataError(f"unknown data set {text!r} (and no such directory); {_HELP}")


def _stamp(paths: list[Path]) -> tuple:
    """Modification times, so the load cache never serves stale arrays after a file changes."""
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)


@lru_cache(maxsize=4)
def _load_raw_cached(kind: str, root: str, stamp: tuple) -> tuple[dict[str, RawSplit], list[str] | None]:
    if kind == "digits":
        return load_digits_splits(), [str(i) for i in range(10)]
    if kind in ("idx", "fashion-mnist"):
        return load_idx_dir(root), (FASHION_MNIST_CLASSES if kind == "fashion-mnist" else None)
    if kind in ("cifar10", "cifar100"):
        return load_cifar_dir(root, 10 if kind == "cifar10" else 100)
    raise DataError(f"internal: {kind} is not an in-memory data set")


def _load_raw(source: DataSource) -> tuple[dict[str, RawSplit], list[str]]:
    if source.kind in ("idx", "fashion-mnist"):
        files = [p for split in find_idx_files(source.root).values() for p in split.values()]
    elif source.kind == "cifar10":
        files = [source.root / f for f in ("batches.meta", "test_batch", *[f"data_batch_{i}" for i in range(1, 6)])]
    elif source.kind == "cifar100":
        files = [source.root / f for f in ("meta", "train", "test")]
    else:
        files = []
    try:
        stamp = _stamp(files)
    except OSError as err:
        raise DataError(f"{source.label}: {err}; the directory is incomplete") from err
    splits, classes = _load_raw_cached(source.kind, str(source.root), stamp)
    if "test" not in splits:
        raise DataError(f"{source.label}: no test files (t10k-images-idx3-ubyte[.gz] / t10k-labels-idx1-ubyte[.gz]) "
                        "next to the training files; add them to use the 'test' split")
    if classes is None:
        top = max(int(split.labels.max(initial=0)) for split in splits.values())
        classes = [str(i) for i in range(top + 1)]
    for split_name, split in splits.items():
        if split.labels.size and split.labels.max() >= len(classes):
            raise DataError(f"{source.label}: {split_name} label {split.labels.max()} is outside the "
                            f"{len(classes)} known classes")
    return splits, list(classes)


def _normalization(source: DataSource, train: RawSplit) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if source.kind in NORMALIZATION:
        return NORMALIZATION[source.kind]
    pixels = train.images.astype(np.float64) / 255.0
    axes = (0, 2, 3)
    # A floor on std keeps a constant-image data set finite instead of dividing by zero.
    return tuple(pixels.mean(axis=axes).tolist()), tuple(np.maximum(pixels.std(axis=axes), 1 / 255).tolist())


def _check_args(split, image_size, data_ratio, seed, on_bad_image) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int | np.integer)
                                   or image_size < 1):
        raise ConfigError(f"image_size must be a positive integer or None (native size), got {image_size!r}")
    if isinstance(data_ratio, bool) or not isinstance(data_ratio, int | float | np.integer | np.floating) \
            or not 0 < data_ratio <= 1:
        raise ConfigError(f"data_ratio must lie in (0, 1], got {data_ratio!r}; use 1.0 for the full training set")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if on_bad_image not in ("fail", "skip"):
        raise ConfigError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")


def _split_rows(split: str, labels: np.ndarray, val_size, data_ratio: float, seed: int, label: str,
                ratio_rule: str = "didicm") -> np.ndarray:
    """Rows of the training pool that form 'train' or 'val'."""
    train_rows, val_rows = stratified_split(labels, val_size)
    if split == "val":
        if len(val_rows) == 0:
            raise ConfigError(f"{label}: the 'val' split is empty because val_size=0; pass a positive val_size, "
                              "or evaluate on the held-out folder (eval_split 'test')")
        return val_rows
    if ratio_rule == "official":
        return train_rows[official_ratio_subset(labels[train_rows], data_ratio)]
    subset = class_balanced_subset(labels[train_rows], data_ratio, seed)
    return train_rows[subset]


def create_dataset(name: str, split: str, root: str | None = None, image_size: int | None = None,
                   degradation: str | None = None, augment: bool = False, data_ratio: float = 1.0,
                   val_size: int | float | None = None, seed: int = 0,
                   on_bad_image: str = "fail", ratio_rule: str = "didicm",
                   transform: dict | None = None) -> ClassificationDataset:
    """Build one split of a data set.

    Args:
        name: see the module docstring ('digits', 'fashion-mnist', 'idx:<dir>', 'cifar10:<dir>', ...).
        split: 'train', 'val' (carved from the training files) or 'test'.
        root: directory of the data, instead of writing it after the colon.
        image_size: side of the returned square images; None keeps the native size (8, 28, 32; for folders
            the median shorter side of a few files, at most 224: see ``native_folder_size``).
        degradation: spec like 'resolution=7,noise=0.1' (see ``parse_degradation``), applied before
            normalization on every split; its noise is seeded per image by the image's position in its file
            (and ``DEGRADATION_SEED``), never by ``seed``, so it is identical for every method and run.
        augment: random crop with padding (+ flips where sensible); timm's train transform for folders.
        data_ratio: fraction in (0, 1] of every class kept in 'train' (ignored for 'val' and 'test').
        val_size: validation images (count, or fraction of the training files); None: 5,000 for
            Fashion-MNIST, 10% otherwise; 0: no validation split, 'train' uses all training files.
        seed: chooses the data-ratio subset (and nothing else).
        on_bad_image: 'fail' or 'skip' unreadable image files (folder data sets).
        ratio_rule: 'didicm' (``class_balanced_subset``) or 'official' (``official_ratio_subset``: seed 42,
            floor(n_c * ratio) per class).
        transform: folder data sets only: timm transform options (see ``FolderDataset``), e.g.
            {'auto_augment': 'rand-m7-mstd0.5-inc1', 'train_interpolation': 'random', 'interpolation': 'bicubic'}.
    Returns:
        A ``ClassificationDataset`` whose items are (image [C, S, S] float, normalized; label int).
    Raises:
        DataError: unknown name, missing or corrupt files.
        ConfigError: bad split, image_size, data_ratio, val_size, seed, on_bad_image or degradation.
    """
    _check_args(split, image_size, data_ratio, seed, on_bad_image)
    if ratio_rule not in RATIO_RULES:
        raise ConfigError(f"ratio_rule must be one of {RATIO_RULES}, got {ratio_rule!r}")
    # The degraded images are a fixed property of the data set (seeded by image, not by run), so every method
    # and every run seed is evaluated on the very same degraded test set.
    pipeline = parse_degradation(degradation, seed=DEGRADATION_SEED)
    source = resolve_source(name, root)
    if val_size is None:
        val_size = DEFAULT_VAL_SIZE.get(source.kind, DEFAULT_VAL_FRACTION)
    hflip = _HFLIP[source.kind]
    if source.kind == "folder":
        if pipeline.output_size(1 << 20) != 1 << 20:
            raise ConfigError(f"degradation 'resize' is for in-memory data sets; for {source.label} set "
                              "data.image_size (--image-size) to the resolution the network should see")
        image_size = image_size or native_folder_size(source.root / "train", folder_classes(source.root / "train"))
        return _create_folder(source, split, image_size, pipeline, augment, data_ratio,
                              val_size, int(seed), on_bad_image, ratio_rule, transform)
    if transform:
        raise ConfigError(f"transform options {sorted(transform)} apply to folder data sets only, not {source.label}")
    raw, classes = _load_raw(source)
    mean, std = _normalization(source, raw["train"])
    if split == "test":
        pool, rows, stream = raw["test"], np.arange(len(raw["test"].labels)), 1
    else:
        pool, stream = raw["train"], 0
        rows = _split_rows(split, pool.labels, val_size, data_ratio, int(seed), source.label, ratio_rule)
    images = pool.images[rows]
    load_size = image_size or images.shape[-1]
    return InMemoryDataset(source.label, split, images, pool.labels[rows], rows, stream, classes,
                           pipeline.output_size(load_size), mean, std, pipeline, augment and split == "train", hflip,
                           load_size=load_size)


def _create_folder(source: DataSource, split: str, image_size: int, pipeline, augment: bool, data_ratio: float,
                   val_size, seed: int, on_bad_image: str, ratio_rule: str = "didicm",
                   transform: dict | None = None) -> FolderDataset:
    classes = folder_classes(source.root / "train")
    if split == "test":
        test_dir = find_test_dir(source.root)
        if test_dir is None:
            raise DataError(f"{source.root}: no held-out directory (test/ or val/ with class sub-directories); "
                            "add one to use the 'test' split")
        samples, stream = list_folder(test_dir, classes), 1
        rows = np.arange(len(samples))
    else:
        samples, stream = list_folder(source.root / "train", classes), 0
        if not len(samples):
            raise DataError(f"{source.root / 'train'}: no image files under its class directories; expected "
                            f"<class>/<name> with an extension among {', '.join(IMAGE_EXTENSIONS)}")
        rows = _split_rows(split, samples.labels.astype(np.int64), val_size, data_ratio, seed, source.label,
                           ratio_rule)
    return FolderDataset(source.label, split, samples if len(rows) == len(samples) else samples.subset(rows), rows,
                         stream, classes, image_size, pipeline, augment and split == "train", on_bad_image, transform)


def dataset_info(name: str, root: str | None = None) -> dict:
    """What a model needs to know about a data set, without loading its images.

    Returns:
        dict(num_classes=int, in_chans=int, image_size=int (native side), classes=list[str]).
    Raises:
        DataError: unknown name or missing files.
    """
    source = resolve_source(name, root)
    if source.kind == "digits":
        classes, in_chans, size = [str(i) for i in range(10)], 1, 8
    elif source.kind == "fashion-mnist":
        find_idx_files(source.root)
        classes, in_chans, size = list(FASHION_MNIST_CLASSES), 1, 28
    elif source.kind == "idx":
        files = find_idx_files(source.root)
        _, shape = idx_header(files["train"]["images"])
        if len(shape) != 3:
            raise DataError(f"{files['train']['images']}: expected [N, H, W] images, header says {shape}")
        top = max(int(read_idx(split["labels"]).max(initial=0)) for split in files.values())
        classes, in_chans, size = [str(i) for i in range(top + 1)], 1, shape[-1]
    elif source.kind in ("cifar10", "cifar100"):
        classes = cifar_class_names(source.root, 10 if source.kind == "cifar10" else 100)
        in_chans, size = 3, 32
    else:
        classes, in_chans = folder_classes(source.root / "train"), 3
        size = native_folder_size(source.root / "train", classes)
    return dict(num_classes=len(classes), in_chans=in_chans, image_size=size, classes=classes)

