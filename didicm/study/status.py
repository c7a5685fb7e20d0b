"""Where a study stands, read from its files without running anything: which arms of which cells are done, which
are training now (and how far: epoch, best validation, validations left before early stopping), which finished
training but wait for their predictions, which stopped part-way and resume from a checkpoint, and which have not
started. ``didicm study CONFIG --status``."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

from ..config import config_from_dict
from ..training.train_loop import lock_owner, selection_for
from .spec import _arm_config, _arm_recipe, _arm_run_dir, _cell_name, _in_cell, grid_cells, load_study


def _prediction_keys(path: Path) -> set[str]:
    """The array names in a cell's predictions file (read from the zip's index, not the arrays)."""
    if not path.exists():
        return set()
    with zipfile.ZipFile(path) as archive:
        return {name.removesuffix(".npy") for name in archive.namelist()}


def _run_progress(run_dir: Path, values: dict) -> dict:
    """An unfinished training folder: live owner, validations replayed through the arm's own selection rule."""
    state = {"state": "pending"}
    owner = lock_owner(run_dir / "train.lock")
    if owner is not None:
        state.update(state="training", pid=owner)
    checkpoints = run_dir / "checkpoints"
    if state["state"] == "pending" and (run_dir / "metrics.json").exists():
        state["state"] = "trained"  # its predictions are made when the study next reaches the cell
    elif state["state"] == "pending" and checkpoints.is_dir() and any(checkpoints.iterdir()):
        state["state"] = "stopped"  # resumes from its newest checkpoint when the study runs again
    rows = {}  # by step, the last row kept (a step validated again after a crash); a half-written row is skipped
    path = run_dir / "validation.csv"
    if path.exists():
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                try:
                    rows[int(row["step"])] = (float(row["epoch"]), {k: float(v) for k, v in row.items()})
                except (KeyError, TypeError, ValueError):  # a short row's missing fields read None
                    continue
    selection = selection_for(config_from_dict(values))  # the rule training applies, defaults included
    if rows and selection is not None:
        try:
            for step in sorted(rows):
                selection.update(step, rows[step][0], rows[step][1])
        except KeyError:  # the arm selects by a metric its log lacks: report where it is, not its selection
            return {**state, "epoch": rows[max(rows)][0]}
        if state["state"] == "pending":
            state["state"] = "stopped"
        state.update(epoch=rows[max(rows)][0], best_epoch=selection.best_epoch, metric=selection.metric,
                     best_value=selection.best_value, lr_scale=selection.lr_scale,
                     left=(selection.patience - selection.since_best) if selection.patience else None)
    return state


def study_status(path: str | Path) -> dict:
    """Every cell of the study at ``path`` in the grid's order, each arm's state: done (with its epochs and wall
    time), training, trained (its predictions not yet made), stopped (resumes) or pending."""
    spec = load_study(path)
    out = Path(spec["output"])
    cells = []
    for resolution, ratio, seed in grid_cells(spec):
        name = _cell_name(resolution, ratio, seed)
        cell_path = out / "cells" / f"{name}.json"
        record = json.loads(cell_path.read_text()) if cell_path.exists() else {}
        keys = _prediction_keys(out / "predictions" / f"{name}.npz")
        arms = {}
        for arm_name, arm in spec["arms"].items():
            if not _in_cell(spec, arm, resolution, ratio):
                continue
            cached = record.get("arms", {}).get(arm_name, {})
            rows = [arm_name] if "ensemble" in arm else list(arm["predict"])
            if (cached.get("recipe") == _arm_recipe(spec, arm_name, resolution, ratio, seed)
                    and all(f"test_{row}" in keys for row in rows)):
                arms[arm_name] = {"state": "done", "epochs_run": cached.get("epochs_run"),
                                  "best_epoch": cached.get("best_epoch"), "wall_seconds": cached.get("wall_seconds")}
                continue
            of, members = ((arm["ensemble"]["of"], int(arm["ensemble"]["members"])) if "ensemble" in arm
                           else (arm_name, 1))
            progress = [_run_progress(_arm_run_dir(spec, of, resolution, ratio, seed, m),
                                      _arm_config(spec, of, resolution, ratio, seed, m)) for m in range(members)]
            if members == 1:
                arms[arm_name] = progress[0]
            else:
                states = [p["state"] for p in progress]
                state = next((s for s in ("training", "stopped", "trained") if s in states), "pending")
                arms[arm_name] = {"state": state, "members": progress}
        cells.append({"cell": name, "arms": arms})
    return {"config": str(path), "cells": cells}


def _describe(arm: dict) -> str:
    if arm["state"] == "done":
        wall = arm.get("wall_seconds")
        epochs = arm.get("epochs_run")
        epochs = "/".join(f"{e:g}" for e in epochs) if isinstance(epochs, list) else (
            f"{epochs:g}" if epochs is not None else "?")
        return f"done ({epochs} epochs" + (f", {wall:.0f} s)" if wall is not None else ")")
    if "members" in arm:
        return arm["state"] + ": " + "; ".join(f"member {m} {_describe(p)}" for m, p in enumerate(arm["members"]))
    text = arm["state"] + (f" (pid {arm['pid']})" if "pid" in arm else "")
    if arm["state"] == "trained":
        text += ", predictions pending"
    if "epoch" in arm:
        text += f", epoch {arm['epoch']:.3g}"
    if "best_value" in arm:
        text += (f", best {arm['metric']} {arm['best_value']:.5g} at epoch {arm['best_epoch']:.3g}, "
                 f"lr x{arm['lr_scale']:.3g}")
        if arm["state"] != "trained" and arm["left"] is not None and arm["left"] > 0:
            text += f", stops after {arm['left']} more validation(s) without improvement"
    return text


def format_status(status: dict) -> str:
    """A line per unfinished arm, grouped by cell, and a count of what is done."""
    lines, done, total, complete = [], 0, 0, 0
    for cell in status["cells"]:
        arms = cell["arms"]
        finished = sum(a["state"] == "done" for a in arms.values())
        done, total = done + finished, total + len(arms)
        if finished == len(arms):
            complete += 1
            continue
        lines.append(f"{cell['cell']}: {finished} of {len(arms)} arms done")
        lines += [f"  {name}: {_describe(arm)}" for name, arm in arms.items() if arm["state"] != "done"]
    head = (f"{status['config']}: {complete} of {len(status['cells'])} cells complete, {done} of {total} arms "
            f"done")
    return "\n".join([head, *lines])
