"""One optimizer update (timm's ``train_one_epoch`` body): mixup, the loss of the model's kind under autocast,
the agreed skip of non-finite losses, backward through timm's NativeScaler for float16, clipping, EMA; and the
learning-rate schedule in steps or epochs."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
from timm.scheduler import create_scheduler_v2
from timm.utils import NativeScaler

from ..checks import without_value_checks
from ..config import TrainConfig
from ..errors import DidicmError
from ..objectives import cross_entropy_loss, diffusion_loss, epsilon_loss, noisy_label_cross_entropy

__all__ = ["TrainingError", "Updater", "LossMeter", "FUSED_OPTIMIZERS", "create_lr_scheduler", "LrSchedule"]


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


class LossMeter:
    """The training loss's moving average (weight 0.05 per step), kept on the device so that a step needs no
    host sync; a non-finite (skipped) loss leaves it unchanged. ``value()`` reads it (one sync)."""

    def __init__(self):
        self.average: torch.Tensor | None = None

    def update(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        if self.average is None:
            self.average = torch.full_like(loss, float("nan"))
        elif self.average.device != loss.device:  # restored from a checkpoint on the host
            self.average = self.average.to(loss.device)
        blended = torch.where(torch.isnan(self.average), loss, 0.95 * self.average + 0.05 * loss)
        self.average = torch.where(torch.isfinite(loss), blended, self.average)

    def value(self) -> float | None:
        value = None if self.average is None else self.average.item()
        return None if value is None or math.isnan(value) else value

    def restore(self, value: float | None) -> None:
        """Continue from a checkpoint's ``value()``, so that a resumed run logs what the uninterrupted one does."""
        self.average = None if value is None else torch.tensor(value, dtype=torch.float32)


# torch optimizers whose fused implementation skips a whole update on the device when told found_inf (fused SGD
# is left out: a skipped first step leaves its momentum buffers uninitialised)
FUSED_OPTIMIZERS = ("adam", "adamw")


