"""ImageNet-style folder data sets (``<root>/train/<class>/*.JPEG``, ``<root>/val/<class>/*``), robust to bad files.

Images are decoded with Pillow and converted to RGB whatever their mode: grey ('L', '1', 'LA'), palette
('P'), RGBA (alpha dropped), CMYK, and 16/32-bit or float greys ('I;16', 'I', 'F'), which are scaled to
8 bits by their own range rather than clipped. Transforms are timm's (``create_transform``: random resized
crop, flip and colour jitter when augmenting; resize to size / 0.875 and centre crop otherwise), followed
by the degradation and ImageNet normalization.

Bad files (``on_bad_image``):
- 'skip': at construction every file's header is opened and verified (cheap: no full decode); files that
  fail are dropped with one warning, and listed in ``bad_files``. A file that passes but fails to decode
  later (e.g. a truncated JPEG) is replaced by the next readable image in the list (deterministic),
  recorded in ``bad_files``, and warned about once. In DataLoader worker processes the read-time records
  stay in the worker.
- 'fail': nothing is scanned; the first unreadable file raises DataError naming it.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from ..errors import DataError
from .base import ClassificationDataset
from .degradations import DegradationPipeline

__all__ = ["FileList", "FolderDataset", "IMAGE_EXTENSIONS", "eval_transform", "folder_classes", "list_folder",
           "load_image", "find_test_dir", "preprocess_from_options"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
DEFAULT_FOLDER_SIZE = 224
FOLDER_CROP_PCT = 0.875

# Pillow raises many exception types on hostile bytes (OSError, SyntaxError, struct.error, IndexError, ...);
# decoding is the one place where we turn any failure into "bad file".
_DECODE_ERRORS = (Exception,)


class BadImageWarning(UserWarning):
    """Some image files of a folder data set could not be read and were skipped."""


def folder_classes(train_dir: Path) -> list[str]:
    """Sorted names of the class sub-directories of ``train_dir`` (hidden ones ignored)."""
    if not train_dir.is_dir():
        raise DataError(f"folder data set needs {train_dir} with one sub-directory per class "
                        "(ImageNet layout: <root>/train/<class>/*.JPEG)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{train_dir} has no class sub-directories; expected <root>/train/<class>/<image files>")
    # an empty folder would silently become a class that is never seen in training
    empty = [name for name in classes if not _has_image(train_dir / name)]
    if empty:
        raise DataError(f"{train_dir}: {len(empty)} of {len(classes)} class folders hold no image files "
                        f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); remove them or add images")
    return classes


def _has_image(directory: Path) -> bool:
    """Whether ``directory`` holds an image file (recursively); stops at the first, so that checking 1000
    ImageNet classes does not list 1.28 M files."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir() and _has_image(Path(entry.path)):
                return True
            if not entry.is_dir() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                return True
    return False


def _first_images(directory: Path, limit: int) -> list[Path]:
    """Up to ``limit`` image files under ``directory`` (depth first, sorted, hidden entries skipped)."""
    found: list[Path] = []
    for entry in sorted(directory.iterdir()):
        if len(found) >= limit:
            break
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found += _first_images(entry, limit - len(found))
        elif entry.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(entry)
    return found


