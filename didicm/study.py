"""The uncertainty study: DiDiCM against the classifiers a user would pick instead, over a grid of input
resolutions and training-data ratios (protocol: ../docs/study.md, issue 12).

``didicm study CONFIG`` trains every arm of every (resolution, data ratio, seed) cell by one rule (an epoch
budget, validation after every interval, the best validation's weights kept, early stopping by patience),
saves every arm's class probabilities on the validation split, the test split and two shifted sets
(``predictions/<cell>.npz``, float16), and computes every metric from those saved arrays: top-1, NLL, ECE,
Brier before and after a temperature fitted on validation, selective prediction (AURC, accuracy at 90%
coverage), out-of-distribution AUROC, and, for DiDiCM, uncertainty scores read off the CP trajectory.

Work is cached per arm: a cell's JSON is rewritten after every arm, an arm whose recipe is unchanged is read
back, and an arm's training resumes from its last checkpoint, so a stopped run continues where it stopped.
``aggregate`` then writes study.json, the figures and report.md, whose prose is generated from the numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from .config import config_from_dict, merge_dicts
from .data import create_dataset
from .data.degradations import parse_degradation
from .data.memory import InMemoryDataset
from .errors import ConfigError, DidicmError
from .evaluation import collect_probs, parse_sampler
from .files import atomic_write_bytes
from .metrics import (
    NLL_FLOOR,
    _aurc_from,
    accuracy_at_coverage,
    apply_temperature,
    auroc,
    classification_metrics,
    fit_temperature,
    reliability_bins,
)
from .report import (
    markdown_table,
    plot_accuracy_vs_steps,
    plot_gap,
    plot_reliability,
    plot_trajectories_grid,
    write_json,
)

__all__ = ["load_study", "run_study", "aggregate", "arm_metrics", "trajectory_scores", "row_costs", "HEADLINE"]

HEADLINE = "didicm"  # the pre-registered DiDiCM row: CP-8 (the config's didicm arm), chosen before any result
REPORTED = ("top1", "nll", "ece", "brier", "nll_ts", "ece_ts", "brier_ts", "aurc", "acc_at_90", "at_floor",
            "nll_at_floor")
# a row's metrics carry the version of arm_metrics that computed them; older rows are rescored from their saved
# predictions when the study runs again (2: at_floor and nll_at_floor)
METRICS_VERSION = 2
# uncertainty scores: max-probability and entropy for every row, and the CP trajectory's for DiDiCM
SIGNALS = tuple(f"auroc_{shift}_{score}" for shift in ("digits", "noise")
                for score in ("maxprob", "entropy", "settle", "path_entropy")) + ("aurc_settle", "aurc_path_entropy")
ARM_KEYS = ("where", "predict", "ensemble", "trajectory", "describe")
# how fast, not what: merged into every arm's training config but not into its recipe, so finished arms stay cached
RUNTIME_KEYS = ("channels_last", "device")
WHERE = ("all", "hard", "extremes")
OOD_SETS = ("digits", "noise")


# ---- configuration ----------------------------------------------------------------------------------------------
def load_study(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config {str(path)!r} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    required = ("dataset", "protocol", "resolutions", "data_ratios", "seeds", "native_resolution", "base", "arms",
                "epochs", "output")
    missing = [key for key in required if key not in spec]
    if missing:
        raise ConfigError(f"study config {str(path)} lacks {missing}")
    if spec["protocol"] not in ("resize", "resolution"):
        raise ConfigError(f"study protocol must be 'resize' (the network sees R x R, the paper's) or 'resolution' "
                          f"(down to R, back up to the native size), got {spec['protocol']!r}")
    runtime = spec.setdefault("runtime", {})
    if not isinstance(runtime, dict) or set(runtime) - set(RUNTIME_KEYS):
        raise ConfigError(f"study runtime takes {{{', '.join(RUNTIME_KEYS)}}} (settings that change speed, not the "
                          f"recipe), got {runtime!r}")
    arms = spec["arms"]
    if "twin" not in arms or HEADLINE not in arms:
        raise ConfigError(f"a study needs the arms 'twin' and {HEADLINE!r}; it has {sorted(arms)}")
    names = set()
    for name, arm in arms.items():
        if arm.get("where", "all") not in WHERE:
            raise ConfigError(f"arm {name!r}: where must be one of {WHERE}, got {arm.get('where')!r}")
        if "ensemble" in arm:
            of = arm["ensemble"].get("of")
            if of not in arms or "ensemble" in arms[of]:
                raise ConfigError(f"arm {name!r}: ensemble.of must name a trained arm, got {of!r}")
            if int(arm["ensemble"].get("members", 0)) < 2:
                raise ConfigError(f"arm {name!r}: an ensemble needs ensemble.members >= 2")
            rows = [name]
        else:
            if not arm.get("predict"):
                raise ConfigError(f"arm {name!r} needs predict: {{row name: sampler}}, e.g. {{{name}: classifier}}")
            for sampler in arm["predict"].values():
                parse_sampler(sampler)
            rows = list(arm["predict"])
            if name not in rows:
                raise ConfigError(f"arm {name!r}: its predict rows must include one named {name!r} (its headline)")
        clash = names & set(rows)
        if clash:
            raise ConfigError(f"prediction rows {sorted(clash)} are named twice")
        names |= set(rows)
    for ratio in spec["data_ratios"]:
        _epochs(spec, ratio)
    spec["_path"] = str(path)
    return spec


def _epochs(spec: dict, ratio: float) -> float:
    """The epoch budget (a cap; patience usually stops first) for a data ratio: a number, or {ratio: epochs}."""
    budget = spec["epochs"]
    if isinstance(budget, dict):
        matches = [v for k, v in budget.items() if math.isclose(float(k), ratio)]
        if not matches:
            raise ConfigError(f"study epochs has no budget for data ratio {ratio:g}; give one per ratio")
        return float(matches[0])
    return float(budget)


def _cell_name(resolution: int, ratio: float, seed: int) -> str:
    return f"res{resolution}_ratio{ratio:g}_seed{seed}"


def _in_cell(spec: dict, arm: dict, resolution: int, ratio: float) -> bool:
    where = arm.get("where", "all")
    if where == "all":
        return True
    easiest = (max(spec["resolutions"]), max(spec["data_ratios"]))
    if where == "hard":  # issue 12: resolution <= 14 px or data ratio <= 0.1, i.e. every cell but the easiest
        return (resolution, ratio) != easiest
    return (resolution, ratio) in (easiest, (min(spec["resolutions"]), min(spec["data_ratios"])))


def _degradation(spec: dict, resolution: int) -> str | None:
    return f"{spec['protocol']}={resolution}" if resolution < spec["native_resolution"] else None


def _arm_config(spec: dict, name: str, resolution: int, ratio: float, seed: int, member: int = 0) -> dict:
    arm = {k: v for k, v in spec["arms"][name].items() if k not in ARM_KEYS}
    values = merge_dicts(spec["base"], arm)
    data = values.setdefault("data", {})
    data.update(dataset=spec["dataset"], data_ratio=ratio, split_seed=seed, degradation=_degradation(spec, resolution))
    values.setdefault("optim", {})["epochs"] = _epochs(spec, ratio)
    values["seed"] = seed + 1000 * member  # ensemble members differ in initialisation and order, not in data
    return values


def _arm_recipe(spec: dict, name: str, resolution: int, ratio: float, seed: int, predict: dict | None = None) -> str:
    """What an arm's results depend on: its training config(s), its prediction rows (``predict`` replaces the
    config's, e.g. the rows recorded earlier) and the study's evaluation settings."""
    arm = spec["arms"][name]
    if "ensemble" in arm:
        members = int(arm["ensemble"]["members"])
        configs = [_arm_config(spec, arm["ensemble"]["of"], resolution, ratio, seed, m) for m in range(members)]
        payload = {"members": configs}
    else:
        payload = {"config": _arm_config(spec, name, resolution, ratio, seed),
                   "predict": arm["predict"] if predict is None else predict,
                   "trajectory": arm.get("trajectory")}
    payload.update(ood=spec.get("ood"), cl_limit=spec.get("cl_limit"), protocol=spec["protocol"])
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _commit() -> str:
    """The checkout's commit (``-dirty`` if tracked files changed); DIDICM_COMMIT names it where there is no git."""
    if os.environ.get("DIDICM_COMMIT"):
        return os.environ["DIDICM_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- metrics from saved predictions -------------------------------------------------------------------------------
def _as_saved(probs: torch.Tensor) -> torch.Tensor:
    """Probabilities as the predictions file stores them (float16), back in float32 and renormalised: every metric
    is computed from exactly these values, so it can be recomputed from the file."""
    p = torch.as_tensor(np.asarray(probs, dtype=np.float16)).float()
    return p / p.sum(dim=1, keepdim=True)


def arm_metrics(val_probs, val_labels, test_probs, test_labels, ood: dict | None = None,
                scores: dict | None = None) -> dict:
    """Every reported number of one prediction row, from its saved arrays.

    Args:
        val_probs, test_probs: [N, K] float16 arrays (as saved); val_labels, test_labels: [N] ints.
        ood: {shift name: [M, K] float16 probabilities on that shifted set}.
        scores: {score name: {"test": [N], "<shift>": [M]}}: extra uncertainty scores (higher = less sure), e.g.
            DiDiCM's trajectory signals; each gets an AURC on test and an AUROC per shift.
    Returns:
        test metrics before (top1, nll, ece, brier, aurc, acc_at_90, top5, entropy) and after temperature
        scaling (T fitted on validation: nll_ts, ece_ts, brier_ts), val_top1/val_nll, and OOD AUROCs.
        ``at_floor`` is the percentage of test images whose true class has probability below NLL_FLOOR (0 as
        saved: e.g. where CP's Euler clamp zeroed it, or below float16's resolution) and ``nll_at_floor`` the nats
        those images add to the mean NLL before scaling (27.63 each; after scaling by T a zero costs about
        27.63 / T plus the log-normaliser).
    """
    val, test = _as_saved(val_probs), _as_saved(test_probs)
    val_labels, test_labels = torch.as_tensor(val_labels).long(), torch.as_tensor(test_labels).long()
    out = classification_metrics(test, test_labels)
    out["acc_at_90"] = accuracy_at_coverage(test, test_labels, 0.9)
    temperature = fit_temperature(val, val_labels)
    scaled = classification_metrics(apply_temperature(test, temperature), test_labels)
    floored = test.gather(1, test_labels.reshape(-1, 1)).squeeze(1) < NLL_FLOOR
    out.update(T=temperature, nll_ts=scaled["nll"], ece_ts=scaled["ece"], brier_ts=scaled["brier"],
               count=int(test.shape[0]), val_count=int(val.shape[0]),
               at_floor=100.0 * float(floored.double().mean()),
               nll_at_floor=float(floored.double().mean()) * -math.log(NLL_FLOOR), metrics_version=METRICS_VERSION)
    val_metrics = classification_metrics(val, val_labels)
    out.update(val_top1=val_metrics["top1"], val_nll=val_metrics["nll"])
    in_conf = test.max(dim=1).values
    in_entropy = -torch.special.xlogy(test, test).sum(dim=1)
    for shift, probs in (ood or {}).items():
        shifted = _as_saved(probs)
        out[f"auroc_{shift}_maxprob"] = auroc(-in_conf, -shifted.max(dim=1).values)
        out[f"auroc_{shift}_entropy"] = auroc(in_entropy, -torch.special.xlogy(shifted, shifted).sum(dim=1))
    correct = (test.argmax(dim=1) == test_labels).double()
    for name, values in (scores or {}).items():
        score = torch.as_tensor(np.asarray(values["test"], dtype=np.float16)).double()
        out[f"aurc_{name}"] = _aurc_from(-score, correct)
        for shift in (ood or {}):
            if shift in values:
                shifted = torch.as_tensor(np.asarray(values[shift], dtype=np.float16)).double()
                out[f"auroc_{shift}_{name}"] = auroc(score, shifted)
    return out


def trajectory_scores(trajectory: torch.Tensor) -> dict[str, torch.Tensor]:
    """Uncertainty scores of a CP trajectory [N, S+1, K] (higher = less sure), which no one-pass peer has:

    - ``settle``: the fraction of the S steps that passed before the top class took its final value (0: it
      held from step 1 on; (S - 1) / S: it changed at the last step);
    - ``path_entropy``: the entropy of the class distribution averaged over steps 1..S.
    """
    steps = trajectory.shape[1] - 1
    top = trajectory[:, 1:].argmax(dim=2)  # [N, S]
    differs = top != top[:, -1:]
    last_change = torch.where(differs.any(dim=1), steps - differs.flip(1).int().argmax(dim=1),
                              torch.zeros_like(top[:, 0]))
    p = trajectory[:, 1:].clamp_min(0)
    entropy = -torch.special.xlogy(p, p).sum(dim=2).mean(dim=1)
    return {"settle": last_change.float() / steps, "path_entropy": entropy}


# ---- running a cell ---------------------------------------------------------------------------------------------
def _ood_sets(spec: dict, resolution: int, test_set) -> dict:
    """Shifted inputs the classifier should be unsure about, at the cell's input size and normalisation:
    scikit-learn's digits (another domain) and the first ``count`` test images under heavy pixel noise."""
    ood = spec.get("ood") or {}
    if not ood:
        return {}
    from sklearn.datasets import load_digits

    count = int(ood.get("count", 2000))
    pipeline = parse_degradation(_degradation(spec, resolution))
    digits = load_digits()
    pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:count, None]
    native = spec["native_resolution"]
    digits_set = InMemoryDataset("digits-shift", "test", pixels, digits.target[:count].astype(np.int64),
                                 np.arange(len(pixels[:count])), 2, test_set.classes, pipeline.output_size(native),
                                 test_set.mean, test_set.std, pipeline, False, False, load_size=native)
    noise = ",".join(filter(None, [_degradation(spec, resolution), f"noise={float(ood.get('noise', 0.5)):g}"]))
    noise_set = create_dataset(spec["dataset"], "test", degradation=noise)
    return {"digits": digits_set.tensors()[0][:count], "noise": noise_set.tensors()[0][:count]}