class Updater:
    """Runs one training step of any didicm model kind; counts and limits non-finite losses.

    Two ways to skip a step whose loss or gradients are not finite (weights, optimizer state and EMA untouched,
    the step counted):
      - checked (the default off a GPU): the loss is read on the host before backward, the gradients' norm
        after it;
      - sync-free (``sync_free``, a fused torch optimizer): backward always runs, and the fused update and the EMA
        are gated on the device by whether the loss and the gradients are finite (so a NaN that only reaches the
        gradients is skipped too); no step waits for the GPU. The counts live on the device and are read by
        ``check()`` when the loop logs (every 10 steps), which then stops a run that failed
        ``optim.max_bad_steps`` times in a row. With float16, timm's scaler also lowers its scale on such a
        step (the checked path never runs backward on it).

    Args:
        model: the module to call (DDP-wrapped under torchrun); ``base``: the unwrapped model (clipping, EMA).
        amp_dtype: autocast dtype, or None for float32; float16 adds timm's NativeScaler.
    """

    def __init__(self, cfg: TrainConfig, model, base, optimizer, diffusion, mixup, ema, device: torch.device,
                 world: int, amp_dtype: torch.dtype | None, kind: str, log, ckpt_dir, sync_free: bool = False):
        self.cfg, self.model, self.base, self.optimizer = cfg, model, base, optimizer
        self.diffusion, self.mixup, self.ema, self.device, self.world = diffusion, mixup, ema, device, world
        self.amp_dtype, self.kind, self.log, self.ckpt_dir = amp_dtype, kind, log, ckpt_dir
        self.scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
        self.sync_free = sync_free  # needs a fused optimizer (train() creates one; see FUSED_OPTIMIZERS)
        self.consecutive_bad, self._bad_total = 0, 0
        # sync-free counts on the device: all skipped steps, the current run of them, the longest run since check()
        self._counts = torch.zeros(3, dtype=torch.int64, device=device)
        self._reported = 0

    @property
    def bad_total(self) -> int:
        """Non-finite steps so far (a host read in sync-free mode: call it when logging, not per step)."""
        return self._bad_total + (int(self._counts[0].item()) if self.sync_free else 0)

    @bad_total.setter
    def bad_total(self, value: int) -> None:  # restored from a checkpoint
        self._bad_total, self._reported = int(value), int(value)
        self._counts.zero_()

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

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, step: int, main: bool) -> torch.Tensor:
        """One update; returns the loss (detached, 0-dim, on the device), non-finite when the step was skipped."""
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            # sync-free: the pipeline made these inputs; a NaN shows up in the loss or gradients and skips the step
            with without_value_checks() if self.sync_free else nullcontext():
                loss = self.loss(images, targets).mean()
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        if self.world > 1:  # every process must agree to skip, or DDP's collectives would hang
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        self.optimizer.zero_grad(set_to_none=True)
        if self.sync_free:
            finite = self._update_without_sync(loss, finite)
            if self.ema is not None:
                self._gated_ema_update(step, finite)
            return torch.where(finite > 0, loss.detach(), torch.full_like(loss.detach(), float("nan")))
        if finite.item() < 1:
            self._skip(f"non-finite loss ({loss.item()})", step, main)
            return loss.detach()
        if not self._update(loss):
            self._skip("non-finite gradients", step, main)
            return torch.full_like(loss.detach(), float("nan"))
        self.consecutive_bad = 0
        if self.ema is not None:
            self.ema.update(self.base, step=step)
        return loss.detach()

    def _clip_and_check_grads(self) -> torch.Tensor:
        """Clip the gradients (optim.clip_grad) and return 1.0 when their total norm is finite, else 0.0 (float32,
        on the device; identical on every process after DDP's all-reduce). One norm serves both. A NaN can reach
        the gradients with a finite loss, e.g. through an entry the loss masks; the step is then skipped, so
        clipping by a non-finite norm does no harm."""
        params = [p for p in self.base.parameters() if p.grad is not None]
        if not params:
            return torch.ones((), device=self.device)
        clip = self.cfg.optim.clip_grad
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else \
            torch.nn.utils.get_total_norm([p.grad for p in params])
        return torch.isfinite(norm).to(torch.float32)

    def _scaled_update(self, loss: torch.Tensor) -> None:
        """float16: scaled backward, unscale, clip, step (skipped on overflow), rescale (timm's NativeScaler)."""
        self.scaler(loss, self.optimizer, clip_grad=self.cfg.optim.clip_grad, parameters=self.base.parameters())

    def _update(self, loss: torch.Tensor) -> bool:
        """Checked path: backward and the update; False (nothing updated) when the gradients are not finite."""
        if self.scaler is not None:
            self._scaled_update(loss)
            return True
        loss.backward()
        if self._clip_and_check_grads().item() < 1:
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        return True

    def _update_without_sync(self, loss: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        """Backward and the gated update; returns 1.0 (the step was taken) or 0.0 (skipped), on the device."""
        if self.scaler is not None:
            # a non-finite loss gives non-finite scaled gradients: the scaler's fused step skips on its own
            self._scaled_update(loss)
        else:
            loss.backward()
            finite = finite * self._clip_and_check_grads()
            self.optimizer.found_inf = 1.0 - finite  # the fused update is a no-op when this is 1
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        bad = (finite < 1).to(torch.int64)
        total, run, worst = self._counts.unbind()
        run = (run + 1) * bad
        self._counts = torch.stack([total + bad, run, torch.maximum(worst, run)])
        return finite

    @torch.no_grad()
    def _gated_ema_update(self, step: int, taken: torch.Tensor) -> None:
        """timm ModelEmaV3's update (floating tensors interpolated, the others copied) with its weight times
        ``taken`` (a device 0/1), so a skipped step leaves the average alone without a host read. A 0-dim weight
        tensor gives the same bits as timm's float weight."""
        weight = taken * (1.0 - self.ema.get_decay(step))
        ema_values, model_values = [], []
        for ema_v, model_v in zip(self.ema.module.state_dict().values(), self.base.state_dict().values(),
                                  strict=True):
            if ema_v.is_floating_point():
                ema_values.append(ema_v)
                model_values.append(model_v)
            else:
                ema_v.copy_(model_v)
        torch._foreach_lerp_(ema_values, model_values, [weight] * len(ema_values))

    def _skip(self, what: str, step: int, main: bool) -> None:
        self.consecutive_bad += 1
        self._bad_total += 1
        if main:
            self.log(f"step {step}: {what}, step skipped ({self.consecutive_bad} in a row, {self._bad_total} in all)")
        if self.consecutive_bad >= self.cfg.optim.max_bad_steps:
            raise TrainingError(self._stop_message(self.consecutive_bad, step))

    def _stop_message(self, count: int, step: int) -> str:
        return (f"{count} consecutive non-finite losses or gradients at step {step}: training stopped. Check the "
                f"inputs for NaN/Inf, lower optim.lr, or set optim.clip_grad; the last complete checkpoint is in "
                f"{self.ckpt_dir}")

    def check(self, step: int, main: bool) -> None:
        """Sync-free mode: read the device counts (one host sync), log new skips, stop after too many in a row.
        Every process calls it at the same steps (the counts agree), so all stop together."""
        if not self.sync_free:
            return
        total, run, worst = self._counts.tolist()
        total += self._bad_total
        if main and total > self._reported:
            self.log(f"steps up to {step}: {total - self._reported} steps with non-finite losses or gradients "
                     f"skipped ({total} in all)")
        self._reported = total
        if worst >= self.cfg.optim.max_bad_steps:
            raise TrainingError(self._stop_message(worst, step))
        self._counts[2] = run