def native_folder_size(train_dir: Path, classes: list[str], per_class: int = 4) -> int:
    """The input size of a folder data set when none is set: the median shorter side of the first ``per_class``
    files of up to 64 classes (headers only), at most DEFAULT_FOLDER_SIZE. 28 for 28 px PNGs, 224 for photos."""
    sides = []
    for name in classes[::max(1, len(classes) // 64)]:
        for path in _first_images(train_dir / name, per_class):
            try:
                with Image.open(path) as image:
                    sides.append(min(image.size))
            except _DECODE_ERRORS:
                continue  # bad files are skipped or refused when they are read
    return int(min(np.median(sides), DEFAULT_FOLDER_SIZE)) if sides else DEFAULT_FOLDER_SIZE


def find_test_dir(root: Path) -> Path | None:
    """The held-out directory: ``test/`` if present, else ``val/`` (ImageNet's name for its held-out set)."""
    for name in ("test", "val", "validation"):
        if (root / name).is_dir():
            return root / name
    return None


def _natural_key(text: str) -> list:
    """timm's file order (``timm.utils.natural_key``): digit runs compare as numbers, so img9 < img10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text.lower())]


class FileList:
    """(path, label) pairs stored compactly: the relative paths as one UTF-8 bytes blob plus an offsets array.

    A Python list of 1.28 M ``Path`` objects costs about 520 bytes per file and is slowly copied into every forked
    DataLoader worker (reference counts dirty its pages); here a file costs its name's bytes plus 12, and the
    numpy arrays stay shared between forked workers.

    Args:
        root: the directory the relative paths are under.
        names: relative paths (``str``), in order.
        labels: one int per name.
    """

    def __init__(self, root: Path, names, labels):
        self.root = Path(root)
        encoded = [name.encode("utf-8", "surrogateescape") for name in names]
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int32)
        if len(self.labels) != len(encoded):
            raise DataError(f"FileList: {len(encoded)} names but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        start, stop = self.offsets[index], self.offsets[index + 1]
        return self.blob[start:stop].tobytes().decode("utf-8", "surrogateescape")

    def __getitem__(self, index: int) -> tuple[Path, int]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"file {index} out of range for a list of {len(self)}")
        return self.root / self.name(index), int(self.labels[index])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def subset(self, rows) -> FileList:
        """The files at ``rows`` (an int array), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        out = FileList.__new__(FileList)
        out.root = self.root
        lengths = self.offsets[rows + 1] - self.offsets[rows]
        out.offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out.offsets[1:])
        starts = np.repeat(self.offsets[rows] - out.offsets[:-1], lengths)  # blob position of every output byte
        out.blob = self.blob[starts + np.arange(int(out.offsets[-1]))] if len(rows) else self.blob[:0]
        out.labels = self.labels[rows]
        return out

    @property
    def nbytes(self) -> int:
        return self.blob.nbytes + self.offsets.nbytes + self.labels.nbytes


def _walk_images(directory: str, prefix: str, out: list[str]) -> None:
    """Relative paths of the image files under ``directory`` (recursively, hidden entries skipped)."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=True):
                _walk_images(entry.path, f"{prefix}{entry.name}/", out)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                out.append(prefix + entry.name)


def list_folder(split_dir: Path, classes: list[str]) -> FileList:
    """(path, label) for every image-extension file under ``split_dir/<class>/``, others ignored.

    One pass of ``os.scandir`` per directory; within a class, files are in timm's natural order (img9 before
    img10), the order the official data-ratio rule permutes.
    """
    index = {name: i for i, name in enumerate(classes)}
    names: list[str] = []
    labels: list[int] = []
    for class_name in sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")):
        if class_name not in index:
            raise DataError(f"{split_dir / class_name}: class {class_name!r} does not exist in the train directory; "
                            "every held-out class needs a train/<class> directory too")
        found: list[str] = []
        _walk_images(os.path.join(split_dir, class_name), f"{class_name}/", found)
        found.sort(key=_natural_key)
        names.extend(found)
        labels.extend([index[class_name]] * len(found))
    return FileList(split_dir, names, labels)


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """'I;16*', 'I' and 'F' greys -> 'L', scaling by the format's range (Pillow's convert would clip at 255)."""
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "I":
        # 16-bit PNGs often open as 'I'; wider data is scaled by its own maximum.
        top = 65535.0 if pixels.max(initial=0) <= 65535 else float(pixels.max())
    else:  # 'F': assume the 8-bit range, the usual meaning of float TIFF greys
        top = 255.0
    pixels = np.nan_to_num(pixels, nan=0.0, posinf=top, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(pixels / top * 255.0), 0, 255).astype(np.uint8), mode="L")


def load_image(path: Path, in_chans: int = 3) -> Image.Image:
    """Decode ``path`` fully and convert it to 'RGB' (in_chans 3) or 'L' (in_chans 1).

    Raises:
        DataError: the file is missing, not an image, truncated or otherwise undecodable.
    """
    if not Path(path).is_file():
        raise DataError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I") or image.mode == "F":
                image = _high_depth_to_8bit(image)
            elif image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # Pillow warns when a transparent palette goes straight to RGB
            target = "RGB" if in_chans == 3 else "L"
            # leaving the block closes only the file; the decoded pixels stay (no copy when the mode is right)
            return image if image.mode == target else image.convert(target)
    except _DECODE_ERRORS as err:
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}. Remove or replace the file "
                        "(folder data sets skip such files with --on-bad-image skip, or data.on_bad_image: skip)") \
            from err


def _header_ok(path: Path) -> str | None:
    """None if ``path`` opens as an image with a valid structure, else the reason it does not."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()  # walks the chunks (PNG CRCs); does not decode pixels
        if width < 1 or height < 1:
            return "zero-size image"
        return None
    except UnidentifiedImageError:
        return "not an image file"
    except _DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}"


