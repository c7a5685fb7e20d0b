"""Run configuration: one frozen-at-start dataclass, filled from defaults, a YAML file, then overrides.

`didicm train --config run.yaml --set optim.lr=1e-3 --set data.data_ratio=0.1` resolves in that order, and
the resolved configuration is written next to every checkpoint, so a run can always be re-created.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["DataConfig", "ModelConfig", "DiffusionConfig", "OptimConfig", "EvalConfig", "TrainConfig",
           "load_config", "load_values", "apply_overrides", "config_from_dict", "merge_dicts"]


@dataclass
class DataConfig:
    dataset: str = "digits"  # name or "kind:path" (see didicm.data)
    root: str | None = None
    image_size: int | None = None  # None: the data set's native size
    degradation: str | None = None  # applied to train, val and test images alike, e.g. "resolution=7"
    augment: bool = False
    data_ratio: float = 1.0
    val_size: float | int | None = None
    split_seed: int = 0  # fixes the validation split and the data-ratio subset for every method
    num_workers: int = 0
    on_bad_image: str = "fail"


@dataclass
class ModelConfig:
    name: str = "didirn18"  # didirn*, didirn*_twin, didicm:<timm name>, or any timm classifier
    kwargs: dict = field(default_factory=dict)  # e.g. {stem: small, parametrization: mean}


@dataclass
class DiffusionConfig:
    schedule: str = "loglinear"
    schedule_eps: float = 1e-3  # log-linear: e^{-sigma(1)}
    sigma_min: float = 1e-3  # geometric only
    sigma_max: float = 1.0
    t_min: float = 1e-5  # training draws t ~ U(t_min, 1) (official train.py passes 1e-5)
    t_sampling: str = "uniform"  # uniform | antithetic (stratified over the batch) | sigma (importance-sampled t)
    ce_weight: float = 0.0  # hybrid loss: + ce_weight * cross-entropy of the mean readout ('mean' models)


@dataclass
class OptimConfig:
    opt: str = "lamb"  # any timm optimizer name
    lr: float = 2e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    batch_size: int = 128
    steps: int = 1000  # optimizer steps: the budget is in steps, not epochs
    warmup_steps: int = 50
    sched: str = "cosine"  # any timm scheduler name
    min_lr: float = 1e-6
    clip_grad: float | None = None  # clipping at 1.0 starves DiDiCM: its loss weight reaches 1/eps
    ema_decay: float | None = None  # e.g. 0.999; evaluation then uses the EMA weights
    label_smoothing: float = 0.0  # cross-entropy models only
    noisy_labels: bool = False  # cross-entropy models: smooth each label by 1 - e^{-sigma(t)}, t ~ U (control arm)
    mixup: float = 0.0
    cutmix: float = 0.0
    amp: bool = True  # bf16 autocast, on GPUs only
    max_bad_steps: int = 10  # consecutive non-finite losses before training stops


@dataclass
class EvalConfig:
    sampler: str = "cp"  # cp | cl | mean (one pass of a 'mean' model)
    steps: int = 8
    eps: float = 1e-5
    mode: str = "min"
    grid: str = "consistent"
    chains: int = 10
    batch_size: int = 256


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    output: str = "runs/default"
    checkpoint_every: int = 200  # steps
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps; 0: only at the end
    device: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> TrainConfig:
        d, o, e = self.data, self.optim, self.eval
        if not 0.0 < d.data_ratio <= 1.0:
            raise ConfigError(f"data.data_ratio must lie in (0, 1], got {d.data_ratio}")
        if d.on_bad_image not in ("fail", "skip"):
            raise ConfigError(f"data.on_bad_image must be 'fail' or 'skip', got {d.on_bad_image!r}")
        for name, value in (("optim.steps", o.steps), ("optim.batch_size", o.batch_size),
                            ("eval.steps", e.steps), ("eval.chains", e.chains), ("eval.batch_size", e.batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("eval.eps", e.eps), ("diffusion.schedule_eps", self.diffusion.schedule_eps),
                            ("diffusion.t_min", self.diffusion.t_min)):
            if not 0.0 < value < 1.0:
                raise ConfigError(f"{name} must lie in (0, 1), got {value!r}")
        if not (o.lr > 0 and math.isfinite(o.lr)):
            raise ConfigError(f"optim.lr must be a positive number, got {o.lr!r}")
        if self.diffusion.t_sampling not in ("uniform", "antithetic", "sigma"):
            raise ConfigError(f"diffusion.t_sampling must be 'uniform', 'antithetic' or 'sigma', "
                              f"got {self.diffusion.t_sampling!r}")
        if e.sampler not in ("cp", "cl", "mean"):
            raise ConfigError(f"eval.sampler must be 'cp', 'cl' or 'mean', got {e.sampler!r}")
        if o.ema_decay is not None and not 0.0 < o.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay must lie in (0, 1), got {o.ema_decay!r}")
        if o.max_bad_steps < 1:
            raise ConfigError(f"optim.max_bad_steps must be >= 1, got {o.max_bad_steps!r}")
        return self


def _build(cls, values: dict, prefix: str = ""):
    """Recursively build dataclass ``cls`` from a dict, rejecting unknown keys by name."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix or '<root>'} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key {prefix + key!r}; valid keys: {sorted(known)}")
        sub = _dataclass_type(known[key])
        kwargs[key] = _build(sub, value, f"{prefix}{key}.") if sub is not None else \
            _coerce(known[key], value, prefix + key)
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any, name: str) -> Any:
    """YAML reads 1e-3 (no dot) as a string; numbers are converted by the field's declared type."""
    annotation = str(f.type)
    if isinstance(value, str) and ("float" in annotation or "int" in annotation):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"config key {name!r} needs a number, got {value!r}") from None
        return int(number) if "float" not in annotation and number.is_integer() else number
    if isinstance(value, bool) and annotation in ("int", "float"):
        raise ConfigError(f"config key {name!r} needs a number, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and annotation == "float":
        return float(value)
    return value


def _dataclass_type(f: dataclasses.Field):
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    return type(default) if dataclasses.is_dataclass(default) else None


def config_from_dict(values: dict) -> TrainConfig:
    return _build(TrainConfig, values).validate()


def _parse_value(text: str) -> Any:
    """Override values are YAML scalars: 1e-3, true, null, [1, 2], {stem: small} all work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"cannot parse override value {text!r}: {error}") from None


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings to a nested dict (returns a new dict)."""
    out = _deep_copy(values)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=1e-3")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = _parse_value(text)
    return out


def _deep_copy(values: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in values.items()}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> TrainConfig:
    """Defaults <- ``base`` <- YAML file at ``path`` <- ``overrides``; validated."""
    return config_from_dict(load_values(path, overrides, base))


def load_values(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> dict:
    """``base`` <- YAML file at ``path`` <- ``overrides`` as nested dicts: only what was set, not yet validated."""
    values = _deep_copy(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
        values = merge_dicts(values, loaded)
    return apply_overrides(values, overrides or [])


def merge_dicts(base: dict, update: dict) -> dict:
    """``update`` laid over ``base``, section by section (a new dict; neither input changes)."""
    out = _deep_copy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out
