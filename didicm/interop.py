"""Checkpoints that cross to and from the official DiDiCM code (github.com/omerb01/didicm).

The official train.py saves with timm's CheckpointSaver: a torch.save'd dict with ``state_dict``,
``state_dict_ema`` (with --model-ema), ``optimizer``, ``epoch``, ``version``, ``metric``, ``arch`` and ``args``
(the ``argparse.Namespace`` of every train.py flag). Its DiDiRN has the same tensors as ours under other names
(method.md, "Official checkpoint files"); ``OFFICIAL_TO_DIDICM`` renames them.

``load_model`` reads such a file (or a plain state dict, or a didicm run) into a ready model; ``export_official``
writes a didicm model the other way, for the official validate.py.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import timm
import torch

from .checkpoint import is_torch_file, safe_torch_load
from .data.folder import FOLDER_CROP_PCT, preprocess_from_options
from .data.inputs import folder_transform_of, preprocess_of
from .errors import CheckpointError, ConfigError

__all__ = ["load_model", "export_official", "official_to_didicm", "didicm_to_official", "OFFICIAL_TO_DIDICM",
           "OFFICIAL_MEAN", "OFFICIAL_STD", "OFFICIAL_IMAGE_SIZE", "match_normalization"]

# timm's defaults, which the official train.py and validate.py use for a model without a pretrained config
OFFICIAL_MEAN = (0.485, 0.456, 0.406)
OFFICIAL_STD = (0.229, 0.224, 0.225)
OFFICIAL_IMAGE_SIZE = 224

# (official pattern, didicm replacement), applied in order to each key; the reverse direction swaps them.
OFFICIAL_TO_DIDICM = (
    (r"^layer([1-4])\.", lambda m: f"stages.{int(m.group(1)) - 1}."),
    (r"^ff_emb\.mlp\.0\.", "embed.sigma_mlp.fc1."),
    (r"^ff_emb\.mlp\.2\.", "embed.sigma_mlp.fc2."),
    (r"^label_embedder\.", "embed.label_embed."),
    (r"\.emb_layers\.1\.", ".cond.proj."),
    (r"\.out_layers\.0\.", ".out_norm."),
    (r"\.skip_connection\.", ".downsample."),
)
_DIDICM_TO_OFFICIAL = (
    (r"^stages\.([0-3])\.", lambda m: f"layer{int(m.group(1)) + 1}."),
    (r"^embed\.sigma_mlp\.fc1\.", "ff_emb.mlp.0."),
    (r"^embed\.sigma_mlp\.fc2\.", "ff_emb.mlp.2."),
    (r"^embed\.label_embed\.", "label_embedder."),
    (r"\.cond\.proj\.", ".emb_layers.1."),
    (r"\.out_norm\.", ".out_layers.0."),
    (r"\.downsample\.", ".skip_connection."),
)
# wrappers whose prefixes timm's own loader strips too (DDP, torch.compile)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_BLOCKS = {(2, 2, 2, 2): "18", (3, 4, 6, 3): "34", (3, 4, 23, 3): "101", (3, 8, 36, 3): "152"}
_OFFICIAL_SAMPLERS = ("cp", "cl")
_OFFICIAL_NOISES = ("loglinear", "geometric")


def _rename(state: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def official_to_didicm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official DiDiRN state dict with didicm's tensor names (values shared, not copied)."""
    return _rename(_strip_wrappers(state), OFFICIAL_TO_DIDICM)