def _batches(images: torch.Tensor, batch: int, device):
    for start in range(0, images.shape[0], batch):
        chunk = images[start:start + batch].to(device)
        yield chunk, torch.zeros(chunk.shape[0], dtype=torch.long, device=device)


def _predict_row(model, diffusion, sampler: str, splits: dict, device, seed: int, cl_limit, augment, trajectory: bool,
                 batch: int) -> tuple[dict, dict, float]:
    """One prediction row on every split: ({split: probs}, {split: trajectory scores}, test images per second)."""
    spec = parse_sampler(sampler)
    limit = cl_limit if spec.kind == "cl" else None
    probs, signals, speed = {}, {}, 0.0
    for split, (images, labels) in splits.items():
        count = images.shape[0] if limit is None else min(limit, images.shape[0])
        batches = ((images[i:min(i + batch, count)].to(device), labels[i:min(i + batch, count)].to(device))
                   for i in range(0, count, batch))
        started = time.perf_counter()
        out = collect_probs(model, batches, spec, diffusion, seed=seed, augment=augment, return_trajectory=trajectory)
        if split == "test":
            speed = count / max(time.perf_counter() - started, 1e-9)
        probs[split] = out[0].numpy().astype(np.float16)
        if trajectory:
            signals[split] = {k: v.numpy().astype(np.float16) for k, v in trajectory_scores(out[2]).items()}
    return probs, signals, speed


