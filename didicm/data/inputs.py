"""Image files -> model inputs for `didicm predict`, preprocessed exactly as the model's training data."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

from ..errors import CheckpointError, DataError
from .datasets import _ALIASES as DATASET_ALIASES
from .datasets import resolve_source
from .folder import eval_transform, load_image, preprocess_from_options

__all__ = ["folder_transform_of", "image_loader_for_model", "load_image_for_model", "preprocess_of"]


def preprocess_of(meta: dict) -> dict:
    """How a file becomes the input of the model ``meta`` describes: ``meta['preprocess']``, saved with models
    since it was added; for an older run, derived from its data config (a folder data set evaluates with timm's
    resize + centre crop, at its transform's crop_pct and interpolation), else a plain resize."""
    if meta.get("preprocess"):
        return dict(meta["preprocess"])
    data = (meta.get("config") or {}).get("data") or {}
    transform, name = data.get("transform") or {}, str(data.get("dataset") or "")
    try:
        folder = bool(transform) or (bool(name) and resolve_source(name, data.get("root")).kind == "folder")
    except DataError:  # the training data is not on this machine; its name may still say what it was
        folder = DATASET_ALIASES.get(name.split(":", 1)[0].lower()) == "folder"
    return preprocess_from_options(transform) if folder else {"geometry": "resize", "interpolation": "bilinear"}


def folder_transform_of(preprocess: dict) -> dict:
    """The folder transform options (``FolderDataset``) that evaluate files as ``preprocess`` says."""
    if preprocess["geometry"] == "resize":  # timm's squash at crop_pct 1: both sides to the input size
        return {"crop_mode": "squash", "crop_pct": 1.0, "interpolation": preprocess["interpolation"]}
    return {"crop_mode": "squash" if preprocess["geometry"] == "squash" else "center",
            "crop_pct": preprocess["crop_pct"], "interpolation": preprocess["interpolation"]}


def image_loader_for_model(meta: dict):
    """A function path -> [C, S, S] float input of the model ``meta`` describes (``load_image_for_model``), with
    what depends only on the model (its description, the transform) worked out once for many files."""
    try:
        in_chans, size, mean, std = meta["in_chans"], int(meta["image_size"]), meta["mean"], meta["std"]
    except KeyError as missing:
        raise CheckpointError(f"the checkpoint's description lacks {missing}; retrain with this didicm version") \
            from None
    preprocess = preprocess_of(meta)
    # a folder-trained model: timm's evaluation transform, as FolderDataset evaluates ([C, S, S] uint8)
    transform = eval_transform(size, preprocess) if preprocess["geometry"] in ("center_crop", "squash") else None

    def load(path: str | Path) -> torch.Tensor:
        image = load_image(Path(path), in_chans)
        if transform is not None:
            pixels = transform(image)
        else:
            pixels = TF.pil_to_tensor(image)  # [C, H, W] uint8
            pixels = TF.resize(pixels, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return TF.normalize(pixels.float() / 255.0, mean, std)

    return load


def load_image_for_model(path: str | Path, meta: dict) -> torch.Tensor:
    """Decode ``path`` (any mode: grey, RGBA, 16-bit, palette), convert to the model's channel count, bring it to
    the input size the way its data set's evaluation does (``preprocess_of``: a folder-trained model gets timm's
    resize + centre crop or squash, others a plain resize) and normalize with its training statistics. Returns
    [C, S, S] float. Degradations are not applied: a file is taken as it is.

    ``meta``: a checkpoint's description (needs in_chans, image_size, mean, std).
    Raises DataError for unreadable files, CheckpointError for a description without these fields.
    """
    return image_loader_for_model(meta)(path)
