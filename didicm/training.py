"""The training loop: DiDiCM (score entropy) or a cross-entropy classifier, one config, resumable.

Determinism: before each optimizer step every RNG (torch, numpy, python) is seeded from (seed, step, rank),
and the data stream is a pure function of (seed, step) (see didicm.loader). A checkpoint therefore only needs
the weights, the optimizer and EMA state and the step: resuming reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from . import models as model_zoo
from . import peers
from .checkpoint import (
    flatten_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)
from .config import TrainConfig
from .data import create_dataset
from .diffusion import UniformDiffusion, create_schedule
from .errors import CheckpointError, ConfigError, DidicmError
from .evaluation import SamplerSpec, collect_probs, evaluate
from .loader import TrainStream, eval_batches, mix_seed
from .objectives import cross_entropy_loss, diffusion_loss, epsilon_loss, noisy_label_cross_entropy
from .selection import Selection, selection_scores

__all__ = ["TrainingError", "TrainResult", "train", "build_model", "device_name", "diffusion_from_config",
           "resolve_device", "load_trained_model", "default_eval_specs"]


class TrainingError(DidicmError, RuntimeError):
    """Training cannot go on (for example, too many consecutive non-finite losses)."""


@dataclass
class TrainResult:
    run_dir: Path
    model: torch.nn.Module  # the weights evaluation should use (the EMA copy when EMA is on)
    diffusion: UniformDiffusion | None  # None for cross-entropy models
    metrics: dict
    steps_done: int
    bad_steps: int
    seconds: float


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


def diffusion_from_config(diffusion_cfg: dict, num_classes: int) -> UniformDiffusion:
    if diffusion_cfg["schedule"] == "loglinear":
        schedule = create_schedule("loglinear", eps=diffusion_cfg["schedule_eps"])
    else:
        schedule = create_schedule(diffusion_cfg["schedule"], sigma_min=diffusion_cfg["sigma_min"],
                                   sigma_max=diffusion_cfg["sigma_max"])
    return UniformDiffusion(num_classes, schedule)


# the generative peer's end-of-training check: the Diffusion Classifier on the first validation images, which
# also fits the scale that turns its errors into probabilities (K x draws network calls per image)
GENERATIVE_EVAL_DRAWS = 10
GENERATIVE_EVAL_IMAGES = 200


def device_name(model: torch.nn.Module) -> str:
    """Where the model's weights live, for results: the GPU's name, or 'cpu'."""
    parameter = next(model.parameters())
    return torch.cuda.get_device_name(parameter.device) if parameter.is_cuda else "cpu"


def build_model(name: str, num_classes: int, in_chans: int, kwargs: dict | None = None) -> torch.nn.Module:
    return model_zoo.create(name, num_classes=num_classes, in_chans=in_chans, **(kwargs or {}))


def default_eval_specs(model, eval_cfg) -> list[SamplerSpec]:
    """The sampler of the config for DiDiCM models; the softmax for classifiers; the Diffusion Classifier with
    GENERATIVE_EVAL_DRAWS draws for the generative peer."""
    if model_zoo.is_generative_model(model):
        return [SamplerSpec("dc", steps=GENERATIVE_EVAL_DRAWS, mode="full")]
    if not model_zoo.is_diffusion_model(model):
        return [SamplerSpec("classifier")]
    if eval_cfg["sampler"] == "mean":
        return [SamplerSpec("mean")]
    return [SamplerSpec(eval_cfg["sampler"], steps=eval_cfg["steps"], chains=eval_cfg["chains"],
                        mode=eval_cfg["mode"], grid=eval_cfg["grid"], eps=eval_cfg["eps"])]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _write_csv_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _open_tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: only if tensorboard is installed
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def train(config: TrainConfig, resume: bool = False, progress: bool = True, log=print,
          fault_after_steps: int | None = None) -> TrainResult:
    """Train the model of ``config``; write checkpoints, a CSV log and the final model under config.output.

    Args:
        resume: continue from the newest complete checkpoint in the output folder (bit-for-bit the same run).
        fault_after_steps: testing hook: raise KeyboardInterrupt after this many steps of this call.
    """
    cfg = config.validate()
    started = time.perf_counter()
    rank, world = _distributed()
    main = rank == 0
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    run_dir = Path(cfg.output)
    ckpt_dir = run_dir / "checkpoints"
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if cfg.optim.batch_size % world:
        raise ConfigError(f"optim.batch_size {cfg.optim.batch_size} must be divisible by the {world} processes")

    d = cfg.data
    common = dict(root=d.root, image_size=d.image_size, degradation=d.degradation, data_ratio=d.data_ratio,
                  val_size=d.val_size, seed=d.split_seed, on_bad_image=d.on_bad_image)
    train_set = create_dataset(d.dataset, "train", augment=d.augment, **common)
    val_set = create_dataset(d.dataset, "val", augment=False, **common)
    num_classes, in_chans = train_set.num_classes, train_set.in_chans

    torch.manual_seed(cfg.seed)  # model initialisation
    model = build_model(cfg.model.name, num_classes, in_chans, cfg.model.kwargs).to(device)
    is_diffusion = model_zoo.is_diffusion_model(model)
    is_generative = model_zoo.is_generative_model(model)
    if is_generative and (cfg.optim.noisy_labels or cfg.optim.mixup > 0 or cfg.optim.cutmix > 0
                          or cfg.optim.label_smoothing > 0):
        raise ConfigError("the generative 'unet' model trains on hard labels with the epsilon loss: set "
                          "optim.noisy_labels=false, optim.mixup=0, optim.cutmix=0, optim.label_smoothing=0")
    # the noisy-label control arm draws its label noise from the same schedule as DiDiCM
    diffusion = diffusion_from_config(cfg.to_dict()["diffusion"], num_classes) \
        if is_diffusion or cfg.optim.noisy_labels else None
    optimizer = create_optimizer_v2(model, opt=cfg.optim.opt, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                    momentum=cfg.optim.momentum)
    # budgets in epochs become steps: an epoch is one pass over this run's training split
    steps_per_epoch = math.ceil(len(train_set) / cfg.optim.batch_size)
    total_steps = cfg.optim.steps if cfg.optim.epochs is None else math.ceil(cfg.optim.epochs * steps_per_epoch)
    warmup_steps = cfg.optim.warmup_steps if cfg.optim.warmup_epochs is None else \
        round(cfg.optim.warmup_epochs * steps_per_epoch)
    interval = _validation_interval(cfg, steps_per_epoch)
    selection = Selection(cfg.eval.select, cfg.optim.patience, cfg.optim.lr_patience, cfg.optim.lr_decay) \
        if cfg.eval.select else None
    plateau = cfg.optim.sched == "plateau"
    scheduler = None
    if not plateau:
        scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.optim.sched, num_epochs=total_steps,
                                           warmup_epochs=warmup_steps, min_lr=cfg.optim.min_lr,
                                           warmup_lr=cfg.optim.lr * 1e-2)
    ema = ModelEmaV3(model, decay=cfg.optim.ema_decay) if cfg.optim.ema_decay else None
    mix = cfg.optim.mixup > 0 or cfg.optim.cutmix > 0
    mixup = Mixup(mixup_alpha=cfg.optim.mixup, cutmix_alpha=cfg.optim.cutmix, label_smoothing=0.0,
                  num_classes=num_classes) if mix else None
    if cfg.diffusion.ce_weight > 0 and world > 1:
        # the hybrid loss runs a second forward pass outside DDP's wrapper, which DDP cannot synchronise
        raise ConfigError("diffusion.ce_weight > 0 (hybrid loss) is single-process only; set it to 0 under torchrun")
    if cfg.diffusion.ce_weight > 0 and getattr(model, "parametrization", None) != "mean":
        raise ConfigError("diffusion.ce_weight > 0 needs a model with parametrization 'mean' (clean logits)")
    if mix and (cfg.optim.batch_size // world) % 2:
        raise ConfigError("mixup/cutmix need an even per-process batch size")

    start_step, bad_total, earlier_seconds = 0, 0, 0.0  # earlier_seconds: training time before a resume
    if resume:
        found = latest_checkpoint(run_dir)
        if found is not None:
            start_step, bad_total, earlier_seconds, state = _restore(found, model, optimizer, ema, cfg)
            if selection is not None and state is not None:
                selection = Selection.from_state(state)
            if main:
                log(f"resuming from {found} at step {start_step}")

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                                else None)
    use_amp = cfg.optim.amp and device.type == "cuda"
    stream = TrainStream(train_set, cfg.optim.batch_size, cfg.seed, rank, world, d.num_workers, device)
    log_path = run_dir / "log.csv"
    writer = _open_tensorboard(run_dir) if main else None
    meta_base = dict(config=cfg.to_dict(), classes=list(train_set.classes), num_classes=num_classes,
                     in_chans=in_chans, image_size=train_set.image_size, mean=list(train_set.mean),
                     std=list(train_set.std), model_name=cfg.model.name,
                     model_kwargs=cfg.model.kwargs,
                     method="didicm" if is_diffusion else "generative" if is_generative else "classifier",
                     world_size=world)

    bar = None
    if progress and main:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, leave=False)
    consecutive_bad, step, running = 0, start_step, None
    val_specs = default_eval_specs(model, cfg.to_dict()["eval"])
    train_model.train()
    for images, targets in stream.batches(start_step, total_steps):
        if selection is not None and selection.should_stop:
            break  # a resumed run that had already stopped
        _seed_everything(mix_seed(cfg.seed, 2, step, rank))
        if mixup is not None:
            images, targets = mixup(images, targets)
        if plateau:
            _set_lr(optimizer, cfg.optim.lr * selection.lr_scale * min(1.0, 0.01 + 0.99 * step / max(warmup_steps, 1)))
        else:
            scheduler.step(step)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            if is_generative:
                loss = epsilon_loss(train_model, images, targets)
            elif is_diffusion:
                loss = diffusion_loss(train_model, diffusion, images, targets, t_min=cfg.diffusion.t_min,
                                      t_sampling=cfg.diffusion.t_sampling, ce_weight=cfg.diffusion.ce_weight)
            elif cfg.optim.noisy_labels:
                loss = noisy_label_cross_entropy(train_model(images), targets, diffusion, cfg.diffusion.t_min,
                                                 cfg.diffusion.t_sampling)
            else:
                loss = cross_entropy_loss(train_model(images), targets, cfg.optim.label_smoothing)
            loss = loss.mean()
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        if world > 1:  # every process must agree to skip, or DDP's collectives would hang
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        optimizer.zero_grad(set_to_none=True)
        if finite.item() < 1:
            consecutive_bad += 1
            bad_total += 1
            if main:
                log(f"step {step}: non-finite loss ({loss.item()}), step skipped "
                    f"({consecutive_bad} in a row, {bad_total} in all)")
            if consecutive_bad >= cfg.optim.max_bad_steps:
                raise TrainingError(
                    f"{consecutive_bad} consecutive non-finite losses at step {step}: training stopped. "
                    "Check the inputs for NaN/Inf, lower optim.lr, or set optim.clip_grad; the last complete "
                    f"checkpoint is in {ckpt_dir}")
        else:
            consecutive_bad = 0
            loss.backward()
            if cfg.optim.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            if ema is not None:
                ema.update(model, step=step)
            value = loss.item()
            running = value if running is None else 0.95 * running + 0.05 * value
        step += 1
        if main:
            lr = optimizer.param_groups[0]["lr"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}" if running is not None else "nan", lr=f"{lr:.2e}")
            if step % 10 == 0 or step == total_steps:
                _write_csv_row(log_path, dict(step=step, epoch=round(stream.epoch_of(step), 4), loss=running,
                                              lr=lr, bad_steps=bad_total,
                                              seconds=round(time.perf_counter() - started, 3)))
                if writer is not None:
                    writer.add_scalar("train/loss", running or float("nan"), step)
            validate = selection is not None and (step % interval == 0 or step == total_steps)
            if validate:
                current = ema.module if ema is not None else model
                probs, labels = collect_probs(current, eval_batches(val_set, cfg.eval.batch_size, device),
                                              val_specs[0], diffusion, seed=cfg.seed)
                train_model.train()
                scores = selection_scores(probs, labels)
                if selection.update(step, stream.epoch_of(step), scores):
                    save_checkpoint(run_dir / "best.safetensors",
                                    {f"model/{k}": v for k, v in current.state_dict().items()},
                                    dict(meta_base, kind="model", step=step, epoch=stream.epoch_of(step)))
                _write_csv_row(run_dir / "validation.csv", selection.history[-1])
                if bar is not None:
                    bar.set_description(f"train (val {cfg.eval.select} {scores[cfg.eval.select]:.4g}, best "
                                        f"{selection.best_value:.4g} at epoch {selection.best_epoch:.1f})")
            if validate or (step % cfg.checkpoint_every == 0 and step < total_steps):
                _save_state(ckpt_dir, step, model, optimizer, ema, meta_base, bad_total, cfg.keep_checkpoints,
                            earlier_seconds + time.perf_counter() - started, stream.epoch_of(step),
                            selection.state_dict() if selection is not None else None)
        if fault_after_steps is not None and step - start_step >= fault_after_steps:
            raise KeyboardInterrupt(f"fault injected after step {step}")
        if selection is not None and selection.should_stop:
            break
    if bar is not None:
        bar.close()

    train_seconds = earlier_seconds + time.perf_counter() - started  # all sessions of a resumed run
    final = ema.module if ema is not None else model
    metrics = {}
    if selection is not None and selection.best_step is not None:
        if selection.best_step != step:  # the best validation's weights, from the file written when it happened
            _load_state(final, load_checkpoint(run_dir / "best.safetensors").section("model"),
                        run_dir / "best.safetensors")
    if main:
        _save_state(ckpt_dir, step, model, optimizer, ema, meta_base, bad_total, cfg.keep_checkpoints,
                    earlier_seconds + time.perf_counter() - started, stream.epoch_of(step),
                    selection.state_dict() if selection is not None else None)
        specs = default_eval_specs(final, cfg.to_dict()["eval"])
        batches = eval_batches(val_set, cfg.eval.batch_size, device)
        if is_generative:  # fit the probability scale on some validation images, report on others
            images, labels = next(iter(eval_batches(val_set, 2 * GENERATIVE_EVAL_IMAGES, device)))
            fit = min(GENERATIVE_EVAL_IMAGES, len(labels) // 2)
            peers.calibrate_error_scale(final, [(images[:fit], labels[:fit])], GENERATIVE_EVAL_DRAWS, seed=cfg.seed)
            batches = [(images[fit:], labels[fit:])]
        results = evaluate(final, batches, specs, diffusion, seed=cfg.seed, num_classes=num_classes)
        metrics = {"val": results, "train_seconds": round(train_seconds, 2), "bad_steps": bad_total,
                   "steps_run": step, "epochs_run": round(stream.epoch_of(step), 4), "steps_per_epoch": steps_per_epoch}
        if selection is not None:
            # converged: training went on past its best validation (it stopped by patience, or at least the
            # budget's end was not the best point); otherwise a longer budget might still help
            metrics["selection"] = {"metric": selection.metric, "best_step": selection.best_step,
                                    "best_epoch": round(selection.best_epoch, 4), "best_value": selection.best_value,
                                    "stopped_early": selection.should_stop,
                                    "converged": selection.best_step < step, "lr_scale": selection.lr_scale,
                                    "history": selection.history}
        save_checkpoint(run_dir / "model.safetensors", {f"model/{k}": v for k, v in final.state_dict().items()},
                        dict(meta_base, kind="model", step=step, metrics=metrics))
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if writer is not None:
        writer.close()
    if world > 1:
        dist.barrier()
    return TrainResult(run_dir, final, diffusion if is_diffusion else None, metrics, step, bad_total,
                       time.perf_counter() - started)


def _validation_interval(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Steps between validations: eval_every, or eval_every_epochs in steps, the longer; one epoch if only
    eval.select asks for validation."""
    by_epochs = math.ceil(cfg.eval_every_epochs * steps_per_epoch) if cfg.eval_every_epochs else 0
    interval = max(cfg.eval_every, by_epochs)
    return interval if interval > 0 else steps_per_epoch


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _save_state(ckpt_dir: Path, step: int, model, optimizer, ema, meta_base: dict, bad_total: int, keep: int,
                seconds: float, epoch: float, selection: dict | None = None) -> None:
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    optim_tensors, optim_rest = flatten_optimizer_state(optimizer.state_dict())
    tensors.update({f"optim/{k}": v for k, v in optim_tensors.items()})
    if ema is not None:
        tensors.update({f"ema/{k}": v for k, v in ema.module.state_dict().items()})
    save_checkpoint(ckpt_dir / f"step_{step:08d}.safetensors", tensors,
                    dict(meta_base, kind="train_state", step=step, epoch=epoch, bad_steps=bad_total,
                         train_seconds=round(seconds, 3), optimizer=optim_rest, selection=selection))
    steps = sorted(p for p in ckpt_dir.glob("step_*.json"))
    for old in steps[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)