# timm's create_transform options a folder data set passes through (the official train.py flags); see FolderDataset.
TRANSFORM_KEYS = ("auto_augment", "interpolation", "train_interpolation", "color_jitter", "scale", "ratio", "hflip",
                  "crop_pct", "crop_mode")
CROP_MODES = {"center": "center_crop", "squash": "squash"}  # timm's evaluation crop modes -> preprocess geometry


def preprocess_from_options(options: dict) -> dict:
    """The evaluation geometry that folder transform options (``TRANSFORM_KEYS``) give: timm's centre crop or
    squash at crop_pct, with its interpolation (``FolderDataset.preprocess``, and older runs' configs)."""
    return {"geometry": CROP_MODES.get(options.get("crop_mode") or "center", "center_crop"),
            "crop_pct": options.get("crop_pct") or FOLDER_CROP_PCT,
            "interpolation": options.get("interpolation") or "bilinear"}


def eval_transform(image_size: int, preprocess: dict):
    """PIL image -> [C, S, S] uint8 tensor by a ``preprocess`` description (``FolderDataset.preprocess``): timm's
    evaluation transform, 'center_crop' (shorter side to S / crop_pct, centre crop) or 'squash' (both sides)."""
    mode = "squash" if preprocess["geometry"] == "squash" else "center"
    return create_transform(image_size, is_training=False, normalize=False, crop_pct=preprocess["crop_pct"],
                            crop_mode=mode, interpolation=preprocess["interpolation"])


