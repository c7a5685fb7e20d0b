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
    eval_split: str = "val"  # what training validates on: 'val' (carved from train) or 'test' (the held-out folder)
    ratio_rule: str = "didicm"  # data_ratio subset: 'didicm' or 'official' (torch seed 42, floor(n_c * r) per class)
    transform: dict = field(default_factory=dict)  # folders: timm create_transform options, e.g. {auto_augment: ...}
    aug_repeats: int = 0  # repeated augmentation (timm RepeatAugSampler semantics); 0: off
    reprob: float = 0.0  # timm random erasing probability (on the device, after normalization)
    remode: str = "pixel"  # timm random erasing mode


@dataclass
class ModelConfig:
    name: str = "didirn18"  # didirn*, didirn*_twin, didicm:<timm name>, or any timm classifier
    kwargs: dict = field(default_factory=dict)  # e.g. {stem: small, parametrization: mean}
    init: str = "default"  # 'torch': PyTorch's default init for every layer (the official DiDiRN's)


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
    batch_size: int = 128  # global (all processes together)
    batch_size_per_gpu: int | None = None  # the official -b: when set, batch_size = this x processes
    steps: int = 1000  # optimizer steps (the budget, unless optim.epochs is set)
    warmup_steps: int = 50
    epochs: float | None = None  # budget in epochs (passes over the training split); overrides optim.steps
    warmup_epochs: float | None = None  # overrides optim.warmup_steps
    sched: str = "cosine"  # any timm scheduler name, or 'plateau': constant after warm-up, decayed on plateaus
    patience: int = 0  # early stopping: validations without improvement of eval.select before stopping; 0: off
    lr_patience: int = 0  # 'plateau': validations without improvement before lr *= lr_decay
    lr_decay: float = 0.2
    # an improvement of eval.select by at most this (its units: nats for nll_ts) does not restart the patience counts,
    # so noise cannot keep a plateaued run going; the best weights are still kept. 0: any improvement counts
    min_delta: float = 0.0
    min_lr: float = 1e-6
    warmup_lr: float | None = None  # lr at the start of warm-up; None: lr * 1e-2
    sched_on_updates: bool = True  # the lr changes every step; false: once per epoch (timm's default)
    lr_ratio_scale: str = "none"  # 'sqrt': lr x sqrt(1 / data.data_ratio) (the official Weak Aug rule)
    clip_grad: float | None = None  # clipping at 1.0 starves DiDiCM: its loss weight reaches 1/eps
    ema_decay: float | None = None  # e.g. 0.999; evaluation then uses the EMA weights
    # timm ModelEmaV3's warm-up: decay min(ema_decay, 1 - (1 + step)^-power), so the first (near-initial) weights
    # fade out instead of keeping ema_decay^steps of the average (13% after 2,000 steps at 0.999); power 3/4
    # reaches 0.999 after 10k steps (2/3, timm's default, is meant for runs of a million steps)
    ema_warmup: bool = False
    ema_warmup_power: float = 0.75
    label_smoothing: float = 0.0  # cross-entropy models; with mixup/cutmix, also the mixed targets' smoothing
    noisy_labels: bool = False  # cross-entropy models: smooth each label by 1 - e^{-sigma(t)}, t ~ U (control arm)
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0  # timm Mixup: probability of mixing a batch
    mixup_switch_prob: float = 0.5  # ... of cutmix instead of mixup when both are on
    mixup_mode: str = "batch"  # batch | pair | elem
    amp: bool = True  # autocast, on GPUs only (training and evaluation)
    amp_dtype: str = "bfloat16"  # or 'float16' (the official --amp), with timm's NativeScaler
    max_bad_steps: int = 10  # consecutive non-finite losses before training stops
    # steps that never wait for the device: a fused torch optimizer skips a non-finite step on the device, the
    # counts are read when logging. 'auto': on GPUs with adam/adamw; true/false to force
    sync_free: bool | str = "auto"