def _arm_run_dir(spec: dict, name: str, resolution: int, ratio: float, seed: int, member: int = 0) -> Path:
    """The arm's training folder, named by a hash of its training config (not of its prediction rows)."""
    values = _arm_config(spec, name, resolution, ratio, seed, member)
    recipe = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]
    suffix = f"_m{member}" if member else ""
    return Path(spec.get("runs", "runs/study")) / _cell_name(resolution, ratio, seed) / f"{name}{suffix}-{recipe}"


def _train_arm(spec: dict, name: str, resolution: int, ratio: float, seed: int, member: int, progress: bool, log):
    from .training import train

    values = _arm_config(spec, name, resolution, ratio, seed, member)
    values["output"] = str(_arm_run_dir(spec, name, resolution, ratio, seed, member))
    values.update(spec.get("runtime", {}))
    config = config_from_dict(values)
    suffix = f"_m{member}" if member else ""
    log(f"[{_cell_name(resolution, ratio, seed)}] training {name}{suffix} ({config.model.name}, at most "
        f"{config.optim.epochs:g} epochs, select {config.eval.select})")
    result = train(config, resume=True, progress=progress, log=lambda *_: None)
    selection = result.metrics.get("selection", {})
    record = {"model": config.model.name, "train_seconds": result.metrics["train_seconds"],
              "epochs_run": result.metrics["epochs_run"], "steps_run": result.metrics["steps_run"],
              "best_epoch": selection.get("best_epoch"), "best_step": selection.get("best_step"),
              "converged": selection.get("converged"), "stopped_early": selection.get("stopped_early"),
              "select": selection.get("metric"), "validations": len(selection.get("history", [])),
              "channels_last": config.channels_last,
              "validation_seconds": selection.get("validation_seconds"),  # part of train_seconds
              "train_images_per_second": round(result.metrics["steps_run"] * config.optim.batch_size
                                               / max(result.metrics["train_seconds"], 1e-9), 1)}
    return result, record


def _splits(spec: dict, resolution: int, ratio: float, seed: int) -> tuple[dict, object]:
    common = dict(degradation=_degradation(spec, resolution), seed=seed,
                  val_size=spec["base"].get("data", {}).get("val_size"))
    val_set = create_dataset(spec["dataset"], "val", **common)
    test_set = create_dataset(spec["dataset"], "test", **common)
    splits = {"val": val_set.tensors(), "test": test_set.tensors()}
    for shift, images in _ood_sets(spec, resolution, test_set).items():
        splits[shift] = (images, torch.zeros(images.shape[0], dtype=torch.long))
    return splits, test_set


def _load_predictions(path: Path) -> dict:
    if not path.exists():
        return {}
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _save_predictions(path: Path, arrays: dict) -> None:
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _row_metrics(arrays: dict, row: str, signal_row: str | None) -> dict:
    ood = {s: arrays[f"{s}_{row}"] for s in OOD_SETS if f"{s}_{row}" in arrays}
    n_val = arrays[f"val_{row}"].shape[0]
    n_test = arrays[f"test_{row}"].shape[0]
    scores = {}
    if signal_row == row:
        for name in ("settle", "path_entropy"):
            scores[name] = {split: arrays[f"{split}_{row}_{name}"] for split in ("test", *OOD_SETS)
                            if f"{split}_{row}_{name}" in arrays}
    return arm_metrics(arrays[f"val_{row}"], arrays["val_labels"][:n_val], arrays[f"test_{row}"],
                       arrays["test_labels"][:n_test], ood, scores)


def _predict_arm_rows(spec: dict, arm_name: str, rows: list[str], model, diffusion, splits: dict, test_set,
                      seed: int, batch: int, arrays: dict, record: dict, name: str, log) -> None:
    """Predict ``rows`` of a trained arm on every split into ``arrays``, and record each row's sampler and speed."""
    arm = spec["arms"][arm_name]
    device = next(model.parameters()).device
    augment = test_set.batch_augment()
    for row in rows:
        sampler = arm["predict"][row]
        log(f"[{name}] {arm_name}: predicting {row} ({sampler}) on "
            + ", ".join(f"{len(v[1])} {k}" for k, v in splits.items()) + " images")
        eval_started = time.perf_counter()
        with_trajectory = arm.get("trajectory") == row
        probs, signals, speed = _predict_row(model, diffusion, sampler, splits, device, seed, spec.get("cl_limit"),
                                             augment, with_trajectory, batch)
        for split, p in probs.items():
            arrays[f"{split}_{row}"] = p
        for split, values in signals.items():
            for signal, v in values.items():
                arrays[f"{split}_{row}_{signal}"] = v
        parsed = parse_sampler(sampler)
        passes = _dc_passes(parsed, splits["test"][1].max().item() + 1) if parsed.kind == "dc" \
            else parsed.evaluations_per_image
        record["rows"][row] = {"arm": arm_name, "sampler": sampler, "images_per_second": round(speed, 1),
                               "evaluations_per_image": passes,
                               "eval_seconds": round(time.perf_counter() - eval_started, 2)}


def _prediction_changes(spec: dict, arm_name: str, record: dict, arrays: dict, resolution: int, ratio: float,
                        seed: int) -> tuple[list[str], list[str]] | None:
    """For an arm already trained and predicted whose config changed only in its prediction rows: (rows to
    predict, added or with another sampler; recorded rows the config no longer has). None when its training
    differs: the arm's recipe with its recorded rows must be the recorded recipe."""
    arm, cached = spec["arms"][arm_name], record["arms"].get(arm_name)
    if "ensemble" in arm or not cached:
        return None
    recorded = {r: i["sampler"] for r, i in record["rows"].items() if i.get("arm") == arm_name}
    if not recorded or any(f"test_{r}" not in arrays for r in recorded):
        return None
    if _arm_recipe(spec, arm_name, resolution, ratio, seed, predict=recorded) != cached.get("recipe"):
        return None
    predict = [r for r, sampler in arm["predict"].items()
               if r not in recorded or parse_sampler(sampler).name != parse_sampler(recorded[r]).name]
    return predict, [r for r in recorded if r not in arm["predict"]]