class FolderDataset(ClassificationDataset):
    """Images read from files; see the module docstring for layout, conversions and bad-file handling.

    Items are normalized float images (``__getitem__``); loaders call ``pixels`` instead, which stops before
    normalization and returns uint8 pixels (a quarter of the bytes to move; the device normalizes, as timm's
    prefetcher does), or float pixels in [0, 1] when a degradation made them non-integer.

    Args:
        samples: a ``FileList`` (or (path, label) pairs).
        source_index: [N] int, each file's position in its directory's full sorted listing (seeds degradation).
        stream: 0 for files under train/, 1 for the held-out directory.
        on_bad_image: 'fail' or 'skip'.
        transform: timm ``create_transform`` options (``TRANSFORM_KEYS``): ``auto_augment`` (e.g.
            'rand-m7-mstd0.5-inc1'), ``train_interpolation`` ('random', 'bicubic', ...; default 'bilinear'),
            ``interpolation`` (evaluation, default 'bilinear'), ``color_jitter`` (0.4), ``scale``, ``ratio``,
            ``hflip`` (0.5), ``crop_pct`` (evaluation centre crop, 0.875).
        Other args: see ``ClassificationDataset``.
    """

    def __init__(self, name: str, split: str, samples, source_index: np.ndarray,
                 stream: int, classes: list[str], image_size: int, degradation: DegradationPipeline, augment: bool,
                 on_bad_image: str, transform: dict | None = None):
        self.bad_files: list[tuple[str, str]] = []
        if not isinstance(samples, FileList):
            samples = list(samples)
            root = Path(os.path.commonpath([str(p) for p, _ in samples])) if samples else Path(".")
            samples = FileList(root, [os.path.relpath(p, root) for p, _ in samples], [label for _, label in samples])
        source_index = np.asarray(source_index, dtype=np.int64)
        if on_bad_image == "skip":
            reasons = [_header_ok(path) for path, _ in samples]
            self.bad_files = [(str(path), why) for (path, _), why in zip(samples, reasons, strict=True) if why]
            keep = [i for i, why in enumerate(reasons) if why is None]
            if self.bad_files:
                first, why = self.bad_files[0]
                warnings.warn(f"{name} {split}: skipped {len(self.bad_files)} unreadable file(s) of {len(samples)} "
                              f"(first: {first}: {why}); the list is in dataset.bad_files", BadImageWarning,
                              stacklevel=3)
                samples = samples.subset(keep)
                source_index = source_index[keep]
        if not len(samples):
            raise DataError(f"{name} {split}: no readable images found; check the directory layout "
                            "<root>/train/<class>/<image files> and the files themselves")
        targets = torch.from_numpy(samples.labels.astype(np.int64))
        super().__init__(name, split, classes, 3, image_size, targets, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                         degradation, augment, hflip=True)
        self.samples = samples
        self.source_index = source_index
        self.stream = int(stream)
        self.on_bad_image = on_bad_image
        self._warned_at_read = False
        self._unreadable: set[int] = set()
        options = dict(transform or {})
        unknown = sorted(set(options) - set(TRANSFORM_KEYS))
        if unknown:
            raise DataError(f"unknown folder transform option(s) {unknown}; valid: {list(TRANSFORM_KEYS)}")
        if options.get("crop_mode") not in (None, *CROP_MODES):
            raise DataError(f"folder transform crop_mode must be one of {list(CROP_MODES)}, got "
                            f"{options['crop_mode']!r}")
        self.transform_options = options
        train_kwargs = {k: options[k] for k in ("auto_augment", "color_jitter", "hflip") if options.get(k) is not None}
        train_kwargs.update({k: tuple(options[k]) for k in ("scale", "ratio") if options.get(k) is not None})
        # normalize=False: timm's transform stops at a uint8 tensor, so the degradation can run before normalizing.
        self._train_transform = create_transform(self.image_size, is_training=True, normalize=False,
                                                 interpolation=options.get("train_interpolation") or "bilinear",
                                                 **train_kwargs)
        self._eval_transform = eval_transform(self.image_size, self.preprocess)

    @property
    def preprocess(self) -> dict:
        """timm's evaluation geometry (shorter side to size / crop_pct, centre crop), as ``_eval_transform``."""
        return preprocess_from_options(self.transform_options)

    def _read(self, index: int) -> tuple[Image.Image, int]:
        """Decode image ``index``; with 'skip', fall forward to the next readable image."""
        for step in range(len(self.samples)):
            candidate = (index + step) % len(self.samples)
            if candidate in self._unreadable:
                continue
            path = self.samples[candidate][0]
            try:
                return load_image(path, self.in_chans), candidate
            except DataError as err:
                if self.on_bad_image != "skip":
                    raise
                self._unreadable.add(candidate)
                self.bad_files.append((str(path), str(err.__cause__ or err)))
                if not self._warned_at_read:
                    self._warned_at_read = True
                    warnings.warn(f"{self.name} {self.split}: {path} failed to decode; substituting the next "
                                  "readable image (further failures are only recorded in dataset.bad_files)",
                                  BadImageWarning, stacklevel=3)
        raise DataError(f"{self.name} {self.split}: none of the {len(self.samples)} images can be decoded; "
                        "check the files")

    def pixels(self, index: int) -> tuple[torch.Tensor, int]:
        """(unnormalized [3, S, S] image, label): uint8, or float in [0, 1] when a degradation is set."""
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} images")
        image, used = self._read(index % len(self))
        pixels = (self._train_transform if self.augment else self._eval_transform)(image)
        if len(self.degradation):
            pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float().clamp(0.0, 1.0)
            pixels = self.degradation(pixels, index=int(self.source_index[used]), stream=self.stream)
        # The label travels with the image actually used, so a substituted file keeps image and label matched.
        return pixels, int(self.targets[used])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels, label = self.pixels(index)
        pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels
        return self.normalize(pixels), label