def didicm_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A didicm DiDiRN state dict with the official tensor names (values shared, not copied)."""
    return _rename(state, _DIDICM_TO_OFFICIAL)


def _strip_wrappers(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_model(path: str | Path, device: torch.device | str = "cpu", ema: bool = False,
               channels_last: bool | None = False):
    """Load a trained model, in eval mode, from a didicm run or an official checkpoint.

    Args:
        path: a didicm run folder, ``model.safetensors`` or step checkpoint; or a torch file: an official
            ``model_best.pth.tar`` / ``checkpoint-N.pth.tar`` (timm CheckpointSaver layout), or a plain state dict
            (``.pth``, official or didicm tensor names).
        device: where to put the model.
        ema: take the EMA weights (the official ``state_dict_ema``; for a didicm run, the EMA weights it
            evaluates). A file without them is refused rather than silently giving the raw weights.
        channels_last: the weights' layout: NCHW (False, the default: ordinary tensors to save or inspect), NHWC
            (True), or for a didicm run the layout it trained in (None: how ``didicm eval``/``predict`` run it).
    Returns:
        (model, diffusion or None for a plain classifier, meta). ``meta`` has the fields of a didicm checkpoint
        description (model_name, num_classes, in_chans, image_size, mean, std, classes, config: data/eval/
        diffusion) plus ``format``: 'didicm' or 'official'. What an official file does not record is filled
        with the official defaults: ImageNet mean/std, class names '0'..'K-1', the data set unknown (None).
    Raises:
        CheckpointError: unreadable or unsafe file, unknown architecture, tensors that do not fit, no EMA weights.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass a run folder, a .safetensors "
                              "checkpoint or an official .pth.tar")
    if path.is_file() and is_torch_file(path):
        model, diffusion, meta = _load_official(path, device, ema)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        return model, diffusion, meta
    from .training import load_trained_model

    model, diffusion, meta = load_trained_model(path, device, channels_last=channels_last)
    if ema and meta.get("config", {}).get("optim", {}).get("ema_decay") is None:
        raise CheckpointError(f"{str(path)!r} was trained without EMA (optim.ema_decay unset): it has no EMA weights; "
                              "drop --ema / ema=True")
    return model, diffusion, dict(meta, format="didicm")


def _arg(args: dict, name: str, default=None):
    value = args.get(name)
    return default if value is None else value


def _load_official(path: Path, device, ema: bool):
    obj = safe_torch_load(path)
    args: dict = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        raw_args = obj.get("args")
        if isinstance(raw_args, argparse.Namespace):
            args = vars(raw_args)
        elif isinstance(raw_args, dict):
            args = raw_args
        key = "state_dict_ema" if ema else "state_dict"
        if ema and not isinstance(obj.get(key), dict):
            raise CheckpointError(f"{str(path)!r} has no EMA weights (state_dict_ema: it was trained without "
                                  "--model-ema); drop --ema to load its state_dict")
        state = obj[key]
        extras = {k: obj[k] for k in ("epoch", "metric", "arch", "version") if k in obj}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if ema:
            raise CheckpointError(f"{str(path)!r} is a plain state dict: it has no EMA weights; drop --ema")
        state, extras = obj, {}
    else:
        raise CheckpointError(f"{str(path)!r} is neither an official training checkpoint (a dict with "
                              "'state_dict') nor a state dict of tensors")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"the state dict in {str(path)!r} holds values that are not tensors")
    state = _strip_wrappers(state)
    name = _arg(args, "model") or extras.get("arch")
    from . import models as model_zoo

    if any(k.startswith(("ff_emb.", "label_embedder.")) for k in state):  # the official DiDiRN's embedding
        state = official_to_didicm(state)
        name = _didirn_name(state, name, path)
    if name is None:
        raise CheckpointError(f"{str(path)!r} does not say which model it holds (no args.model or arch) and its "
                              "tensors are not an official DiDiRN's; save it with its training args")
    num_classes = _num_classes(state, args, path)
    in_chans = int(state["conv1.weight"].shape[1]) if "conv1.weight" in state else int(_arg(args, "in_chans", 3))
    model_kwargs = dict(_arg(args, "model_kwargs", {}))
    if name in model_zoo.DIDIRN_NAMES:
        # the official DiDiRN's keyword for the embedding width; its stem, width and init are ours by default
        if "cond_channels" in model_kwargs:
            model_kwargs["embed_dim"] = model_kwargs.pop("cond_channels")
    try:
        model = model_zoo.create(name, num_classes=num_classes, in_chans=in_chans, **model_kwargs)
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"cannot build model {name!r} of {str(path)!r}: {error}") from None
    _load_state(model, state, path)
    model.to(device).eval()
    meta = _official_meta(path, name, num_classes, in_chans, model_kwargs, args, extras, ema)
    diffusion = None
    if model_zoo.is_diffusion_model(model):
        from .training import diffusion_from_config

        diffusion = diffusion_from_config(meta["config"]["diffusion"], num_classes)
    else:
        meta["method"] = "classifier"
    return model, diffusion, meta