def _saved_arm_model(spec: dict, arm_name: str, cached: dict, splits: dict, arrays: dict, record: dict,
                     resolution: int, ratio: float, seed: int, batch: int):
    """(model, diffusion, device name) from the arm's run folder, if it is the model that made the arm's saved
    predictions: the same final step, and a deterministic recorded row re-predicted on the first validation batch
    equal to the saved one (within float16 rounding, which another thread count's kernels can move).
    (None, reason) otherwise."""
    from .runtime import load_trained_model, resolve_device

    path = _arm_run_dir(spec, arm_name, resolution, ratio, seed) / "model.safetensors"
    if not path.exists():
        return None, f"{path} is missing"
    values = merge_dicts(_arm_config(spec, arm_name, resolution, ratio, seed), spec.get("runtime", {}))
    device = resolve_device(values.get("device", "auto"))
    model, diffusion, meta = load_trained_model(path, device)
    if meta.get("step") != cached.get("steps_run"):
        return None, f"{path} stopped at step {meta.get('step')}, the arm's record at {cached.get('steps_run')}"
    if cached.get("channels_last"):  # predicted as it was trained
        model = model.to(memory_format=torch.channels_last)
    deterministic = [r for r, i in record["rows"].items() if i.get("arm") == arm_name and
                     parse_sampler(i["sampler"]).kind in ("cp", "classifier", "mean") and
                     parse_sampler(i["sampler"]).mode != "random"]
    if deterministic:
        row = deterministic[0]
        count = min(batch, len(splits["val"][1]))  # the first batch as it was predicted
        check = {"val": (splits["val"][0][:count], splits["val"][1][:count])}
        probs, _, _ = _predict_row(model, diffusion, record["rows"][row]["sampler"], check, device, seed, None, None,
                                   False, batch)
        difference = np.abs(probs["val"].astype(np.float32) - arrays[f"val_{row}"][:count].astype(np.float32)).max()
        if difference > 1e-3:
            return None, f"{path} does not reproduce the saved {row} predictions (they differ by {difference:.3g})"
    return (model, diffusion, _device_label(device)), None


def _rescore(record: dict, arrays: dict, arm_name: str, signal_row: str | None) -> bool:
    """Recompute, from the saved predictions, the metrics of this arm's rows that an older arm_metrics wrote."""
    stale = [row for row, info in record["rows"].items() if info.get("arm") == arm_name
             and info.get("metrics_version") != METRICS_VERSION and f"test_{row}" in arrays]
    for row in stale:
        record["rows"][row].update(_row_metrics(arrays, row, signal_row))
    return bool(stale)


def run_cell(spec: dict, resolution: int, ratio: float, seed: int, progress: bool = True, log=print) -> dict:
    """Train and evaluate every arm of one cell that is not cached; returns the cell's record.

    A cached arm whose rows an older arm_metrics scored is rescored from its saved predictions; a trained arm
    to which the config added prediction rows gets only those rows, predicted by its saved model."""
    name = _cell_name(resolution, ratio, seed)
    out = Path(spec["output"])
    cell_path, pred_path = out / "cells" / f"{name}.json", out / "predictions" / f"{name}.npz"
    record = json.loads(cell_path.read_text()) if cell_path.exists() else {}
    if record.get("protocol") != spec["protocol"]:
        record = {}
    record.update(resolution=resolution, data_ratio=ratio, seed=seed, protocol=spec["protocol"],
                  degradation=_degradation(spec, resolution))
    record.setdefault("arms", {})
    record.setdefault("rows", {})
    arrays = _load_predictions(pred_path)
    splits = test_set = None
    batch = int(spec.get("eval_batch_size", 512))

    def need_splits():
        nonlocal splits, test_set
        if splits is None:
            splits, test_set = _splits(spec, resolution, ratio, seed)
            for split in ("val", "test"):
                labels = splits[split][1].numpy().astype(np.int16)
                if f"{split}_labels" in arrays and not np.array_equal(arrays[f"{split}_labels"], labels):
                    raise DidicmError(f"{pred_path} holds other {split} labels than the data gives now (has the data "
                                      "set or its split changed?); move it aside to start the cell again")
                arrays[f"{split}_labels"] = labels

    def save(arm_name: str, rows: list[str], seconds: float) -> None:
        # metrics are computed from the arrays as saved, never from the in-memory float32 probabilities
        signal_row = spec["arms"][arm_name].get("trajectory")
        for row, info in record["rows"].items():
            if info["arm"] == arm_name and row in rows:
                info.update(_row_metrics(arrays, row, signal_row))
        _save_predictions(pred_path, arrays)
        record["commit"] = _commit()
        write_json(cell_path, record)
        log(f"[{name}] {arm_name}: " + ", ".join(f"{row} {record['rows'][row]['top1']:.2f}%" for row in rows) +
            f" ({seconds:.0f} s)")

    for arm_name, arm in spec["arms"].items():
        if not _in_cell(spec, arm, resolution, ratio):
            continue
        recipe = _arm_recipe(spec, arm_name, resolution, ratio, seed)
        cached = record["arms"].get(arm_name, {})
        rows = [arm_name] if "ensemble" in arm else list(arm["predict"])
        if cached.get("recipe") == recipe and all(f"test_{r}" in arrays for r in rows):
            if _rescore(record, arrays, arm_name, arm.get("trajectory")):
                record["commit"] = _commit()
                write_json(cell_path, record)
                log(f"[{name}] {arm_name}: cached, rescored from its saved predictions")
            else:
                log(f"[{name}] {arm_name}: cached")
            continue
        started = time.perf_counter()
        changes = _prediction_changes(spec, arm_name, record, arrays, resolution, ratio, seed)
        if changes is not None:
            need_splits()
            saved, reason = _saved_arm_model(spec, arm_name, cached, splits, arrays, record, resolution, ratio, seed,
                                             batch)
            if saved is None:
                log(f"[{name}] {arm_name}: its prediction rows changed, but {reason}: training it again")
            else:
                model, diffusion, device = saved
                predict, dropped = changes
                for row in dropped:  # rows the config no longer has: their record and arrays go
                    record["rows"].pop(row)
                    names = {row, f"{row}_settle", f"{row}_path_entropy"}  # '<split>_<name>' in the arrays
                    for key in [k for k in arrays if "_" in k and k.split("_", 1)[1] in names]:
                        del arrays[key]
                _predict_arm_rows(spec, arm_name, predict, model, diffusion, splits, test_set, seed, batch, arrays,
                                  record, name, log)
                _rescore(record, arrays, arm_name, arm.get("trajectory"))
                cached["recipe"] = recipe
                cached.setdefault("rows_added", []).append({"rows": predict, "dropped": dropped, "commit": _commit(),
                                                            "device": device})
                save(arm_name, predict, time.perf_counter() - started)
                continue
        need_splits()
        arm_record = {"recipe": recipe, "commit": _commit()}
        if "ensemble" in arm:
            of, members = arm["ensemble"]["of"], int(arm["ensemble"]["members"])
            summed, seconds, trained = {}, 0.0, []
            for member in range(members):
                result, info = _train_arm(spec, of, resolution, ratio, seed, member, progress, log)
                seconds += info["train_seconds"]
                trained.append(info)
                device = next(result.model.parameters()).device
                probs, _, _ = _predict_row(result.model, None, "classifier", splits, device, seed, None, None, False,
                                           batch)
                for split, p in probs.items():
                    summed[split] = summed.get(split, 0.0) + p.astype(np.float64) / members
            for split, p in summed.items():
                arrays[f"{split}_{arm_name}"] = p.astype(np.float16)
            arm_record.update(members=trained, train_seconds=round(seconds, 2), model=trained[0]["model"],
                              epochs_run=[m["epochs_run"] for m in trained],
                              best_epoch=[m["best_epoch"] for m in trained],
                              converged=all(m["converged"] for m in trained), device=_device_label(device))
            record["rows"][arm_name] = {"arm": arm_name, "sampler": f"ensemble of {members}",
                                        "evaluations_per_image": members}
        else:
            result, info = _train_arm(spec, arm_name, resolution, ratio, seed, 0, progress, log)
            arm_record.update(info)
            model, diffusion = result.model, result.diffusion
            device = next(model.parameters()).device
            _predict_arm_rows(spec, arm_name, rows, model, diffusion, splits, test_set, seed, batch, arrays, record,
                              name, log)
            if arm.get("trajectory") and diffusion is not None and spec.get("trajectories"):
                count = int(spec["trajectories"])
                images, labels = splits["test"][0][:count].to(device), splits["test"][1][:count]
                sampler = parse_sampler(arm["predict"][arm["trajectory"]])
                _, traj = collect_probs(model, [(images, labels.to(device))], sampler, diffusion, seed=seed,
                                        return_trajectory=True)[0::2]
                unnormalised = images.cpu() * torch.tensor(test_set.std).view(-1, 1, 1) + \
                    torch.tensor(test_set.mean).view(-1, 1, 1)
                record["trajectories"] = {"images": unnormalised.tolist(), "labels": labels.tolist(),
                                          "trajectory": traj.tolist(), "classes": list(test_set.classes)}
            arm_record["device"] = _device_label(device)
        arm_record["wall_seconds"] = round(time.perf_counter() - started, 2)
        record["arms"][arm_name] = arm_record
        save(arm_name, rows, arm_record["wall_seconds"])
    return record


