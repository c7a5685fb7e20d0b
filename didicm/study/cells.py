"""One cell of the grid: each arm trained by the shared rule (or read back), its rows predicted on every split,
the arrays and the cell's record saved after every arm; rows the config changed come from the saved model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..config import config_from_dict, merge_dicts
from ..data import create_dataset
from ..data.degradations import parse_degradation
from ..data.memory import InMemoryDataset
from ..errors import DidicmError
from ..evaluation import collect_probs, parse_sampler
from ..files import atomic_write_bytes
from ..report import write_json
from .scores import _rescore, _row_metrics, trajectory_scores
from .spec import (
    _arm_config,
    _arm_recipe,
    _arm_run_dir,
    _cell_name,
    _commit,
    _dc_passes,
    _degradation,
    _device_label,
    _in_cell,
)


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


def _train_arm(spec: dict, name: str, resolution: int, ratio: float, seed: int, member: int, progress: bool, log):
    from ..training import train

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
    from ..runtime import load_trained_model, resolve_device

    path = _arm_run_dir(spec, arm_name, resolution, ratio, seed) / "model.safetensors"
    if not path.exists():
        return None, f"{path} is missing"
    values = merge_dicts(_arm_config(spec, arm_name, resolution, ratio, seed), spec.get("runtime", {}))
    device = resolve_device(values.get("device", "auto"))
    model, diffusion, meta = load_trained_model(path, device)
    if meta.get("step") != cached.get("steps_run"):
        return None, f"{path} stopped at step {meta.get('step')}, the arm's record at {cached.get('steps_run')}"
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
        # metrics are computed from the arrays as saved, never from the in-memory float32 probabilities: the rows
        # just predicted, then any other row of the arm an older arm_metrics scored
        signal_row = spec["arms"][arm_name].get("trajectory")
        for row, info in record["rows"].items():
            if info["arm"] == arm_name and row in rows:
                info.update(_row_metrics(arrays, row, signal_row))
        _rescore(record, arrays, arm_name, signal_row)
        _save_predictions(pred_path, arrays)
        record["commit"] = _commit(out)
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
                record["commit"] = _commit(out)
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
                cached["recipe"] = recipe
                cached.setdefault("rows_added", []).append({"rows": predict, "dropped": dropped, "commit": _commit(out),
                                                            "device": device})
                save(arm_name, predict, time.perf_counter() - started)
                continue
        need_splits()
        arm_record = {"recipe": recipe, "commit": _commit(out)}
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