def _load_state(model, state: dict, path: Path) -> None:
    """Strict load with didicm's message naming missing/unexpected/mis-shaped tensors."""
    try:
        from .runtime import load_state
    except ImportError:  # before the loaders moved to didicm.runtime
        from .training import _load_state as load_state
    load_state(model, state, path)


def _didirn_name(state: dict, name: str | None, path: Path) -> str:
    """The didirn* variant whose block counts and kind the tensors show; checked against the file's own name."""
    from .models import DIDIRN_NAMES

    counts = []
    for stage in range(4):
        indices = {int(m.group(1)) for k in state for m in [re.match(rf"^stages\.{stage}\.(\d+)\.", k)] if m}
        counts.append(len(indices))
    bottleneck = any(k.endswith(".conv3.weight") for k in state)
    depth = _BLOCKS.get(tuple(counts))
    if depth == "34" and bottleneck:
        depth = "50"
    inferred = f"didirn{depth}" if depth else None
    if inferred is None or inferred not in DIDIRN_NAMES:
        raise CheckpointError(f"{str(path)!r} holds a DiDiRN with {counts} blocks per stage, which is none of "
                              f"{list(DIDIRN_NAMES)}")
    # CheckpointSaver without args records arch as the class name ('didirn'): no variant to check
    if name is not None and name != "didirn" and name != inferred:
        raise CheckpointError(f"{str(path)!r} says it holds {name!r} but its tensors are a {inferred}; the file is "
                              "inconsistent")
    return inferred


def _num_classes(state: dict, args: dict, path: Path) -> int:
    head = state.get("fc.weight")
    if head is None:
        head = next((v for k, v in state.items() if k.endswith("fc.weight") or k.endswith("head.fc.weight")), None)
    found = int(head.shape[0]) if head is not None else None
    declared = args.get("num_classes")
    if found is not None and declared is not None and int(declared) != found:
        raise CheckpointError(f"{str(path)!r}: args.num_classes is {declared} but the head has {found} outputs")
    if found is None and declared is None:
        raise CheckpointError(f"{str(path)!r} says nothing of its class count (no fc.weight, no args.num_classes)")
    return found if found is not None else int(declared)


def _image_size(args: dict) -> int:
    """args.input_size (C H W) or args.img_size, else timm's default 224, which the official train.py then uses."""
    size = args.get("input_size")
    if size:
        if len(size) != 3 or size[1] != size[2]:
            raise CheckpointError(f"args.input_size {list(size)} is not C H W with H = W; didicm uses square inputs")
        return int(size[1])
    return int(_arg(args, "img_size", OFFICIAL_IMAGE_SIZE))


def _official_preprocess(name: str, args: dict) -> dict:
    """The official validate.py's evaluation transform (timm's resolve_data_config): --crop-pct, --interpolation and
    --crop-mode, else the model's defaults: timm's pretrained config for a timm classifier (resnet18: 0.95,
    bicubic), timm's 0.875 / bilinear for the official DiDiRN, which has none."""
    from .models import DIDIRN_NAMES

    defaults = None if name in DIDIRN_NAMES else timm.models.get_pretrained_cfg(name)
    interpolation = _arg(args, "interpolation", "") or getattr(defaults, "interpolation", None) or "bilinear"
    crop_pct = float(_arg(args, "crop_pct") or getattr(defaults, "crop_pct", None) or FOLDER_CROP_PCT)
    crop_mode = _arg(args, "crop_mode", "") or getattr(defaults, "crop_mode", None)
    if crop_mode == "squash" and crop_pct == 1.0:  # timm's squash at crop_pct 1: both sides to the size
        return {"geometry": "resize", "interpolation": interpolation}
    return preprocess_from_options({"crop_mode": crop_mode, "crop_pct": crop_pct, "interpolation": interpolation})