def _cell_cost(record: dict) -> dict:
    """What the cell took: the devices, training and wall seconds summed over its arms (an arm's wall time is its
    last session's, training time counts every session of a resumed arm), and evaluation images/s per row."""
    arms = record["arms"].values()
    return {"devices": sorted({a["device"] for a in arms if "device" in a}),
            "train_seconds": round(sum(a.get("train_seconds", 0.0) for a in arms), 2),
            "wall_seconds": round(sum(a.get("wall_seconds", 0.0) for a in arms), 2),
            "eval_images_per_second": {row: info["images_per_second"] for row, info in record["rows"].items()
                                       if "images_per_second" in info}}


def _dc_passes(parsed, num_classes: int = 10) -> float:
    from .peers import evaluations_per_image

    return evaluations_per_image(num_classes, parsed.steps, parsed.mode == "adaptive")


def _device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def run_study(path: str | Path, progress: bool = True, log=print, only: list[str] | None = None, jobs: int = 1,
              aggregate_results: bool = True) -> dict | None:
    """Run every missing arm of every cell of the study at ``path`` (YAML), then aggregate. Resumable.

    ``jobs`` > 1 runs the cells in that many worker processes (``didicm study --only ...``), which keeps a GPU
    busy with the study's small networks; each worker writes its cells as they finish.
    """
    spec = load_study(path)
    # cheapest first (pixels x data), every seed of a setting together: verdicts need two seeds, and low
    # resolution with little data finishes in minutes, so results land early
    grid = sorted(((r, q, s) for s in spec["seeds"] for q in spec["data_ratios"] for r in spec["resolutions"]),
                  key=lambda c: (c[0] * c[0] * c[1], c[0], c[2]))
    if only:
        unknown = set(only) - {_cell_name(*cell) for cell in grid}
        if unknown:
            raise ConfigError(f"unknown cells {sorted(unknown)}; names look like res7_ratio0.02_seed0")
        grid = [cell for cell in grid if _cell_name(*cell) in only]
    if jobs > 1 and len(grid) > 1:
        _run_workers(path, [_cell_name(*cell) for cell in grid], jobs, log)
    else:
        for index, cell in enumerate(grid, 1):
            log(f"cell {index}/{len(grid)} {_cell_name(*cell)}")
            run_cell(spec, *cell, progress=progress, log=log)
    if not aggregate_results:
        return None
    return aggregate(spec, command=" ".join(["didicm", "study", str(path)]))


def _run_workers(path: str | Path, names: list[str], jobs: int, log) -> None:
    """Split ``names`` round-robin over ``jobs`` ``didicm study --only`` processes and wait for all of them."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    workers = []
    for worker in range(min(jobs, len(names))):
        mine = names[worker::jobs]
        command = [sys.executable, "-m", "didicm.cli", "study", str(path), "--no-progress", "--no-aggregate"]
        for name in mine:
            command += ["--only", name]
        log(f"worker {worker}: {', '.join(mine)}")
        workers.append(subprocess.Popen(command, env=env))
    failed = [i for i, w in enumerate(workers) if w.wait() != 0]
    if failed:
        raise DidicmError(f"study workers {failed} failed (their finished arms are kept; re-run to continue)")


# ---- aggregation and the report -------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _verdict(mean: float, std: float, n: int) -> str:
    """The study's rule: a gap counts only beyond two seed standard deviations, with at least 2 seeds."""
    if n < 2:
        return "one seed"
    if abs(mean) <= 2 * std:
        return "tie"
    return "win" if mean > 0 else "loss"


