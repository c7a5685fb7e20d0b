"""Model selection on the validation split: one rule for every arm of a comparison.

Training validates every ``interval`` steps. Each validation scores the model's own headline prediction (the
softmax of a classifier, CP-S of DiDiCM) by a metric of ``SELECT_METRICS``; the best validation's weights are
the model that training returns. Two rules act on the count of validations since the last improvement:

- ``lr_patience``: after that many, the learning rate is multiplied by ``lr_decay`` (reduce-on-plateau; the
  'plateau' schedule), and the count restarts;
- ``patience``: after that many, training stops (early stopping).

With ``min_delta`` > 0 only an improvement by more than that (in the metric's units) over the value at the last
such improvement restarts the count (Keras' and Lightning's rule), so validation noise cannot keep a run going at
a vanishing learning rate; a smaller improvement still replaces the kept weights.

So every arm is trained until its own validation metric stops improving, whatever the data size, and a run
that hits its epoch budget while still improving is marked as not converged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .errors import ConfigError
from .metrics import apply_temperature, classification_metrics, fit_temperature

__all__ = ["SELECT_METRICS", "selection_scores", "Selection"]

# name -> True when higher is better. 'loss' is the generative 'unet' model's held-out denoising loss (see
# didicm.objectives.heldout_epsilon_loss): its Diffusion Classifier costs K x draws passes per image, too much to
# run at every validation, so it is selected on the quantity it is trained on, scored on validation images
SELECT_METRICS = {"nll_ts": False, "nll": False, "top1": True, "loss": False}


def selection_scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Validation metrics before and after a temperature fitted on the same split: the quantities a model is
    selected by. ``nll_ts`` is the NLL after temperature scaling (what a user would see after calibrating)."""
    scores = classification_metrics(probs, labels)
    temperature = fit_temperature(probs, labels)
    scaled = classification_metrics(apply_temperature(probs, temperature), labels)
    scores.update(T=temperature, nll_ts=scaled["nll"], ece_ts=scaled["ece"], brier_ts=scaled["brier"])
    return scores


@dataclass
class Selection:
    """The state of model selection; plain data, saved in every checkpoint so a resumed run decides alike."""

    metric: str
    patience: int = 0  # validations without improvement before stopping; 0: never stop early
    lr_patience: int = 0  # validations without improvement before the learning rate decays; 0: never
    lr_decay: float = 0.2
    min_delta: float = 0.0  # an improvement must exceed this to restart the counts (the weights keep any improvement)
    best_value: float | None = None
    best_step: int | None = None
    best_epoch: float | None = None
    since_best: int = 0  # validations since the last improvement by more than min_delta
    since_decay: int = 0  # validations since that improvement or the last decay
    reference: float | None = None  # the value at the last improvement by more than min_delta
    lr_scale: float = 1.0
    history: list = field(default_factory=list)
    # seconds spent validating, over every session of a resumed run; None: resumed from a checkpoint written before
    # this was counted (unknown rather than too small)
    validation_seconds: float | None = 0.0

    def __post_init__(self):
        if self.metric not in SELECT_METRICS:
            raise ConfigError(f"eval.select must be one of {sorted(SELECT_METRICS)}, got {self.metric!r}")
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ConfigError(f"optim.min_delta must be a finite number >= 0, got {self.min_delta!r}")

    def update(self, step: int, epoch: float, scores: dict[str, float]) -> bool:
        """Record one validation; True when it is the best so far (its weights should be kept)."""
        value = float(scores[self.metric])
        if not math.isfinite(value):
            value = -math.inf if SELECT_METRICS[self.metric] else math.inf
        higher = SELECT_METRICS[self.metric]
        improved = self.best_value is None or (value > self.best_value if higher else value < self.best_value)
        # a checkpoint written before min_delta existed has no reference: its best value is one (min_delta was 0)
        reference = self.best_value if self.reference is None else self.reference
        significant = reference is None or (value > reference + self.min_delta if higher
                                            else value < reference - self.min_delta)
        if improved:
            self.best_value, self.best_step, self.best_epoch = value, step, epoch
        if significant:
            self.reference = value
            self.since_best = self.since_decay = 0
        else:
            self.since_best += 1
            self.since_decay += 1
            if self.lr_patience and self.since_decay >= self.lr_patience:
                self.lr_scale *= self.lr_decay
                self.since_decay = 0
        self.history.append({"step": step, "epoch": round(epoch, 4), "lr_scale": self.lr_scale,
                             **{k: round(float(v), 6) for k, v in scores.items()
                                if k in ("top1", "nll", "nll_ts", "ece", "ece_ts", "T", "loss")}})
        return improved

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.since_best >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    def add_time(self, seconds: float) -> None:
        if self.validation_seconds is not None:
            self.validation_seconds += float(seconds)

    @classmethod
    def from_state(cls, state: dict) -> Selection:
        return cls(**{"validation_seconds": None, **state})

    def resumed_with(self, rule: Selection) -> tuple[Selection, list[str]]:
        """This saved state under ``rule``'s settings (the resumed run's config: patience, lr_patience, lr_decay,
        min_delta), and a line per setting that changed. A different metric cannot continue: its best value and
        counts mean nothing under another metric."""
        if rule.metric != self.metric:
            raise ConfigError(f"eval.select is {rule.metric!r} but the checkpoint was selected by {self.metric!r}; "
                              "resume with the same metric or start a new run (another output folder)")
        changed = [f"{name} {getattr(rule, name)!r} (the checkpoint had {getattr(self, name)!r})"
                   for name in ("patience", "lr_patience", "lr_decay", "min_delta")
                   if getattr(rule, name) != getattr(self, name)]
        state = {**self.state_dict(), **{n: getattr(rule, n) for n in ("patience", "lr_patience", "lr_decay",
                                                                        "min_delta")}}
        return Selection(**state), changed
