"""Readers for the on-disk layouts of the in-memory data sets: IDX (MNIST-style), CIFAR pickles, sklearn digits.

Every reader returns ``RawSplit`` objects: images as uint8 ``[N, C, H, W]`` and labels as int64 ``[N]``,
untouched (no scaling, no normalization), plus the class names.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .safe_pickle import safe_load

__all__ = [
    "RawSplit", "find_idx_files", "read_idx", "load_idx_dir", "load_cifar_dir", "load_digits_splits",
    "idx_header",
]

# IDX type codes (third byte of the magic number) -> numpy dtype, big-endian as the format says.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


@dataclass
class RawSplit:
    """One split of an in-memory data set as stored on disk.

    Attributes:
        images: [N, C, H, W] uint8 pixels.
        labels: [N] int64 class indices.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f"internal: images must be uint8 [N, C, H, W], got {self.images.dtype} "
                            f"{self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels; the image and "
                            "label files do not belong together")


# ---- IDX ----------------------------------------------------------------------------------------------
def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}. Check the path and its permissions.") from err
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by the file name
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: corrupt or truncated gzip ({err}); re-download the file.") from err
    return raw


def _parse_idx_header(data: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'}); expected "
                        "MNIST-style *-idx3-ubyte / *-idx1-ubyte files, gzipped or not.")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: IDX header is truncated or declares {ndim} dimensions; re-download the file.")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    return _IDX_DTYPES[data[2]], shape, header


def idx_header(path: str | Path) -> tuple[np.dtype, tuple[int, ...]]:
    """The element dtype and shape an IDX file declares, reading (and decompressing) only what is needed."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
            fh.seek(0)
            stream = gzip.GzipFile(fileobj=fh) if head == b"\x1f\x8b" else fh
            data = stream.read(4 + 4 * 255)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read the IDX header of {path}: {err}") from err
    dtype, shape, _ = _parse_idx_header(data, path)
    return dtype, shape


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of the shape and dtype its header declares.

    Raises:
        DataError: missing, not IDX, or with fewer/more bytes than its header declares.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    dtype, shape, header = _parse_idx_header(data, path)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: header declares shape {shape} ({expected} bytes) but the file holds "
                        f"{len(data) - header}; the file is truncated or corrupt, re-download it.")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _first_existing(directory: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def find_idx_files(directory: str | Path) -> dict[str, dict[str, Path]]:
    """Locate the train/test image and label IDX files in ``directory``.

    Accepts the MNIST names (``train-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, ...), the EMNIST/KMNIST
    style with ``test`` instead of ``t10k``, and either dots or dashes before ``idx`` (``train-images.idx3-ubyte``);
    each may end in ``.gz``.

    Returns:
        {'train': {'images': path, 'labels': path}, 'test': {...}}; 'test' is absent when there are no test files.
    Raises:
        DataError: the directory does not exist or holds no training IDX pair.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"IDX directory {directory} does not exist; pass the directory holding the "
                        "*-idx3-ubyte[.gz] files, e.g. 'idx:/path/to/mnist'.")
    found: dict[str, dict[str, Path]] = {}
    for split, prefixes in (("train", ("train",)), ("test", ("t10k", "test"))):
        files = {}
        for kind, idx_kind in (("images", "idx3"), ("labels", "idx1")):
            stems = tuple(f"{p}-{kind}{sep}{idx_kind}-ubyte" for p in prefixes for sep in ("-", "."))
            path = _first_existing(directory, stems)
            if path is not None:
                files[kind] = path
        if len(files) == 2:
            found[split] = files
        elif files:
            missing = "labels" if "images" in files else "images"
            raise DataError(f"{directory}: found the {split} {next(iter(files))} IDX file but not its {missing} "
                            f"file ({prefixes[0]}-{missing}-idx{1 if missing == 'labels' else 3}-ubyte[.gz]).")
    if "train" not in found:
        raise DataError(f"{directory}: no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz] pair found; "
                        "point to a directory with MNIST-style IDX files.")
    return found