def _summaries(spec: dict, cells: list[dict]) -> list[dict]:
    """Per (resolution, ratio): every row's mean and std over seeds, and DiDiCM's gaps to every other row."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["resolution"], cell["data_ratio"]), []).append(cell)
    summaries = []
    for (resolution, ratio), group in sorted(groups.items(), key=lambda kv: (-kv[0][0], -kv[0][1])):
        rows = sorted({r for c in group for r in c["rows"]})
        summary = {"resolution": resolution, "data_ratio": ratio, "seeds": sorted(c["seed"] for c in group),
                   "rows": {}, "gaps": {},
                   "_rows": [{r: {"arm": i["arm"], "sampler": i["sampler"]} for r, i in c["rows"].items()}
                             for c in group]}
        for row in rows:
            present = [c for c in group if row in c["rows"]]
            summary["rows"][row] = {"seeds": len(present), **{
                m: dict(zip(("mean", "std"), _mean_std([c["rows"][row][m] for c in present]), strict=True))
                for m in (*REPORTED, *SIGNALS, "T") if all(m in c["rows"][row] for c in present)}}
        for row in rows:
            if row == HEADLINE:
                continue
            paired = [c for c in group if row in c["rows"] and HEADLINE in c["rows"]]
            if not paired:
                continue
            gap = {}
            for metric in ("top1", "nll_ts", "ece_ts", "brier_ts", "aurc"):
                mean, std = _mean_std([c["rows"][HEADLINE][metric] - c["rows"][row][metric] for c in paired])
                better = mean if metric == "top1" else -mean  # positive: DiDiCM better
                gap[metric] = {"mean": mean, "std": std, "n": len(paired),
                               "verdict": _verdict(better, std, len(paired))}
            summary["gaps"][row] = gap
        summaries.append(summary)
    return summaries


def _controls(spec: dict) -> list[str]:
    """The rows that are not DiDiCM (the classifiers a user would pick instead)."""
    rows = []
    for name, arm in spec["arms"].items():
        if name.startswith("didicm"):
            continue
        rows += [name] if "ensemble" in arm else list(arm["predict"])
    return rows


def aggregate(spec: dict, command: str) -> dict:
    """Read every finished cell, write study.json, the figures and report.md; return the study record."""
    out = Path(spec["output"])
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    cells = [c for c in cells if c.get("protocol") == spec["protocol"] and c.get("rows")]
    if not cells:
        raise ConfigError(f"no finished cells under {out / 'cells'}; run the study first")
    # cost is derived from each cell's arms, here only
    light = [{**{k: v for k, v in c.items() if k != "trajectories"}, "cost": _cell_cost(c)} for c in cells]
    summaries = _summaries(spec, cells)
    study = {"dataset": spec["dataset"], "protocol": spec["protocol"], "command": command, "config": spec["_path"],
             "headline": HEADLINE, "controls": _controls(spec),
             "arms": {k: v.get("describe", "") for k, v in spec["arms"].items()},
             "commits": sorted({c.get("commit", "unknown") for c in cells}),
             "devices": sorted({a.get("device", "unknown") for c in cells for a in c["arms"].values()
                                if "device" in a}),
             "cells": light, "summary": summaries}
    frontier, frontier_figures = _frontier(spec, summaries, out)
    for summary in summaries:
        summary.pop("_rows")
    write_json(out / "study.json", study)
    figures = _figures(spec, cells, summaries, out)
    (out / "report.md").write_text(_report(spec, study, figures, frontier + [f"![{Path(f).stem}]({Path(f).name})"
                                                                            for f in frontier_figures]))
    return study


def _figures(spec: dict, cells: list[dict], summaries: list[dict], out: Path) -> list[str]:
    figures = []
    native, full = spec["native_resolution"], max(spec["data_ratios"])
    by_key = {(s["resolution"], s["data_ratio"]): s for s in summaries}
    for against in ("twin", "best_control"):
        axes = {}
        for axis, keys, unit in ((f"resolution (data ratio {full:g})",
                                  [(r, full) for r in sorted(spec["resolutions"], reverse=True)], " px"),
                                 (f"data ratio ({native} px)",
                                  [(native, q) for q in sorted(spec["data_ratios"], reverse=True)], "")):
            points = []
            for key in keys:
                summary = by_key.get(key)
                other = _best_control(summary) if summary and against == "best_control" else "twin"
                if summary and other in summary["gaps"]:
                    gap = summary["gaps"][other]["top1"]
                    points.append((f"{key[0] if unit else key[1]:g}{unit}", gap["mean"], gap["std"]))
            if len(points) >= 2:
                axes[axis] = ([p[0] for p in points], [p[1] for p in points], [p[2] for p in points])
        if axes:
            label = "twin" if against == "twin" else "the best control in each cell"
            figures.append(str(plot_gap(axes, out / f"gap_{against}.png", title=f"{_headline_label(spec)} - {label}",
                                        ylabel=f"top-1 gap, DiDiCM - {label} (points)")))
    hardest = min((c["resolution"], c["data_ratio"]) for c in cells)
    cell = next(c for c in cells if (c["resolution"], c["data_ratio"]) == hardest)
    head = parse_sampler(cell["rows"][HEADLINE]["sampler"]) if HEADLINE in cell["rows"] else None
    family = {}  # steps -> row: CP rows that differ from the headline in their step count only
    for r, info in cell["rows"].items():
        parsed = parse_sampler(info["sampler"]) if info["arm"] == HEADLINE else None
        if head and parsed and parsed.kind == "cp" and \
                (parsed.mode, parsed.grid, parsed.update) == (head.mode, head.grid, head.update):
            family[parsed.steps] = r
    if len(family) >= 2:
        steps = sorted(family)
        curves = {"DiDiCM CP": (steps, [cell["rows"][family[k]]["top1"] for k in steps])}
        baselines = {r: cell["rows"][r]["top1"] for r in _controls(spec) if r in cell["rows"]}
        figures.append(str(plot_accuracy_vs_steps(curves, baselines, out / "steps.png",
                                                  title=f"{hardest[0]} px, ratio {hardest[1]:g}, seed {cell['seed']}")))
    arrays = _load_predictions(out / "predictions" / f"{_cell_name(*hardest, cell['seed'])}.npz")
    if "test_twin" in arrays and f"test_{HEADLINE}" in arrays:
        bins = {}
        for row, label in (("twin", "twin"), (HEADLINE, _headline_label(spec))):
            info = cell["rows"][row]
            probs = apply_temperature(_as_saved(arrays[f"test_{row}"]), info["T"])
            labels = torch.as_tensor(arrays["test_labels"]).long()
            bins[f"{label} (T = {info['T']:.2f})"] = reliability_bins(probs, labels)
        figures.append(str(plot_reliability(bins, out / "reliability_hardest.png",
                                            title=f"after temperature scaling: {hardest[0]} px, ratio {hardest[1]:g}")))
    if "trajectories" in cell:
        t = cell["trajectories"]
        figures.append(str(plot_trajectories_grid(torch.tensor(t["images"]), np.asarray(t["trajectory"]),
                                                  t["classes"], t["labels"], out / "trajectories.png")))
    return figures


def _flops(fn, *args) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


def row_costs(spec: dict, resolution: int, rows: dict) -> dict[str, float]:
    """Each row's prediction cost per image in passes of the twin, by counted FLOPs at the cell's input size:
    the label-independent part (``encode``) once, the conditioned part (``score``) once per CP step (once per step
    and chain for CL); an ensemble of M costs M, S-view TTA costs S, the mean read-out one pass."""
    from .models import create

    in_chans = 1 if spec["dataset"] in ("fashion-mnist", "digits") else 3
    size = parse_degradation(_degradation(spec, resolution)).output_size(spec["native_resolution"]) \
        if spec["protocol"] == "resize" else spec["native_resolution"]
    x = torch.zeros(1, in_chans, size, size)

    def build(arm: str):
        model = spec["arms"][arm].get("model", {})
        kwargs = merge_dicts(spec["base"].get("model", {}).get("kwargs", {}), model.get("kwargs", {}))
        return create(model["name"], num_classes=10, in_chans=in_chans, **kwargs).eval()

    twin = _flops(build("twin"), x)
    costs = {}
    for row, info in rows.items():
        arm, sampler = info["arm"], info["sampler"]
        if "ensemble" in spec["arms"][arm]:
            costs[row] = float(spec["arms"][arm]["ensemble"]["members"])
            continue
        parsed = parse_sampler(sampler)
        model = build(arm)
        if parsed.kind in ("cp", "cl"):
            z = model.encode(x)
            calls = parsed.steps * (parsed.chains if parsed.kind == "cl" else 1)
            score = _flops(model.score, z, torch.zeros(1, dtype=torch.long), torch.ones(1))
            costs[row] = (_flops(model.encode, x) + calls * score) / twin
        elif parsed.kind == "mean":
            costs[row] = _flops(model.clean_logits, x) / twin
        elif parsed.kind == "tta":
            costs[row] = parsed.steps * _flops(model, x) / twin
        elif parsed.kind == "dc":  # K x draws UNet passes (fewer for the adaptive variant)
            step = torch.zeros(1, dtype=torch.long)
            costs[row] = _dc_passes(parsed) * _flops(model, x, step, step) / twin
        else:
            costs[row] = _flops(model, x) / twin
    return costs


def _frontier(spec: dict, summaries: list[dict], out: Path) -> tuple[list[str], list[str]]:
    """Top-1 and temperature-scaled NLL against cost per image in the hardest and the easiest setting."""
    from .report import plot_frontier

    lines, figures = [], []
    keys = [(min(spec["resolutions"]), min(spec["data_ratios"])), (max(spec["resolutions"]), max(spec["data_ratios"]))]
    for summary in summaries:
        key = (summary["resolution"], summary["data_ratio"])
        if key not in keys:
            continue
        rows = {}
        for cell_rows in summary.get("_rows", []):
            rows.update(cell_rows)
        costs = row_costs(spec, key[0], rows)
        table, points = [], {}
        for row, stats in sorted(summary["rows"].items(), key=lambda kv: costs.get(kv[0], 0)):
            if "nll_ts" not in stats or row not in costs:
                continue
            table.append({"row": row, "cost (twin passes, FLOPs)": round(costs[row], 2),
                          "top1": _fmt(stats["top1"]), "nll_ts": _fmt(stats["nll_ts"], 3), "seeds": stats["seeds"]})
            points[row] = (costs[row], stats["top1"]["mean"], stats["top1"]["std"], stats["nll_ts"]["mean"])
        title = f"{key[0]} px, data ratio {key[1]:g}"
        lines += [markdown_table(table, title=f"Accuracy-compute frontier, {title} (test split, mean ± std over "
                                              "seeds; cost per image in passes of the twin, by counted FLOPs)"), ""]
        lines += _recommendation(summary, costs, title)
        name = f"frontier_res{key[0]}_ratio{key[1]:g}.png"
        figures.append(str(plot_frontier(points, out / name, title=f"frontier: {title}")))
    return lines, figures


def _recommendation(summary: dict, costs: dict, title: str) -> list[str]:
    """Issue 15's default: the cheapest DiDiCM row that matches the headline (CP-8 of the full network) within seed
    noise, i.e. neither its top-1 nor its temperature-scaled NLL gap to the headline counts by the study's rule;
    stored in the summary (study.json) and written from it, with what every cheaper row saves and costs."""
    if HEADLINE not in costs or HEADLINE not in summary["rows"]:
        return []
    head_cost = costs[HEADLINE]
    options = sorted((row for row in summary["gaps"] if row.startswith(HEADLINE) and row in costs
                      and costs[row] < head_cost), key=lambda row: costs[row])
    table, match = [], None
    for row in options:
        gap = summary["gaps"][row]
        matches = gap["top1"]["n"] >= 2 and all(gap[m]["verdict"] != "win" for m in ("top1", "nll_ts"))
        if matches and match is None:
            match = row
        table.append({"row": row, "cost": round(costs[row], 2), "saves": f"{head_cost / costs[row]:.1f}x",
                      "CP-8 minus row, top-1": f"{gap['top1']['mean']:+.2f} ± {gap['top1']['std']:.2f} "
                                               f"({gap['top1']['verdict']})",
                      "nll_ts": f"{gap['nll_ts']['mean']:+.3f} ± {gap['nll_ts']['std']:.3f} "
                                f"({gap['nll_ts']['verdict']})",
                      "matches": matches})
    seeds = len(summary["seeds"])
    summary["recommendation"] = {"row": match, "cost": round(costs[match], 2) if match else None,
                                 "headline_cost": round(head_cost, 2), "seeds": seeds}
    if not table:
        return []
    if match:
        gap = summary["gaps"][match]
        arms = {r: i["arm"] for cell_rows in summary.get("_rows", []) for r, i in cell_rows.items()}
        text = (f"Recommended in this setting: `{match}` (arm `{arms.get(match, match)}`), the cheapest DiDiCM row "
                f"that is not worse than the headline beyond seed noise ({round(costs[match], 2)} twin passes against "
                f"{round(head_cost, 2)}; headline minus it: top-1 {gap['top1']['mean']:+.2f} ± "
                f"{gap['top1']['std']:.2f} ({gap['top1']['verdict']}), NLL after scaling "
                f"{gap['nll_ts']['mean']:+.3f} ± {gap['nll_ts']['std']:.3f} ({gap['nll_ts']['verdict']}); "
                f"{seeds} seeds).")
    else:
        text = ("No cheaper DiDiCM row matches the headline within seed noise in this setting; what each saves and "
                "loses:")
    return [text, "", markdown_table(table, title=f"Cheaper DiDiCM rows against the headline, {title} (cost in twin "
                                                  "passes; a row matches when neither gap counts)"), ""]


def _best_control(summary: dict) -> str | None:
    """The control row with the best mean test top-1 in this setting (chosen on test: an upper bound on what a
    user choosing on validation would get, so the comparison is against the strongest control)."""
    controls = [r for r in summary["gaps"] if not r.startswith("didicm")]
    return max(controls, key=lambda r: summary["rows"][r]["top1"]["mean"]) if controls else None


def _fmt(stat: dict, digits: int = 2) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _report(spec: dict, study: dict, figures: list[str], frontier: list[str]) -> str:
    summaries = study["summary"]
    cells = study["cells"]
    lines = [f"# The uncertainty study on {spec['dataset']}: DiDiCM against the classifiers a user would pick", "",
             f"Produced by `{study['command']}` from `{spec['_path']}` (protocol `{spec['protocol']}`: "
             + ("the network sees R x R images, as the official `--input-size R`" if spec["protocol"] == "resize"
                else "images area-downsampled to R x R and resized back") + ").",
             f"Commits: {', '.join(f'`{c[:12]}`' for c in study['commits'])}. Devices: {', '.join(study['devices'])}.",
             f"{len(cells)} of {len(spec['resolutions']) * len(spec['data_ratios']) * len(spec['seeds'])} cells "
             "have results; a cell lists the arms finished so far.", "",
             "Every arm trains by one rule: at most the epoch budget, validation after every interval, the weights of "
             f"the best validation {spec['base'].get('eval', {}).get('select', 'metric')} kept, learning rate decayed "
             "on plateaus and training stopped by patience. Every row's temperature is fitted on the validation split "
             "(on its log-probabilities) and calibration is compared after it. DiDiCM's headline row, fixed before any "
             f"result, is `didicm` ({_headline_label(spec)}); its other samplers are secondary rows. Gaps are "
             "DiDiCM minus the other row, "
             "mean ± std over seeds of the per-seed differences; a gap within two standard deviations (or with one "
             "seed) is a tie.", "",
             "Arms: " + "; ".join(f"`{k}`: {v}" for k, v in study["arms"].items() if v) + ".", ""]
    lines += ["## Findings (generated from study.json)", ""] + _findings(study, _headline_label(spec)) + [""]
    for summary in summaries:
        key = f"{summary['resolution']} px, data ratio {summary['data_ratio']:g}"
        rows = []
        for row, stats in summary["rows"].items():
            entry = {"row": row, "seeds": stats["seeds"]}
            for metric, digits in (("top1", 2), ("nll_ts", 3), ("ece_ts", 3), ("brier_ts", 3), ("nll", 3),
                                   ("ece", 3), ("aurc", 4), ("acc_at_90", 2), ("auroc_digits_maxprob", 3),
                                   ("auroc_noise_maxprob", 3), ("at_floor", 2)):
                if metric in stats:
                    entry[metric] = _fmt(stats[metric], digits)
            rows.append(entry)
        lines += [markdown_table(rows, title=f"{key} (test split, mean ± std over seeds)"), ""]
        if summary["gaps"]:
            gap_rows = [{"DiDiCM minus": row,
                         **{f"{m} gap": f"{g[m]['mean']:+.3f} ± {g[m]['std']:.3f} ({g[m]['verdict']})"
                            for m in ("top1", "nll_ts", "ece_ts")}}
                        for row, g in summary["gaps"].items()]
            lines += [markdown_table(gap_rows, title=f"{key}: gaps (positive top-1 gap, negative NLL/ECE gap: "
                                                     "DiDiCM better)"), ""]
    lines += ["## Uncertainty beyond calibration", "",
              "Selective prediction (AURC: lower is better; it ranks images by max-probability unless named) and "
              "out-of-distribution detection (AUROC against scikit-learn's digits and against test images under heavy "
              "noise; 0.5 is chance). `settle` (how late the CP trajectory's top class settles) and `path_entropy` "
              "(the entropy averaged along the trajectory) are DiDiCM's own signals.", ""] + _signal_tables(summaries)
    lines += ["## The accuracy-compute frontier", ""] + frontier + [""] + _training_table(cells)
    lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(lines) + "\n"


def _headline_label(spec: dict) -> str:
    """'DiDiCM CP-8' for the headline row's sampler 'cp:8'."""
    sampler = spec["arms"][HEADLINE]["predict"][HEADLINE]
    return "DiDiCM " + sampler.split(":")[0].upper() + "-" + ":".join(sampler.split(":")[1:])


