"""Image files -> model inputs for `didicm predict`, preprocessed exactly as the model's training data."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

from ..errors import CheckpointError, DataError
from .datasets import resolve_source
from .folder import FOLDER_CROP_PCT, eval_transform, load_image

__all__ = ["load_image_for_model", "preprocess_of"]


def preprocess_of(meta: dict) -> dict:
    """How a file becomes the input of the model ``meta`` describes: ``meta['preprocess']``, saved with models
    since it was added; for an older run, derived from its data config (a folder data set evaluates with timm's
    resize + centre crop, at its transform's crop_pct and interpolation), else a plain resize."""
    if meta.get("preprocess"):
        return dict(meta["preprocess"])
    data = (meta.get("config") or {}).get("data") or {}
    transform = data.get("transform") or {}
    try:
        folder = bool(transform) or (data.get("dataset") is not None and
                                     resolve_source(str(data["dataset"]), data.get("root")).kind == "folder")
    except DataError:  # the training data is not on this machine; "folder:" still says what it was
        folder = str(data.get("dataset", "")).startswith("folder:")
    if folder:
        return {"geometry": "center_crop", "crop_pct": transform.get("crop_pct") or FOLDER_CROP_PCT,
                "interpolation": transform.get("interpolation") or "bilinear"}
    return {"geometry": "resize", "interpolation": "bilinear"}


def load_image_for_model(path: str | Path, meta: dict) -> torch.Tensor:
    """Decode ``path`` (any mode: grey, RGBA, 16-bit, palette), convert to the model's channel count, bring it to
    the input size the way its data set's evaluation does (``preprocess_of``: a folder-trained model gets timm's
    resize + centre crop, others a plain resize) and normalize with its
    training statistics. Returns [C, S, S] float. Degradations are not applied: a file is taken as it is.

    ``meta``: a checkpoint's description (needs in_chans, image_size, mean, std).
    Raises DataError for unreadable files, CheckpointError for a description without these fields.
    """
    try:
        in_chans, size, mean, std = meta["in_chans"], int(meta["image_size"]), meta["mean"], meta["std"]
    except KeyError as missing:
        raise CheckpointError(f"the checkpoint's description lacks {missing}; retrain with this didicm version") \
            from None
    image = load_image(Path(path), in_chans)
    preprocess = preprocess_of(meta)
    if preprocess["geometry"] == "center_crop":
        pixels = eval_transform(size, preprocess)(image)  # [C, S, S] uint8, as FolderDataset evaluates
    else:
        pixels = TF.pil_to_tensor(image)  # [C, H, W] uint8
        pixels = TF.resize(pixels, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(pixels.float() / 255.0, mean, std)
