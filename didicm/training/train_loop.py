"""The training loop: DiDiCM (score entropy) or a cross-entropy classifier, one config, resumable.

It ties the pieces as timm's train.py does: the data stream (didicm.loader), one update per step (one_step), the
validation every so many steps or epochs with best-checkpoint selection (validation, didicm.selection) and the
checkpoints (checkpointing).

Determinism: before each optimizer step every RNG (torch, numpy, python) is seeded from (seed, step, rank),
and the data stream is a pure function of (seed, step) (see didicm.loader). A checkpoint therefore only needs
the weights, the optimizer, EMA and loss-scaler state and the step: resuming reproduces the uninterrupted run
exactly.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3, distribute_bn

from .. import models as model_zoo
from .. import peers
from ..checkpoint import latest_checkpoint, load_checkpoint
from ..config import TrainConfig
from ..data import create_dataset
from ..diffusion import UniformDiffusion
from ..errors import ConfigError
from ..evaluation import evaluate
from ..loader import TrainStream, eval_batches, mix_seed, seed_all
from ..metrics import MetricAccumulator
from ..runtime import (
    GENERATIVE_EVAL_IMAGES,
    apply_init,
    build_model,
    default_eval_specs,
    device_name,
    diffusion_from_config,
    init_distributed,
    load_state,
    resolve_device,
)
from ..selection import Selection, selection_scores
from .checkpointing import restore, save_model, save_state
from .one_step import FUSED_OPTIMIZERS, LossMeter, LrSchedule, Updater
from .validation import validate, validation_loss

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    model: torch.nn.Module  # the weights evaluation should use (the EMA copy when EMA is on)
    diffusion: UniformDiffusion | None  # None for cross-entropy models
    metrics: dict
    steps_done: int
    bad_steps: int
    seconds: float


def _write_csv_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop a CSV log's rows past ``last_step``: a resumed run writes them again, so the log stays one row per
    step."""
    if not path.exists():
        return
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    keep = [row for row in rows if int(float(row["step"])) <= last_step]
    if len(keep) == len(rows):
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)