def _official_meta(path: Path, name: str, num_classes: int, in_chans: int, model_kwargs: dict, args: dict,
                   extras: dict, ema: bool) -> dict:
    from .config import TrainConfig

    config = TrainConfig().to_dict()
    noise = _arg(args, "diffusion_noise", "loglinear")
    if noise not in _OFFICIAL_NOISES:
        raise CheckpointError(f"{str(path)!r} uses diffusion noise {noise!r}; didicm knows {_OFFICIAL_NOISES}")
    # official schedules: log-linear with eps 1e-3, geometric from 1e-3 to 1 (their constructors' defaults)
    config["diffusion"].update(schedule=noise, schedule_eps=1e-3, sigma_min=1e-3, sigma_max=1.0,
                               t_min=float(_arg(args, "diffusion_eps", 1e-5)))
    sampler = _arg(args, "diffusion_sampler", "cp")
    if sampler not in _OFFICIAL_SAMPLERS:
        raise CheckpointError(f"{str(path)!r} uses sampler {sampler!r}; the official samplers are {_OFFICIAL_SAMPLERS}")
    sampler_kwargs = dict(_arg(args, "diffusion_sampler_kwargs", {}))
    config["eval"].update(sampler=sampler, steps=int(_arg(args, "diffusion_steps", 8)),
                          eps=float(_arg(args, "diffusion_eps", 1e-5)), mode=sampler_kwargs.get("mode", "min"),
                          chains=int(sampler_kwargs.get("N", 10)))
    image_size = _image_size(args)
    config["data"].update(dataset=None, image_size=image_size, data_ratio=float(_arg(args, "data_ratio", 1.0)))
    config["model"].update(name=name, kwargs=model_kwargs)
    mean = [float(v) for v in _arg(args, "mean", OFFICIAL_MEAN)]
    std = [float(v) for v in _arg(args, "std", OFFICIAL_STD)]
    preprocess = _official_preprocess(name, args)
    return dict(format="official", source=str(path), ema=ema, model_name=name, model_kwargs=model_kwargs,
                num_classes=num_classes, in_chans=in_chans, image_size=image_size, mean=mean, std=std,
                preprocess=preprocess,
                classes=[str(i) for i in range(num_classes)], method="didicm", config=config,
                args={k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, list, tuple, dict))
                      or v is None}, **{k: v for k, v in extras.items() if k != "version"})


def set_class_names(meta: dict, names: str | None) -> dict:
    """``meta`` with class names from ``names``: a text file (one name per line) or a comma-separated list."""
    if not names:
        return meta
    source = Path(names)
    items = source.read_text().splitlines() if source.is_file() else names.split(",")
    items = [item.strip() for item in items if item.strip()]
    if len(items) != meta["num_classes"]:
        raise ConfigError(f"--class-names gives {len(items)} names but the model has {meta['num_classes']} classes")
    return dict(meta, classes=items)


def set_normalization(meta: dict, mean: list[float] | None, std: list[float] | None) -> dict:
    """``meta`` with the input normalization given on the command line (per channel, in [0, 1] pixel units)."""
    out = dict(meta)
    for key, value in (("mean", mean), ("std", std)):
        if value is None:
            continue
        if len(value) == 1:
            value = list(value) * meta["in_chans"]
        if len(value) != meta["in_chans"] or (key == "std" and min(value) <= 0):
            rule = "one per channel" + (", each > 0" if key == "std" else "")
            raise ConfigError(f"--{key} needs {meta['in_chans']} values ({rule}), got {list(value)}")
        out[key] = [float(v) for v in value]
    return out


def match_normalization(batches: Iterable, from_mean, from_std, to_mean, to_std) -> Iterator:
    """Re-normalize (images, labels) batches from one per-channel mean/std to another (a no-op when equal).

    Needed when a data set normalizes with its own statistics but the model was trained with others (an official
    model expects ImageNet's)."""
    same = list(map(float, from_mean)) == list(map(float, to_mean)) and \
        list(map(float, from_std)) == list(map(float, to_std))
    for images, labels in batches:
        if not same:
            shape = (1, -1, 1, 1)
            f_mean, f_std, t_mean, t_std = (torch.tensor(v, dtype=images.dtype, device=images.device).view(shape)
                                            for v in (from_mean, from_std, to_mean, to_std))
            images = ((images * f_std + f_mean) - t_mean) / t_std
        yield images, labels


