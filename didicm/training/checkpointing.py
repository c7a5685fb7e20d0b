"""Training state on disk: resumable checkpoints (weights, optimizer, EMA, loss scaler, selection) and restoring
them."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import flatten_optimizer_state, load_checkpoint, save_checkpoint, unflatten_optimizer_state
from ..config import TrainConfig
from ..errors import CheckpointError
from ..runtime import load_state

__all__ = ["save_state", "restore", "save_model"]


def save_model(path: Path, model, meta: dict) -> None:
    """The weights alone (``model/*`` tensors) with a description, e.g. best.safetensors or model.safetensors."""
    save_checkpoint(path, {f"model/{k}": v for k, v in model.state_dict().items()}, meta)


def save_state(ckpt_dir: Path, step: int, model, optimizer, ema, meta_base: dict, bad_total: int, keep: int,
               seconds: float, epoch: float, selection: dict | None = None, scaler=None,
               loss_average: float | None = None) -> None:
    """``step_<step>.safetensors`` with everything a bit-for-bit resume needs; keeps the newest ``keep``."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    optim_tensors, optim_rest = flatten_optimizer_state(optimizer.state_dict())
    tensors.update({f"optim/{k}": v for k, v in optim_tensors.items()})
    if ema is not None:
        tensors.update({f"ema/{k}": v for k, v in ema.module.state_dict().items()})
    save_checkpoint(ckpt_dir / f"step_{step:08d}.safetensors", tensors,
                    dict(meta_base, kind="train_state", step=step, epoch=epoch, bad_steps=bad_total,
                         train_seconds=round(seconds, 3), optimizer=optim_rest, selection=selection,
                         scaler=scaler.state_dict() if scaler is not None else None, loss_average=loss_average))
    steps = sorted(p for p in ckpt_dir.glob("step_*.json"))
    for old in steps[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)


def _match_state_layout(optimizer) -> None:
    """Give each per-parameter state tensor its parameter's memory layout. Checkpoints store contiguous tensors;
    under channels_last the parameters are not, and fused optimizers want matching layouts (values unchanged)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def restore(path: Path, model, optimizer, ema, cfg: TrainConfig, scaler=None
            ) -> tuple[int, int, float, dict | None, float | None]:
    """Load a training checkpoint into the objects; returns (step, bad steps, training seconds, selection state,
    the logged loss's moving average)."""
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    if meta.get("model_name") != cfg.model.name:
        raise CheckpointError(f"cannot resume: {path} holds model {meta.get('model_name')!r} but the config asks "
                              f"for {cfg.model.name!r}; use another output folder or the same model")
    load_state(model, ckpt.section("model"), path)
    # load_state_dict also restores the saved param groups' implementation flags: keep this run's (a checkpoint
    # of an unfused run resumed with a fused optimizer, e.g. sync-free on a GPU, must still step the fused way)
    implementation = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(unflatten_optimizer_state(ckpt.section("optim"), meta["optimizer"]))
    for group, flags in zip(optimizer.param_groups, implementation, strict=True):
        group.update(flags)
    _match_state_layout(optimizer)
    if ema is not None:
        section = ckpt.section("ema")
        if not section:
            raise CheckpointError(f"cannot resume with EMA from {path}: it was saved without EMA")
        load_state(ema.module, section, path)
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return (int(meta["step"]), int(meta.get("bad_steps", 0)), float(meta.get("train_seconds", 0.0)),
            meta.get("selection"), meta.get("loss_average"))