def _idx_split(files: dict[str, Path]) -> RawSplit:
    images = read_idx(files["images"])
    labels = read_idx(files["labels"])
    if images.ndim != 3:
        raise DataError(f"{files['images']}: expected a [N, H, W] array of grey images, got shape {images.shape}")
    images = images[:, None]  # [N, 1, H, W]
    if images.dtype != np.uint8:
        raise DataError(f"{files['images']}: expected uint8 pixels, got {images.dtype}; only 8-bit images "
                        "are supported")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise DataError(f"{files['labels']}: expected a 1-D array of non-negative integer labels, got "
                        f"{labels.dtype} {labels.shape}")
    return RawSplit(np.ascontiguousarray(images), labels.astype(np.int64))


def load_idx_dir(directory: str | Path) -> dict[str, RawSplit]:
    """Load the train (and test, if present) IDX splits in ``directory``; see ``find_idx_files``."""
    return {split: _idx_split(files) for split, files in find_idx_files(directory).items()}


# ---- CIFAR ----------------------------------------------------------------------------------------------
def _cifar_batch(path: Path, label_key: str) -> RawSplit:
    if not path.is_file():
        raise DataError(f"CIFAR file {path} is missing; point to the extracted 'cifar-10-batches-py' or "
                        "'cifar-100-python' directory.")
    batch = safe_load(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict with 'data' and labels, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape [N, 3072] (CIFAR's layout)")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: '{label_key}' is not a list of integers") from err
    if labels.shape != (data.shape[0],) or (labels.size and labels.min() < 0):
        raise DataError(f"{path}: '{label_key}' must list one non-negative label per image")
    # CIFAR rows are channel-major: 1024 red, then 1024 green, then 1024 blue values, each 32 x 32 row-major.
    return RawSplit(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels)


def _cifar_names(path: Path, key: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"CIFAR meta file {path} is missing; the directory is incomplete, re-extract it.")
    meta = safe_load(path)
    if isinstance(meta, dict):
        meta = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in meta.items()}
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list | tuple) or not names:
        raise DataError(f"{path}: no '{key}' list of class names")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def cifar_class_names(directory: str | Path, num_classes: int) -> list[str]:
    """Class names from CIFAR-10's ``batches.meta`` or CIFAR-100's ``meta`` (fine labels)."""
    directory = Path(directory)
    if num_classes == 10:
        return _cifar_names(directory / "batches.meta", "label_names")
    return _cifar_names(directory / "meta", "fine_label_names")


def load_cifar_dir(directory: str | Path, num_classes: int) -> tuple[dict[str, RawSplit], list[str]]:
    """Load CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``) python pickles.

    Args:
        directory: the extracted ``cifar-10-batches-py`` / ``cifar-100-python`` directory.
        num_classes: 10 or 100, selecting the layout.
    Returns:
        ({'train': RawSplit, 'test': RawSplit}, class names).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"CIFAR directory {directory} does not exist; pass e.g. 'cifar{num_classes}:<dir>' with "
                        "the extracted python-version archive.")
    names = cifar_class_names(directory, num_classes)
    if num_classes == 10:
        parts = [_cifar_batch(directory / f"data_batch_{i}", "labels") for i in range(1, 6)]
        train = RawSplit(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
        test = _cifar_batch(directory / "test_batch", "labels")
    else:
        train = _cifar_batch(directory / "train", "fine_labels")
        test = _cifar_batch(directory / "test", "fine_labels")
    for split in (train, test):
        if split.labels.size and split.labels.max() >= len(names):
            raise DataError(f"{directory}: a label ({split.labels.max()}) is outside the {len(names)} class names "
                            "in the meta file")
    return {"train": train, "test": test}, names


# ---- scikit-learn digits --------------------------------------------------------------------------------
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def load_digits_splits() -> dict[str, RawSplit]:
    """scikit-learn's bundled 8 x 8 digits (1797 images, pixel values 0..16), split 80/20 stratified, seed 0.

    The set ships without a split, so we carve a fixed one. Pixels are rescaled from 0..16 to 0..255 so that
    every in-memory set is stored as uint8 in 0..255.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION,
                                           stratify=labels, random_state=DIGITS_SPLIT_SEED)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return {"train": RawSplit(images[train_idx], labels[train_idx]),
            "test": RawSplit(images[test_idx], labels[test_idx])}