@dataclass
class EvalConfig:
    sampler: str = "cp"  # cp | cl | mean (one pass of a 'mean' model) | dc (the 'unet' model: steps draws per class)
    steps: int = 8
    eps: float = 1e-5
    mode: str = "min"
    grid: str = "consistent"
    update: str = "euler"  # CP: 'euler' (the paper's, clamped) or 'exponential' (stays on the simplex)
    chains: int = 10
    batch_size: int = 256
    select: str | None = None  # nll_ts | nll | top1 | loss ('unet' only): keep the best validation's weights


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
    eval_every: int = 0  # validate every this many steps (0: see eval_every_epochs)
    eval_every_epochs: float = 0.0  # ...or every this many epochs; with both, the longer interval
    device: str = "auto"
    # timm's --channels-last: weights (so activations) in NHWC. Speed only, not the recipe: the narrow study network
    # steps faster at 28 px on CPU, wider ones at 32 px slower (benchmarks/bench_train_step.py --compare channels_last)
    channels_last: bool = False
    # under torchrun, BatchNorm running statistics before each validation and the final save: 'reduce' (averaged
    # over processes; timm's and the official train.py's default), 'broadcast' (rank 0's) or '' (left as they are)
    dist_bn: str = "reduce"
    dist_timeout: float = 30.0  # minutes a process waits at a collective (e.g. while others evaluate)

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
        if e.sampler not in ("cp", "cl", "mean", "dc"):
            raise ConfigError(f"eval.sampler must be 'cp', 'cl', 'mean' or 'dc', got {e.sampler!r}")
        if e.update not in ("euler", "exponential"):
            raise ConfigError(f"eval.update must be 'euler' or 'exponential', got {e.update!r}")
        if o.ema_decay is not None and not 0.0 < o.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay must lie in (0, 1), got {o.ema_decay!r}")
        if o.ema_warmup and o.ema_decay is None:
            raise ConfigError("optim.ema_warmup needs optim.ema_decay (the decay the warm-up rises to)")
        if not 0.0 < o.ema_warmup_power <= 1.0:
            raise ConfigError(f"optim.ema_warmup_power must lie in (0, 1], got {o.ema_warmup_power!r}")
        if o.epochs is not None and not o.epochs > 0:
            raise ConfigError(f"optim.epochs must be a positive number, got {o.epochs!r}")
        if (o.patience or o.lr_patience or o.sched == "plateau") and e.select is None:
            raise ConfigError("optim.patience, optim.lr_patience and the 'plateau' schedule act on validation: set "
                              "eval.select (nll_ts, nll or top1)")
        if o.sched == "plateau" and not o.lr_patience:
            raise ConfigError("the 'plateau' schedule needs optim.lr_patience >= 1")
        if not 0 < o.lr_decay < 1:
            raise ConfigError(f"optim.lr_decay must lie in (0, 1), got {o.lr_decay!r}")
        if not (isinstance(o.min_delta, (int, float)) and math.isfinite(o.min_delta) and o.min_delta >= 0):
            raise ConfigError(f"optim.min_delta must be a finite number >= 0, got {o.min_delta!r}")
        if d.eval_split not in ("val", "test"):
            raise ConfigError(f"data.eval_split must be 'val' or 'test', got {d.eval_split!r}")
        if d.ratio_rule not in ("didicm", "official"):
            raise ConfigError(f"data.ratio_rule must be 'didicm' or 'official', got {d.ratio_rule!r}")
        if isinstance(d.aug_repeats, bool) or not isinstance(d.aug_repeats, int) or d.aug_repeats < 0:
            raise ConfigError(f"data.aug_repeats must be a non-negative integer, got {d.aug_repeats!r}")
        if not 0.0 <= d.reprob <= 1.0:
            raise ConfigError(f"data.reprob must lie in [0, 1], got {d.reprob!r}")
        if self.model.init not in ("default", "torch"):
            raise ConfigError(f"model.init must be 'default' or 'torch', got {self.model.init!r}")
        if o.batch_size_per_gpu is not None and (isinstance(o.batch_size_per_gpu, bool)
                                                 or not isinstance(o.batch_size_per_gpu, int)
                                                 or o.batch_size_per_gpu <= 0):
            raise ConfigError(f"optim.batch_size_per_gpu must be a positive integer, got {o.batch_size_per_gpu!r}")
        if o.amp_dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"optim.amp_dtype must be 'bfloat16' or 'float16', got {o.amp_dtype!r}")
        if o.lr_ratio_scale not in ("none", "sqrt"):
            raise ConfigError(f"optim.lr_ratio_scale must be 'none' or 'sqrt', got {o.lr_ratio_scale!r}")
        if o.mixup_mode not in ("batch", "pair", "elem"):
            raise ConfigError(f"optim.mixup_mode must be 'batch', 'pair' or 'elem', got {o.mixup_mode!r}")
        if not self.dist_timeout > 0:
            raise ConfigError(f"dist_timeout must be a positive number of minutes, got {self.dist_timeout!r}")
        if o.max_bad_steps < 1:
            raise ConfigError(f"optim.max_bad_steps must be >= 1, got {o.max_bad_steps!r}")
        if self.dist_bn is None or self.dist_bn is False:  # `--set dist_bn=` / null / false: off
            self.dist_bn = ""
        if self.dist_bn not in ("reduce", "broadcast", ""):
            raise ConfigError(f"dist_bn must be 'reduce', 'broadcast' or '' (off), got {self.dist_bn!r}")
        if not isinstance(self.channels_last, bool):
            raise ConfigError(f"channels_last must be true or false, got {self.channels_last!r}")
        if not isinstance(o.sync_free, bool) and o.sync_free != "auto":
            raise ConfigError(f"optim.sync_free must be true, false or 'auto', got {o.sync_free!r}")
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