def _signal_tables(summaries: list[dict]) -> list[str]:
    out = []
    for summary in summaries:
        rows = []
        for row, stats in summary["rows"].items():
            entry = {"row": row, "aurc": _fmt(stats["aurc"], 4)}
            for metric in SIGNALS:
                if metric in stats:
                    entry[metric.replace("auroc_", "")] = _fmt(stats[metric], 3)
            rows.append(entry)
        out += [markdown_table(rows, title=f"{summary['resolution']} px, data ratio {summary['data_ratio']:g}"), ""]
    return out


def _same_but_update(sampler: str, headline: str) -> bool:
    """Whether ``sampler`` is the CP sampler ``headline`` with the exponential update instead of Euler's."""
    a, b = parse_sampler(sampler), parse_sampler(headline)
    return a.kind == b.kind == "cp" and a.update == "exponential" and b.update == "euler" and \
        (a.steps, a.mode, a.grid) == (b.steps, b.mode, b.grid)


def _findings(study: dict, headline: str) -> list[str]:
    """Sentences whose every number is read from the summaries (so the prose cannot drift from the data)."""
    out = []
    exponential_rows = {}  # per setting: the headline's sampler with the exponential update, whatever its row name
    for cell in study["cells"]:
        head = cell["rows"].get(HEADLINE)
        for row, info in cell["rows"].items():
            if head and info.get("arm") == HEADLINE and _same_but_update(info["sampler"], head["sampler"]):
                exponential_rows[(cell["resolution"], cell["data_ratio"])] = row
    for summary in study["summary"]:
        key = f"{summary['resolution']} px, ratio {summary['data_ratio']:g}"
        gaps = summary["gaps"]
        if "twin" not in gaps:
            continue
        twin = gaps["twin"]
        best = _best_control(summary)
        seeds = len(summary["seeds"])
        text = (f"- **{key}** ({seeds} seed{'s' if seeds > 1 else ''}): {headline} minus twin, top-1 "
                f"{twin['top1']['mean']:+.2f} ± {twin['top1']['std']:.2f} points ({twin['top1']['verdict']}), "
                f"NLL after temperature scaling {twin['nll_ts']['mean']:+.3f} ± {twin['nll_ts']['std']:.3f} "
                f"({twin['nll_ts']['verdict']})")
        if best and best != "twin":
            b = gaps[best]
            text += (f"; against the best control (`{best}`), top-1 {b['top1']['mean']:+.2f} ± {b['top1']['std']:.2f}"
                     f" ({b['top1']['verdict']}), NLL after scaling {b['nll_ts']['mean']:+.3f} ± "
                     f"{b['nll_ts']['std']:.3f} ({b['nll_ts']['verdict']})")
        head = summary["rows"].get(HEADLINE, {})
        if "at_floor" in head and head["at_floor"]["mean"] > 0:
            text += (f". {headline} gives the true class probability 0 (the NLL floor, {-math.log(NLL_FLOOR):.2f} "
                     "nats an image) on "
                     f"{head['at_floor']['mean']:.2f} ± {head['at_floor']['std']:.2f}% of test images, "
                     f"{head['nll_at_floor']['mean']:.3f} ± {head['nll_at_floor']['std']:.3f} nats of its NLL before "
                     "scaling")
        exponential = exponential_rows.get((summary["resolution"], summary["data_ratio"]))
        if exponential in gaps:
            e = gaps[exponential]
            text += (f"; minus the same network with the exponential update (`{exponential}`): top-1 "
                     f"{e['top1']['mean']:+.2f} ± {e['top1']['std']:.2f} ({e['top1']['verdict']}), NLL after "
                     f"scaling {e['nll_ts']['mean']:+.3f} ± {e['nll_ts']['std']:.3f} ({e['nll_ts']['verdict']})")
        out.append(text + ".")
    if not out:
        out.append("- No cell has both DiDiCM and its twin yet.")
    return out


