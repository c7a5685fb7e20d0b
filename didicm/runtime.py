"""What training, evaluation and the CLI share: the device, the process group, building and loading models, the
diffusion of a config and the default samplers."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from . import models as model_zoo
from .checkpoint import load_checkpoint
from .diffusion import UniformDiffusion, create_schedule
from .errors import CheckpointError, ConfigError
from .evaluation import SamplerSpec

__all__ = ["resolve_device", "device_name", "init_distributed", "build_model", "apply_init", "diffusion_from_config",
           "default_eval_specs", "load_state", "load_trained_model", "GENERATIVE_EVAL_DRAWS", "GENERATIVE_EVAL_IMAGES"]

# the generative peer's end-of-training check: the Diffusion Classifier on the first validation images, which
# also fits the scale that turns its errors into probabilities (K x draws network calls per image)
GENERATIVE_EVAL_DRAWS = 10
GENERATIVE_EVAL_IMAGES = 200


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return device


def device_name(model: torch.nn.Module) -> str:
    """Where the model's weights live, for results: the GPU's name, or 'cpu'."""
    parameter = next(model.parameters())
    return torch.cuda.get_device_name(parameter.device) if parameter.is_cuda else "cpu"


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int]:
    """(rank, world size): joins the torchrun process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPUs),
    with ``timeout_minutes`` for every collective instead of NCCL's 10-minute default."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_model(name: str, num_classes: int, in_chans: int, kwargs: dict | None = None) -> torch.nn.Module:
    return model_zoo.create(name, num_classes=num_classes, in_chans=in_chans, **(kwargs or {}))


def apply_init(model: torch.nn.Module, init: str) -> torch.nn.Module:
    """'default': the model's own init. 'torch': every layer's ``reset_parameters`` (PyTorch's defaults), which
    is how the official DiDiRN starts (its code sets no init of its own)."""
    if init == "torch":
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    elif init != "default":
        raise ConfigError(f"model.init must be 'default' or 'torch', got {init!r}")
    return model


def diffusion_from_config(diffusion_cfg: dict, num_classes: int) -> UniformDiffusion:
    if diffusion_cfg["schedule"] == "loglinear":
        schedule = create_schedule("loglinear", eps=diffusion_cfg["schedule_eps"])
    else:
        schedule = create_schedule(diffusion_cfg["schedule"], sigma_min=diffusion_cfg["sigma_min"],
                                   sigma_max=diffusion_cfg["sigma_max"])
    return UniformDiffusion(num_classes, schedule)


def default_eval_specs(model, eval_cfg) -> list[SamplerSpec]:
    """The sampler of the config for DiDiCM models; the softmax for classifiers; for the generative peer, the
    Diffusion Classifier with eval.steps draws per class when eval.sampler is 'dc' (eval.mode 'adaptive' for
    the adaptive variant), else GENERATIVE_EVAL_DRAWS."""
    if model_zoo.is_generative_model(model):
        if eval_cfg["sampler"] == "dc":
            return [SamplerSpec("dc", steps=eval_cfg["steps"],
                                mode="adaptive" if eval_cfg["mode"] == "adaptive" else "full")]
        return [SamplerSpec("dc", steps=GENERATIVE_EVAL_DRAWS, mode="full")]
    if not model_zoo.is_diffusion_model(model):
        return [SamplerSpec("classifier")]
    if eval_cfg["sampler"] == "mean":
        return [SamplerSpec("mean")]
    return [SamplerSpec(eval_cfg["sampler"], steps=eval_cfg["steps"], chains=eval_cfg["chains"],
                        mode=eval_cfg["mode"], grid=eval_cfg["grid"], eps=eval_cfg["eps"],
                        update=eval_cfg.get("update", "euler"))]


def load_state(model: torch.nn.Module, state: dict, path) -> None:
    """``model.load_state_dict(state)``, with a CheckpointError that names the first mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        details = []
        if wrong:
            k = wrong[0]
            details.append(f"{len(wrong)} shape mismatches (first: {k} is {tuple(state[k].shape)} in the checkpoint, "
                           f"{tuple(own[k].shape)} in the model)")
        if missing:
            details.append(f"{len(missing)} missing tensors (first: {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensors (first: {unexpected[0]})")
        raise CheckpointError(f"checkpoint {path} does not match the model: " + "; ".join(details) +
                              ". Check --model, its options and the class count against the checkpoint's .json")
    model.load_state_dict(state)


def load_trained_model(path, device: torch.device | str = "cpu", num_classes: int | None = None,
                       channels_last: bool | None = None):
    """(model in eval mode, diffusion or None, checkpoint meta) from a final model or a training checkpoint.

    ``channels_last``: NHWC weights (True), NCHW (False), or the layout the run trained in (None, the default:
    how ``eval``, ``predict`` and the study run it)."""
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    if meta.get("format") == "foreign":
        raise CheckpointError(f"{path} is a plain state dict without a didicm description; didicm eval/predict "
                              "need a checkpoint written by didicm train")
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise CheckpointError(f"checkpoint {ckpt.path} was trained on {meta['num_classes']} classes but the data "
                              f"set has {num_classes}; evaluate it on the data it was trained for")
    model = build_model(meta["model_name"], meta["num_classes"], meta["in_chans"], meta.get("model_kwargs"))
    section = ckpt.section("model")
    if meta.get("kind") == "train_state" and ckpt.section("ema"):
        section = ckpt.section("ema")
    load_state(model, section, ckpt.path)
    model.to(device).eval()
    if meta.get("config", {}).get("channels_last") if channels_last is None else channels_last:
        model.to(memory_format=torch.channels_last)
    diffusion = diffusion_from_config(meta["config"]["diffusion"], meta["num_classes"]) \
        if model_zoo.is_diffusion_model(model) else None
    return model, diffusion, meta
