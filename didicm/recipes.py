"""Defaults that fit the data: what `didicm train` fills in when a key is set neither in the config nor on the
command line.

Small images (side <= SMALL_IMAGE_SIZE, e.g. 8 px digits or 28 px Fashion-MNIST PNGs) get the demo's recipe, a
narrow small-stem DiDiRN-18 that learns in a few CPU minutes; a full-width network on them costs about 30x
more per step and barely moves in a short run. Larger images keep the library defaults (full width, ImageNet
stem). Pure dicts: no torch import, so the CLI can print the plan before the heavy work.
"""

from __future__ import annotations

__all__ = ["SMALL_IMAGE_SIZE", "SMALL_IMAGE_RECIPE", "fit_to_data"]

SMALL_IMAGE_SIZE = 64

# width 16: a quarter of ResNet-18's channels (0.7 M parameters at K = 10); stem 'small': no max-pool, so a
# 28 px image is not cut to 7 px before the first block
SMALL_IMAGE_RECIPE = {
    "model": {"kwargs": {"stem": "small", "width": 16}},
    "optim": {"opt": "adamw", "lr": 2e-3, "weight_decay": 0.05, "batch_size": 64, "steps": 600, "warmup_steps": 30},
    "diffusion": {"t_sampling": "antithetic"},
}


# filled together or not at all: an optimizer setting mixed into someone else's recipe is a recipe nobody tested
# (AdamW's weight decay 0.05 under a user's lr 5e-3 stops a 40-step run from learning)
TOGETHER = ("optim.opt", "optim.lr", "optim.weight_decay", "optim.warmup_steps", "diffusion.t_sampling")


def fit_to_data(values: dict, image_size: int) -> tuple[dict, list[str]]:
    """``values`` (a config as nested dicts) with SMALL_IMAGE_RECIPE filled in where unset, if the images are small.

    Model options (``stem``, ``width``) are filled one by one, only for DiDiRN networks and twins (the names that
    take them); ``optim.steps`` and ``optim.batch_size`` one by one; the keys of TOGETHER only if none of them is set.
    Returns:
        (new values, the dotted keys filled, e.g. ['model.kwargs.width', 'optim.opt']).
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    filled: list[str] = []
    if image_size > SMALL_IMAGE_SIZE:
        return out, filled

    def is_set(dotted: str) -> bool:
        section, key = dotted.split(".")
        return key in (out.get(section) or {})

    together = not any(is_set(dotted) for dotted in TOGETHER)
    for section, defaults in SMALL_IMAGE_RECIPE.items():
        if section == "model":
            model = out.setdefault("model", {})
            if not str(model.get("name", "didirn18")).startswith("didirn"):
                continue
            kwargs = model["kwargs"] = dict(model.get("kwargs") or {})
            for key, value in defaults["kwargs"].items():
                if key not in kwargs:
                    kwargs[key] = value
                    filled.append(f"model.kwargs.{key}")
            continue
        node = out.setdefault(section, {})
        for key, value in defaults.items():
            dotted = f"{section}.{key}"
            if key not in node and (together or dotted not in TOGETHER):
                node[key] = value
                filled.append(dotted)
    return out, filled
