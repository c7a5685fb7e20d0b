"""One optimizer update (timm's ``train_one_epoch`` body): mixup, the loss of the model's kind under autocast,
the agreed skip of non-finite losses, backward through timm's NativeScaler for float16, clipping, EMA; and the
learning-rate schedule in steps or epochs."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from timm.scheduler import create_scheduler_v2
from timm.utils import NativeScaler

from ..config import TrainConfig
from ..errors import DidicmError
from ..objectives import cross_entropy_loss, diffusion_loss, epsilon_loss, noisy_label_cross_entropy

__all__ = ["TrainingError", "Updater", "create_lr_scheduler", "LrSchedule"]


class TrainingError(DidicmError, RuntimeError):
    """Training cannot go on (for example, too many consecutive non-finite losses)."""


class LrSchedule:
    """timm's scheduler, stepped per update (``sched_on_updates``) or once per epoch as timm's train.py does by
    default (the lr of epoch e is the schedule's value at e for every step of that epoch)."""

    def __init__(self, optimizer, cfg: TrainConfig, steps_per_epoch: int, total_steps: int, warmup_steps: int,
                 lr: float):
        o = cfg.optim
        self.steps_per_epoch = steps_per_epoch
        self.on_updates = o.sched_on_updates
        warmup_lr = o.warmup_lr if o.warmup_lr is not None else lr * 1e-2
        if self.on_updates:
            length, warmup = total_steps, warmup_steps
        else:
            length = math.ceil(total_steps / steps_per_epoch)
            warmup = round(o.warmup_epochs) if o.warmup_epochs is not None else \
                math.ceil(warmup_steps / steps_per_epoch)
        self.scheduler, _ = create_scheduler_v2(optimizer, sched=o.sched, num_epochs=length, warmup_epochs=warmup,
                                                min_lr=o.min_lr, warmup_lr=warmup_lr)

    def step(self, step: int) -> None:
        self.scheduler.step(step if self.on_updates else step // self.steps_per_epoch)


def create_lr_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int, total_steps: int, warmup_steps: int,
                        lr: float) -> LrSchedule:
    return LrSchedule(optimizer, cfg, steps_per_epoch, total_steps, warmup_steps, lr)


class Updater:
    """Runs one training step of any didicm model kind; counts and limits non-finite losses.

    Args:
        model: the module to call (DDP-wrapped under torchrun); ``base``: the unwrapped model (clipping, EMA).
        amp_dtype: autocast dtype, or None for float32; float16 adds timm's NativeScaler.
    """

    def __init__(self, cfg: TrainConfig, model, base, optimizer, diffusion, mixup, ema, device: torch.device,
                 world: int, amp_dtype: torch.dtype | None, kind: str, log, ckpt_dir):
        self.cfg, self.model, self.base, self.optimizer = cfg, model, base, optimizer
        self.diffusion, self.mixup, self.ema, self.device, self.world = diffusion, mixup, ema, device, world
        self.amp_dtype, self.kind, self.log, self.ckpt_dir = amp_dtype, kind, log, ckpt_dir
        self.scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
        self.consecutive_bad, self.bad_total = 0, 0

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if self.kind == "generative":
            return epsilon_loss(self.model, images, targets)
        if self.kind == "didicm":
            return diffusion_loss(self.model, self.diffusion, images, targets, t_min=cfg.diffusion.t_min,
                                  t_sampling=cfg.diffusion.t_sampling, ce_weight=cfg.diffusion.ce_weight)
        if cfg.optim.noisy_labels:
            return noisy_label_cross_entropy(self.model(images), targets, self.diffusion, cfg.diffusion.t_min,
                                             cfg.diffusion.t_sampling)
        # mixed targets carry their smoothing already (timm's Mixup applies it)
        smoothing = cfg.optim.label_smoothing if targets.ndim == 1 else 0.0
        return cross_entropy_loss(self.model(images), targets, smoothing)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, step: int, main: bool) -> float | None:
        """One update; returns the loss, or None when the step was skipped for a non-finite loss."""
        cfg = self.cfg
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            loss = self.loss(images, targets).mean()
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        if self.world > 1:  # every process must agree to skip, or DDP's collectives would hang
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        self.optimizer.zero_grad(set_to_none=True)
        if finite.item() < 1:
            self.consecutive_bad += 1
            self.bad_total += 1
            if main:
                self.log(f"step {step}: non-finite loss ({loss.item()}), step skipped "
                         f"({self.consecutive_bad} in a row, {self.bad_total} in all)")
            if self.consecutive_bad >= cfg.optim.max_bad_steps:
                raise TrainingError(
                    f"{self.consecutive_bad} consecutive non-finite losses at step {step}: training stopped. "
                    "Check the inputs for NaN/Inf, lower optim.lr, or set optim.clip_grad; the last complete "
                    f"checkpoint is in {self.ckpt_dir}")
            return None
        self.consecutive_bad = 0
        if self.scaler is not None:  # scaled backward, unscale, clip, step (skipped on overflow), rescale
            self.scaler(loss, self.optimizer, clip_grad=cfg.optim.clip_grad, parameters=self.base.parameters())
        else:
            loss.backward()
            if cfg.optim.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.base.parameters(), cfg.optim.clip_grad)
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.base, step=step)
        return loss.item()
