"""Image files -> model inputs for `didicm predict`, preprocessed exactly as the model's training data."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

from ..errors import CheckpointError
from .folder import eval_transform, load_image

__all__ = ["load_image_for_model"]


def load_image_for_model(path: str | Path, meta: dict) -> torch.Tensor:
    """Decode ``path`` (any mode: grey, RGBA, 16-bit, palette), convert to the model's channel count, bring it to
    the input size the way its data set's evaluation does (``meta['preprocess']``: a folder-trained model gets
    timm's resize + centre crop; otherwise, and for checkpoints without it, a plain resize) and normalize with its
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
    preprocess = meta.get("preprocess") or {}
    if preprocess.get("geometry") == "center_crop":
        pixels = eval_transform(size, preprocess)(image)  # [C, S, S] uint8, as FolderDataset evaluates
    else:
        pixels = TF.pil_to_tensor(image)  # [C, H, W] uint8
        pixels = TF.resize(pixels, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(pixels.float() / 255.0, mean, std)