def _open_tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: only if tensorboard is installed
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _validation_interval(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Steps between validations: eval_every, or eval_every_epochs in steps, the longer; one epoch if only
    eval.select asks for validation."""
    by_epochs = math.ceil(cfg.eval_every_epochs * steps_per_epoch) if cfg.eval_every_epochs else 0
    interval = max(cfg.eval_every, by_epochs)
    return interval if interval > 0 else steps_per_epoch


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@contextlib.contextmanager
def run_lock(run_dir: Path, enabled: bool = True):
    """One training process per run folder. Two would interleave checkpoints and logs (each resumes from the same
    checkpoint), so a second is refused while the first lives; a lock whose process is gone (killed) is taken
    over. The lock file names its owner by PID and start time, so a PID reused by an unrelated process (after a
    restart) does not hold the folder; it is removed when training ends, however it ends."""
    if not enabled:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "train.lock"
    # the lock appears with its content (written to a private file, then hard-linked into place), so a reader never
    # sees an empty lock and takes it for a dead one
    mine = run_dir / f".train.lock.{os.getpid()}"
    mine.write_text(f"{os.getpid()} {_process_start(os.getpid()) or ''}".strip())
    try:
        _take_lock(mine, path, run_dir)
    finally:
        mine.unlink(missing_ok=True)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _take_lock(mine: Path, path: Path, run_dir: Path) -> None:
    for _ in range(3):
        try:
            os.link(mine, path)
            return
        except FileExistsError:
            owner = lock_owner(path)
            if owner is not None and owner != os.getpid():
                raise ConfigError(f"{run_dir} is being trained by process {owner} (its lock: {path}); wait for it, "
                                  "stop it, or train into another output folder") from None
            path.unlink(missing_ok=True)  # left by a process that is gone
        except OSError:  # a file system without hard links: create it exclusively, then write
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(mine.read_text())
            return
    raise ConfigError(f"could not take the training lock {path}")


def lock_owner(path: Path) -> int | None:
    """The PID of the live process holding the training lock at ``path``; None when there is no lock, it cannot be
    read, or its owner is gone (a dead process, or a PID since reused by another one)."""
    try:
        fields = path.read_text().split()
        owner, started = int(fields[0]), (fields[1] if len(fields) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None
    return owner if owner and _process_alive(owner, started) else None


def selection_for(cfg) -> Selection | None:
    """The model-selection rule of a training config (None without ``eval.select``)."""
    o = cfg.optim
    return Selection(cfg.eval.select, o.patience, o.lr_patience, o.lr_decay, o.min_delta) if cfg.eval.select else None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in parentheses may hold spaces


def _process_alive(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` runs and, when its start time was recorded, is the same process that recorded it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    if started is not None:
        now = _process_start(pid)
        return now is None or now == started
    return True


def train(config: TrainConfig, resume: bool = False, progress: bool = True, log=print,
          fault_after_steps: int | None = None) -> TrainResult:
    """Train the model of ``config``; write checkpoints, a CSV log and the final model under config.output.

    Args:
        resume: continue from the newest complete checkpoint in the output folder (bit-for-bit the same run).
        fault_after_steps: testing hook: raise KeyboardInterrupt after this many steps of this call.
    """
    config = config.validate()  # a bad config fails before any folder is made
    # torchrun's rank 0 holds the lock for every rank of the run
    with run_lock(Path(config.output), enabled=int(os.environ.get("RANK", "0")) == 0):
        return _train(config, resume, progress, log, fault_after_steps)


def _train(config: TrainConfig, resume: bool, progress: bool, log, fault_after_steps: int | None) -> TrainResult:
    cfg = config.validate()
    started = time.perf_counter()
    rank, world = init_distributed(cfg.dist_timeout)
    main = rank == 0
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    run_dir = Path(cfg.output)
    ckpt_dir = run_dir / "checkpoints"
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    o, d = cfg.optim, cfg.data
    batch_size = o.batch_size_per_gpu * world if o.batch_size_per_gpu else o.batch_size
    if batch_size % world:
        raise ConfigError(f"optim.batch_size {batch_size} must be divisible by the {world} processes")

    common = dict(root=d.root, image_size=d.image_size, degradation=d.degradation, data_ratio=d.data_ratio,
                  val_size=d.val_size, seed=d.split_seed, on_bad_image=d.on_bad_image, ratio_rule=d.ratio_rule)
    if d.transform:
        common["transform"] = d.transform
    train_set = create_dataset(d.dataset, "train", augment=d.augment, **common)
    val_set = create_dataset(d.dataset, d.eval_split, augment=False, **common)
    num_classes, in_chans = train_set.num_classes, train_set.in_chans

    torch.manual_seed(cfg.seed)  # model initialisation
    model = apply_init(build_model(cfg.model.name, num_classes, in_chans, cfg.model.kwargs), cfg.model.init)
    model = model.to(device, memory_format=torch.channels_last) if cfg.channels_last else model.to(device)
    is_diffusion = model_zoo.is_diffusion_model(model)
    is_generative = model_zoo.is_generative_model(model)
    kind = "didicm" if is_diffusion else "generative" if is_generative else "classifier"
    if is_generative and (o.noisy_labels or o.mixup > 0 or o.cutmix > 0 or o.label_smoothing > 0):
        raise ConfigError("the generative 'unet' model trains on hard labels with the epsilon loss: set "
                          "optim.noisy_labels=false, optim.mixup=0, optim.cutmix=0, optim.label_smoothing=0")
    if cfg.eval.select == "loss" and not is_generative:
        raise ConfigError("eval.select 'loss' (the held-out denoising loss) is for the generative 'unet' model; "
                          "select classifiers and DiDiCM on their predictions: nll_ts, nll or top1")
    if cfg.eval.sampler == "dc" and not is_generative:
        raise ConfigError("eval.sampler 'dc' (the Diffusion Classifier) is for the generative 'unet' model only")
    # the noisy-label control arm draws its label noise from the same schedule as DiDiCM
    diffusion = diffusion_from_config(cfg.to_dict()["diffusion"], num_classes) \
        if is_diffusion or o.noisy_labels else None
    lr = o.lr * (math.sqrt(1.0 / d.data_ratio) if o.lr_ratio_scale == "sqrt" else 1.0)
    # sync-free steps (no host read per step) need a fused torch optimizer; 'auto' uses them on GPUs when they exist
    sync_free = o.sync_free if isinstance(o.sync_free, bool) else \
        device.type == "cuda" and o.opt.lower() in FUSED_OPTIMIZERS
    if sync_free and o.opt.lower() not in FUSED_OPTIMIZERS:
        raise ConfigError(f"optim.sync_free needs optim.opt one of {', '.join(FUSED_OPTIMIZERS)} (torch's fused "
                          f"optimizers skip an update on the device), got {o.opt!r}; or set optim.sync_free: auto")
    optimizer = create_optimizer_v2(model, opt=o.opt, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                    **({"fused": True} if sync_free else {}))
    stream = TrainStream(train_set, batch_size, cfg.seed, rank, world, d.num_workers, device,
                         repeats=d.aug_repeats, erasing=dict(probability=d.reprob, mode=d.remode))
    # budgets in epochs become steps: an epoch is one pass over this run's training split (the repeated-
    # augmentation epoch with data.aug_repeats)
    steps_per_epoch = math.ceil(stream.epoch_length / batch_size)
    total_steps = o.steps if o.epochs is None else math.ceil(o.epochs * steps_per_epoch)
    warmup_steps = o.warmup_steps if o.warmup_epochs is None else round(o.warmup_epochs * steps_per_epoch)
    interval = _validation_interval(cfg, steps_per_epoch)
    selection = selection_for(cfg)
    plateau = o.sched == "plateau"
    schedule = None if plateau else LrSchedule(optimizer, cfg, steps_per_epoch, total_steps, warmup_steps, lr)
    ema = ModelEmaV3(model, decay=o.ema_decay, use_warmup=o.ema_warmup, warmup_power=o.ema_warmup_power) \
        if o.ema_decay else None
    mix = o.mixup > 0 or o.cutmix > 0
    mixup = Mixup(mixup_alpha=o.mixup, cutmix_alpha=o.cutmix, prob=o.mixup_prob, switch_prob=o.mixup_switch_prob,
                  mode=o.mixup_mode, label_smoothing=o.label_smoothing, num_classes=num_classes) if mix else None
    if cfg.diffusion.ce_weight > 0 and world > 1:
        # the hybrid loss runs a second forward pass outside DDP's wrapper, which DDP cannot synchronise
        raise ConfigError("diffusion.ce_weight > 0 (hybrid loss) is single-process only; set it to 0 under torchrun")
    if cfg.diffusion.ce_weight > 0 and getattr(model, "parametrization", None) != "mean":
        raise ConfigError("diffusion.ce_weight > 0 needs a model with parametrization 'mean' (clean logits)")
    if mix and (batch_size // world) % 2:
        raise ConfigError("mixup/cutmix need an even per-process batch size")
    amp_dtype = getattr(torch, o.amp_dtype) if o.amp and device.type == "cuda" else None

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                                else None)
    updater = Updater(cfg, train_model, model, optimizer, diffusion, mixup, ema, device, world, amp_dtype, kind, log,
                      ckpt_dir, sync_free=sync_free)

    start_step, earlier_seconds = 0, 0.0  # earlier_seconds: training time before a resume
    meter = LossMeter()
    if resume:
        found = latest_checkpoint(run_dir)
        if found is not None:
            start_step, updater.bad_total, earlier_seconds, state, loss_average = restore(
                found, model, optimizer, ema, cfg, updater.scaler)
            meter.restore(loss_average)
            if selection is not None and state is not None:
                # the counts and the best value continue; the rule's settings are this config's
                selection, changed = Selection.from_state(state).resumed_with(selection)
                if changed and main:
                    log("resuming with " + "; ".join(changed))
            if main:
                log(f"resuming from {found} at step {start_step}")

    log_path = run_dir / "log.csv"
    writer = _open_tensorboard(run_dir) if main else None
    if main:
        _truncate_log(log_path, start_step)
        # a validation row is written before its checkpoint: one whose checkpoint never landed is validated again
        _truncate_log(run_dir / "validation.csv", start_step)
        parameters = sum(p.numel() for p in model.parameters())
        options = ", ".join(f"{k} {v}" for k, v in cfg.model.kwargs.items())
        where = device_name(model) + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
        log(f"{cfg.model.name}{f' ({options})' if options else ''}: {parameters / 1e6:.2f} M parameters; input "
            f"{in_chans}x{train_set.image_size}x{train_set.image_size}, {len(train_set)} training images, "
            f"{num_classes} classes; {total_steps} steps of {batch_size} images"
            f"{f' ({world} processes)' if world > 1 else ''}; device {where}"
            f"{'; sync-free steps' if sync_free else ''}{'; channels-last' if cfg.channels_last else ''}")
    meta_base = dict(config=cfg.to_dict(), classes=list(train_set.classes), num_classes=num_classes,
                     in_chans=in_chans, image_size=train_set.image_size, mean=list(train_set.mean),
                     std=list(train_set.std), preprocess=val_set.preprocess, model_name=cfg.model.name,
                     model_kwargs=cfg.model.kwargs, method=kind, world_size=world)

    made_one_at = None  # the step whose BatchNorm statistics were last made one

    def same_batch_norm(at: int) -> None:
        """Under torchrun each process's BatchNorm statistics (the EMA copy's too) saw only its own batches since
        DDP last broadcast rank 0's: make them one (timm's distribute_bn) before they are validated or saved. Every
        checkpoint step does it, so a resumed run (every rank loads rank 0's) continues as the uninterrupted one."""
        nonlocal made_one_at
        if world > 1 and cfg.dist_bn and made_one_at != at:
            for module in (model, ema.module if ema is not None else None):
                if module is not None:
                    distribute_bn(module, world, reduce=cfg.dist_bn == "reduce")
            made_one_at = at

    def checkpoint(at: int) -> None:
        save_state(ckpt_dir, at, model, optimizer, ema, meta_base, updater.bad_total, cfg.keep_checkpoints,
                   earlier_seconds + time.perf_counter() - started, stream.epoch_of(at),
                   selection.state_dict() if selection is not None else None, updater.scaler, meter.value())

    bar = None
    if progress and main:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, leave=False)
    step = start_step
    val_specs = default_eval_specs(model, cfg.to_dict()["eval"])
    train_model.train()
    for images, targets in stream.batches(start_step, total_steps):
        if selection is not None and selection.should_stop:
            break  # a resumed run that had already stopped
        seed_all(mix_seed(cfg.seed, 2, step, rank))
        if plateau:
            _set_lr(optimizer, lr * selection.lr_scale * min(1.0, 0.01 + 0.99 * step / max(warmup_steps, 1)))
        else:
            schedule.step(step)
        meter.update(updater(images, targets, step, main))
        step += 1
        logged = step % 10 == 0 or step == total_steps  # the loss is read (a host sync) only on these steps
        if logged:
            updater.check(step, main)
        if bar is not None:
            bar.update(1)
        if main and logged:
            current_lr, running = optimizer.param_groups[0]["lr"], meter.value()
            if bar is not None:
                bar.set_postfix(loss=f"{running:.4f}" if running is not None else "nan", lr=f"{current_lr:.2e}")
            _write_csv_row(log_path, dict(step=step, epoch=round(stream.epoch_of(step), 4), loss=running,
                                          lr=current_lr, bad_steps=updater.bad_total,
                                          seconds=round(time.perf_counter() - started, 3)))
            if writer is not None:
                writer.add_scalar("train/loss", running or float("nan"), step)
        do_validate = selection is not None and (step % interval == 0 or step == total_steps)
        if do_validate:  # every rank predicts its shard; all see the same scores and stop together
            validation_started = time.perf_counter()
            same_batch_norm(step)
            current = ema.module if ema is not None else model
            if cfg.eval.select == "loss":  # the generative model: one pass per image instead of K x draws
                losses = validation_loss(current, val_set, batch_size=cfg.eval.batch_size, device=device,
                                         seed=cfg.seed, rank=rank, world=world, num_workers=d.num_workers,
                                         amp_dtype=amp_dtype)
                scores = {"loss": losses.mean().item()}
            else:
                probs, labels = validate(current, val_set, val_specs[0], diffusion, batch_size=cfg.eval.batch_size,
                                         device=device, seed=cfg.seed, rank=rank, world=world,
                                         num_workers=d.num_workers, amp_dtype=amp_dtype)
                scores = selection_scores(probs, labels)
            train_model.train()
            improved = selection.update(step, stream.epoch_of(step), scores)
            selection.add_time(time.perf_counter() - validation_started)
            if main:
                if improved:
                    save_model(run_dir / "best.safetensors", current,
                               dict(meta_base, kind="model", step=step, epoch=stream.epoch_of(step)))
                _write_csv_row(run_dir / "validation.csv", selection.history[-1])
                if bar is not None:
                    bar.set_description(f"train (val {cfg.eval.select} {scores[cfg.eval.select]:.4g}, best "
                                        f"{selection.best_value:.4g} at epoch {selection.best_epoch:.1f})")
        if do_validate or (step % cfg.checkpoint_every == 0 and step < total_steps):
            same_batch_norm(step)  # on every rank, before rank 0 saves
            if main:
                checkpoint(step)
        if fault_after_steps is not None and step - start_step >= fault_after_steps:
            raise KeyboardInterrupt(f"fault injected after step {step}")
        if selection is not None and selection.should_stop:
            break
    if bar is not None:
        bar.close()

    same_batch_norm(step)
    updater.check(step, main)  # the last steps' skips, counted before the totals are written
    train_seconds = earlier_seconds + time.perf_counter() - started  # all sessions of a resumed run
    final = ema.module if ema is not None else model
    if main:
        checkpoint(step)
    if world > 1:
        dist.barrier()  # best.safetensors and the last checkpoint are on disk for every rank
    if selection is not None and selection.best_step is not None and selection.best_step != step:
        # the best validation's weights, from the file written when it happened
        load_state(final, load_checkpoint(run_dir / "best.safetensors").section("model"),
                   run_dir / "best.safetensors")
    specs = default_eval_specs(final, cfg.to_dict()["eval"])
    results = None
    if world > 1 and not is_generative:  # sharded like the validations, the per-image results gathered
        probs, labels = validate(final, val_set, specs[0], diffusion, batch_size=cfg.eval.batch_size, device=device,
                                 seed=cfg.seed, rank=rank, world=world, num_workers=d.num_workers,
                                 amp_dtype=amp_dtype)
        accumulator = MetricAccumulator(num_classes)
        accumulator.update(probs, labels)
        results = {specs[0].name: dict(accumulator.compute(), count=len(labels), sampler=specs[0].name,
                                       evaluations_per_image=specs[0].evaluations_per_image)}
    metrics = {}
    if main:
        if results is None:
            batches = eval_batches(val_set, cfg.eval.batch_size, device, num_workers=d.num_workers)
            if is_generative:  # fit the probability scale on some validation images, report on others
                images, labels = next(iter(eval_batches(val_set, 2 * GENERATIVE_EVAL_IMAGES, device)))
                fit = min(GENERATIVE_EVAL_IMAGES, len(labels) // 2)
                # with the draws it will predict with (eval.sampler dc, eval.steps): the scale that fits 10 draws
                # is too soft for 100, whose errors are less noisy
                draws, adaptive = specs[0].steps, specs[0].mode == "adaptive"
                peers.calibrate_error_scale(final, [(images[:fit], labels[:fit])], draws, seed=cfg.seed,
                                            adaptive=adaptive)
                batches = [(images[fit:], labels[fit:])]
                log(f"final check: the Diffusion Classifier fits its error scale on {fit} validation images and is "
                    f"scored on {len(labels) - fit} ({specs[0].name}: "
                    f"{peers.evaluations_per_image(num_classes, draws, adaptive):g} network passes per image)")
            count = len(batches[0][1]) if is_generative else len(val_set)
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.bfloat16,
                                enabled=amp_dtype is not None):
                results = evaluate(final, batches, specs, diffusion, seed=cfg.seed, num_classes=num_classes,
                                   progress=count if progress else None)
        metrics = {"val": results, "train_seconds": round(train_seconds, 2), "bad_steps": updater.bad_total,
                   "steps_run": step, "epochs_run": round(stream.epoch_of(step), 4), "steps_per_epoch": steps_per_epoch}
        if selection is not None:
            # converged: stopped by patience (with min_delta the last validation may still be a small gain), or the
            # budget's end was not the best point; otherwise a longer budget might still help
            metrics["selection"] = {"metric": selection.metric, "best_step": selection.best_step,
                                    "best_epoch": round(selection.best_epoch, 4), "best_value": selection.best_value,
                                    "stopped_early": selection.should_stop, "min_delta": selection.min_delta,
                                    "converged": selection.should_stop or selection.best_step < step,
                                    "lr_scale": selection.lr_scale,
                                    "validation_seconds": None if selection.validation_seconds is None
                                    else round(selection.validation_seconds, 2), "history": selection.history}
        save_model(run_dir / "model.safetensors", final, dict(meta_base, kind="model", step=step, metrics=metrics))
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if writer is not None:
        writer.close()
    if world > 1:
        dist.barrier()
    return TrainResult(run_dir, final, diffusion if is_diffusion else None, metrics, step, updater.bad_total,
                       time.perf_counter() - started)