def _train_speed(info: dict):
    """Training images/s of an arm (an ensemble's members together); '' for arms recorded before it was kept."""
    members = info.get("members", [info])
    if not all("train_images_per_second" in m for m in members):
        return ""
    images = sum(m["train_images_per_second"] * m["train_seconds"] for m in members)
    return round(images / max(sum(m["train_seconds"] for m in members), 1e-9), 1)


def _validation_seconds(info: dict):
    """Seconds of an arm's training spent validating (an ensemble's members summed); '' where not counted."""
    seconds = [m.get("validation_seconds") for m in info.get("members", [info])]
    return "" if any(v is None for v in seconds) else round(sum(seconds), 2)


def _training_table(cells: list[dict]) -> list[str]:
    rows = []
    for cell in sorted(cells, key=lambda c: (-c["resolution"], -c["data_ratio"], c["seed"])):
        for arm, info in cell["arms"].items():
            epochs, best = info.get("epochs_run"), info.get("best_epoch")
            rows.append({"cell": _cell_name(cell["resolution"], cell["data_ratio"], cell["seed"]), "arm": arm,
                         "epochs run": epochs if not isinstance(epochs, list) else "/".join(f"{e:g}" for e in epochs),
                         "best epoch": best if not isinstance(best, list) else "/".join(f"{b:g}" for b in best),
                         "converged": info.get("converged"), "train s": info.get("train_seconds"),
                         "of which validation s": _validation_seconds(info),
                         "train img/s": _train_speed(info), "wall s": info.get("wall_seconds"),
                         "device": info.get("device", "")})
    return [markdown_table(rows, title="Training: epochs run, best validation epoch (the kept weights), and "
                                       "whether training went past it"), ""]