def _restore(path: Path, model, optimizer, ema, cfg: TrainConfig) -> tuple[int, int, float, dict | None]:
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    if meta.get("model_name") != cfg.model.name:
        raise CheckpointError(f"cannot resume: {path} holds model {meta.get('model_name')!r} but the config asks "
                              f"for {cfg.model.name!r}; use another output folder or the same model")
    _load_state(model, ckpt.section("model"), path)
    optimizer.load_state_dict(unflatten_optimizer_state(ckpt.section("optim"), meta["optimizer"]))
    if ema is not None:
        section = ckpt.section("ema")
        if not section:
            raise CheckpointError(f"cannot resume with EMA from {path}: it was saved without EMA")
        _load_state(ema.module, section, path)
    return (int(meta["step"]), int(meta.get("bad_steps", 0)), float(meta.get("train_seconds", 0.0)),
            meta.get("selection"))


def _load_state(model: torch.nn.Module, state: dict, path) -> None:
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


def load_trained_model(path, device: torch.device | str = "cpu", num_classes: int | None = None):
    """(model in eval mode, diffusion or None, checkpoint meta) from a final model or a training checkpoint."""
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
    _load_state(model, section, ckpt.path)
    model.to(device).eval()
    diffusion = diffusion_from_config(meta["config"]["diffusion"], meta["num_classes"]) \
        if model_zoo.is_diffusion_model(model) else None
    return model, diffusion, meta