def _exportable(model, meta: dict) -> None:
    """Refuse what the official DiDiRN cannot express, naming the option."""
    from .models import DIDIRN_NAMES

    name = meta["model_name"]
    if name not in DIDIRN_NAMES:
        return
    kwargs = meta.get("model_kwargs") or {}
    official = dict(stem="imagenet", parametrization="score", conditioning="add", condition_inputs=True, width=64,
                    conditioned_stages=4)
    for key, value in official.items():
        if key in kwargs and kwargs[key] != value:
            raise CheckpointError(f"the official DiDiRN has no {key}={kwargs[key]!r} (it is fixed at {value!r}); "
                                  "this model cannot be written in the official layout")
    if meta["in_chans"] != 3:
        raise CheckpointError(f"the official DiDiRN takes 3-channel images; this model takes {meta['in_chans']}")


def export_official(src: str | Path, out: str | Path, ema: bool = False) -> Path:
    """Write the didicm model at ``src`` (run folder or checkpoint) as an official-layout ``.pth.tar``.

    The file holds ``state_dict`` (official tensor names for DiDiRN; unchanged for plain timm classifiers),
    ``arch``, ``args`` (an ``argparse.Namespace`` with the model and diffusion settings the official train.py
    would have recorded), ``epoch``, ``version`` and ``metric``. The official validate.py loads it with
    ``--model <arch> --num-classes K --checkpoint OUT`` (plus ``--diffusion-enabled`` for DiDiRN).

    Raises:
        CheckpointError: ``src`` is unreadable, or its model has no official counterpart (a twin, a
            ``didicm:<backbone>`` model, or a DiDiRN option the official network lacks).
    """
    out = Path(out)
    if not str(out).endswith((".pth.tar", ".pth")):
        raise ConfigError(f"export writes a .pth.tar (or .pth) file, got {str(out)!r}")
    model, diffusion, meta = load_model(src, "cpu", ema=ema)
    if meta.get("format") == "official":
        raise CheckpointError(f"{str(src)!r} is already an official checkpoint")
    from . import models as model_zoo

    name = meta["model_name"]
    if name in model_zoo.TWIN_NAMES or name.startswith(model_zoo.BACKBONE_PREFIX) or \
            name in model_zoo.GENERATIVE_NAMES:
        raise CheckpointError(f"the official code has no {name!r}: only DiDiRN and plain timm classifiers can be "
                              "exported")
    _exportable(model, meta)
    # NCHW whatever layout the model was loaded in (a channels_last run loads NHWC)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    is_didirn = name in model_zoo.DIDIRN_NAMES
    if is_didirn:
        state = didicm_to_official(state)
    config = meta["config"]
    size = int(meta["image_size"])
    preprocess = preprocess_of(meta)
    model_kwargs = {}
    embed_dim = (meta.get("model_kwargs") or {}).get("embed_dim", 128)
    if is_didirn and embed_dim != 128:
        model_kwargs["cond_channels"] = embed_dim
    eval_cfg = config["eval"]
    sampler = eval_cfg["sampler"] if eval_cfg["sampler"] in _OFFICIAL_SAMPLERS else "cp"
    sampler_kwargs = {"mode": eval_cfg["mode"]} if sampler == "cp" else {"N": eval_cfg["chains"]}
    args = argparse.Namespace(
        model=name, num_classes=meta["num_classes"], in_chans=meta["in_chans"],
        input_size=[meta["in_chans"], size, size], img_size=size, mean=list(meta["mean"]), std=list(meta["std"]),
        # timm's words for it (squash at crop_pct 1 is a plain resize)
        **folder_transform_of(preprocess),
        model_kwargs=model_kwargs,
        data_ratio=config["data"].get("data_ratio"), model_ema=bool(ema),
        diffusion_enabled=is_didirn, diffusion_noise=config["diffusion"]["schedule"],
        diffusion_eps=float(eval_cfg["eps"]), diffusion_steps=int(eval_cfg["steps"]),
        diffusion_sampler=sampler, diffusion_sampler_kwargs=sampler_kwargs,
    )
    metric = None
    val = (meta.get("metrics") or {}).get("val") or {}
    if val:
        metric = next(iter(val.values())).get("top1")
    payload = {"epoch": int(meta.get("epoch") or 0), "arch": name, "state_dict": state, "version": 2,
               "args": args, "metric": metric}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out)
    return out
