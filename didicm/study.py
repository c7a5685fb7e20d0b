"""The uncertainty study: DiDiCM against its cross-entropy twin over a grid of resolutions and data ratios.

``didicm study CONFIG`` trains both arms in every (resolution, data ratio, seed) cell with one recipe, picks
DiDiCM's sampler on the validation split, evaluates everything on the test split once, and writes one JSON file
per cell as soon as the cell is done (a re-run skips finished cells whose recipe is unchanged). It then
aggregates the cells into ``study.json``, the figures and ``report.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from .config import config_from_dict, merge_dicts
from .data import create_dataset
from .errors import ConfigError, DidicmError
from .evaluation import evaluate, parse_sampler, predict
from .loader import eval_batches
from .metrics import reliability_bins
from .report import (
    markdown_table,
    plot_accuracy_vs_steps,
    plot_gap,
    plot_reliability,
    plot_trajectories_grid,
    write_json,
)
from .training import device_name, train

__all__ = ["load_study", "run_study", "aggregate"]

METRICS = ("top1", "nll", "ece", "brier")


def load_study(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config {str(path)!r} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    required = ("dataset", "resolutions", "data_ratios", "seeds", "native_resolution", "samplers", "base", "arms",
                "output")
    missing = [key for key in required if key not in spec]
    if missing:
        raise ConfigError(f"study config {str(path)} lacks {missing}")
    if set(spec["arms"]) != {"twin", "didicm"}:
        raise ConfigError("a study config has exactly two arms, 'twin' and 'didicm'")
    for sampler in spec["samplers"]:
        parse_sampler(sampler)
    spec["_path"] = str(path)
    return spec


def _cell_config(spec: dict, arm: str, resolution: int, ratio: float, seed: int) -> dict:
    values = merge_dicts(spec["base"], spec["arms"][arm])
    data = values.setdefault("data", {})
    data["dataset"] = spec["dataset"]
    data["data_ratio"] = ratio
    data["split_seed"] = seed
    if resolution < spec["native_resolution"]:
        data["degradation"] = ",".join(filter(None, [f"resolution={resolution}", data.get("degradation")]))
    values["seed"] = seed
    values["output"] = str(Path(spec.get("runs", "runs/study")) / _cell_name(resolution, ratio, seed) / arm)
    return values


def _cell_name(resolution: int, ratio: float, seed: int) -> str:
    return f"res{resolution}_ratio{ratio:g}_seed{seed}"


def _recipe_hash(spec: dict, resolution: int, ratio: float, seed: int) -> str:
    configs = {arm: _cell_config(spec, arm, resolution, ratio, seed) for arm in ("twin", "didicm")}
    for values in configs.values():
        values.pop("output")
    text = json.dumps({"configs": configs, "samplers": spec["samplers"], "cl_limit": spec.get("cl_limit"),
                       "val_limit": spec.get("val_limit")},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def _evaluate_split(model, diffusion, dataset, specs, seed, limit=None) -> dict:
    return evaluate(model, eval_batches(dataset, 512, next(model.parameters()).device, limit=limit), specs,
                    diffusion, seed=seed, num_classes=dataset.num_classes)


def _probs(model, diffusion, dataset, spec, seed, device) -> tuple[torch.Tensor, torch.Tensor]:
    chunks, labels = [], []
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for images, targets in eval_batches(dataset, 512, device):
            chunks.append(predict(model, images, spec, diffusion, generator).cpu())
            labels.append(targets.cpu())
    return torch.cat(chunks), torch.cat(labels)


def run_cell(spec: dict, resolution: int, ratio: float, seed: int, progress: bool = True, log=print) -> dict:
    """Train and evaluate both arms in one cell; returns the cell's record."""
    record = {"resolution": resolution, "data_ratio": ratio, "seed": seed, "commit": _commit(),
              "recipe": _recipe_hash(spec, resolution, ratio, seed)}
    started = time.perf_counter()
    cl_limit, val_limit = spec.get("cl_limit"), spec.get("val_limit")
    for arm in ("twin", "didicm"):
        config = config_from_dict(_cell_config(spec, arm, resolution, ratio, seed))
        log(f"[{_cell_name(resolution, ratio, seed)}] training {arm} ({config.model.name}, {config.optim.steps} steps)")
        result = train(config, progress=progress, log=lambda *_: None)
        model, diffusion = result.model, result.diffusion
        common = dict(root=config.data.root, image_size=config.data.image_size, degradation=config.data.degradation,
                      val_size=config.data.val_size, seed=config.data.split_seed)
        val_set = create_dataset(config.data.dataset, "val", **common)
        test_set = create_dataset(config.data.dataset, "test", **common)
        eval_started = time.perf_counter()
        if diffusion is None:
            specs = [parse_sampler("classifier")]
            val = _evaluate_split(model, None, val_set, specs, seed, limit=val_limit)
            test = _evaluate_split(model, None, test_set, specs, seed)
            best = "classifier"
        else:
            specs = [parse_sampler(s) for s in spec["samplers"]]
            cheap = [s for s in specs if s.kind != "cl" or cl_limit is None]
            costly = [s for s in specs if s not in cheap]
            val = _evaluate_split(model, diffusion, val_set, cheap, seed, limit=val_limit)
            test = _evaluate_split(model, diffusion, test_set, cheap, seed)
            if costly:  # CL costs S*N network calls per image: evaluated on the first cl_limit test images only
                test.update(_evaluate_split(model, diffusion, test_set, costly, seed, limit=cl_limit))
            # the sampler is chosen on validation top-1 (never on test), among those run on the full split
            best = max((s.name for s in cheap), key=lambda name: val[name]["top1"])
        eval_seconds = time.perf_counter() - eval_started
        probs, labels = _probs(model, diffusion, test_set, parse_sampler(best), seed, next(model.parameters()).device)
        record[arm] = {**{k: test[best][k] for k in (*METRICS, "top5", "aurc", "entropy")},
                       "sampler": best, "evaluations_per_image": test[best]["evaluations_per_image"],
                       "train_seconds": result.metrics["train_seconds"], "eval_seconds": round(eval_seconds, 2),
                       "val_top1": val[best]["top1"], "model": config.model.name}
        record[f"{arm}_samplers"] = {"test": test, "val": val}
        record[f"{arm}_reliability"] = reliability_bins(probs, labels)
        if diffusion is not None and spec.get("trajectories", 0):
            count = int(spec["trajectories"])
            images, targets = next(iter(eval_batches(test_set, count, next(model.parameters()).device)))
            _, trajectory = predict(model, images, parse_sampler("cp:8"), diffusion,
                                    torch.Generator().manual_seed(seed), return_trajectory=True)
            record["trajectories"] = {"images": images.cpu(), "labels": targets.cpu(),
                                      "trajectory": trajectory.cpu(), "classes": list(test_set.classes)}
        record["device"] = device_name(model)
    record["wall_seconds"] = round(time.perf_counter() - started, 2)
    return record


def run_study(path: str | Path, progress: bool = True, log=print, only: list[str] | None = None, jobs: int = 1,
              aggregate_results: bool = True) -> dict | None:
    """Run every missing cell of the study at ``path`` (YAML), then aggregate. Resumable: finished cells are
    read back, not recomputed, unless their recipe changed.

    ``jobs`` > 1 runs the missing cells in that many worker processes (``didicm study --only ...``), which
    keeps a GPU busy with the study's small networks; each worker writes its cells as they finish.
    """
    spec = load_study(path)
    out = Path(spec["output"])
    cells_dir = out / "cells"
    grid = [(r, q, s) for s in spec["seeds"] for q in spec["data_ratios"] for r in spec["resolutions"]]
    if only:
        unknown = set(only) - {_cell_name(*cell) for cell in grid}
        if unknown:
            raise ConfigError(f"unknown cells {sorted(unknown)}; names look like res7_ratio0.02_seed0")
        grid = [cell for cell in grid if _cell_name(*cell) in only]
    missing = []
    for index, (resolution, ratio, seed) in enumerate(grid, 1):
        path_cell = cells_dir / f"{_cell_name(resolution, ratio, seed)}.json"
        if path_cell.exists():
            cached = json.loads(path_cell.read_text())
            if cached.get("recipe") == _recipe_hash(spec, resolution, ratio, seed):
                log(f"cell {index}/{len(grid)} {path_cell.stem}: cached")
                continue
            log(f"cell {index}/{len(grid)} {path_cell.stem}: recipe changed, recomputing")
        missing.append((resolution, ratio, seed))
    if jobs > 1 and len(missing) > 1:
        _run_workers(path, [_cell_name(*cell) for cell in missing], jobs, log)
    else:
        for index, (resolution, ratio, seed) in enumerate(missing, 1):
            path_cell = cells_dir / f"{_cell_name(resolution, ratio, seed)}.json"
            log(f"cell {path_cell.stem} ({index}/{len(missing)} to run): running")
            record = run_cell(spec, resolution, ratio, seed, progress, log)
            write_json(path_cell, record)
            log(f"cell {path_cell.stem}: twin {record['twin']['top1']:.2f}%, DiDiCM {record['didicm']['top1']:.2f}% "
                f"({record['didicm']['sampler']}), {record['wall_seconds']:.0f} s")
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
        raise DidicmError(f"study workers {failed} failed (their finished cells are kept; re-run to continue)")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(spec: dict, command: str) -> dict:
    """Read every finished cell, write study.json, the figures and report.md; return the study record."""
    out = Path(spec["output"])
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    if not cells:
        raise ConfigError(f"no finished cells under {out / 'cells'}; run the study first")
    light = [{k: v for k, v in c.items() if k not in ("trajectories",) and not k.endswith("_reliability")}
             for c in cells]
    study = {"dataset": spec["dataset"], "command": command, "commit": _commit(), "config": spec["_path"],
             "samplers": spec["samplers"], "cells": light}
    write_json(out / "study.json", study)
    figures = _figures(spec, cells, out)
    (out / "report.md").write_text(_report(spec, cells, command, figures))
    return study


def _groups(cells: list[dict]) -> dict[tuple[int, float], list[dict]]:
    groups: dict[tuple[int, float], list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["resolution"], cell["data_ratio"]), []).append(cell)
    return groups


def _figures(spec: dict, cells: list[dict], out: Path) -> list[str]:
    groups = _groups(cells)
    figures = []
    native, full = spec["native_resolution"], max(spec["data_ratios"])
    axes = {}
    by_res = [(r, groups[(r, full)]) for r in sorted(spec["resolutions"], reverse=True) if (r, full) in groups]
    by_ratio = [(q, groups[(native, q)]) for q in sorted(spec["data_ratios"], reverse=True) if (native, q) in groups]
    for axis, series, unit in ((f"resolution (data ratio {full:g})", by_res, " px"),
                               (f"data ratio ({native} px)", by_ratio, "")):
        if len(series) >= 2:
            gaps = [_mean_std([c["didicm"]["top1"] - c["twin"]["top1"] for c in group]) for _, group in series]
            axes[axis] = ([f"{level:g}{unit}" for level, _ in series], [g[0] for g in gaps], [g[1] for g in gaps])
    if axes:
        figures.append(str(plot_gap(axes, out / "gap.png", title=f"{spec['dataset']}: DiDiCM - twin")))
    hardest = min(groups, key=lambda key: (key[0], key[1]))
    cell = groups[hardest][0]
    cp = sorted((s for s in cell["didicm_samplers"]["test"] if s.startswith("cp:") and s.count(":") == 1),
                key=lambda s: int(s.split(":")[1]))
    if cp:
        curves = {"DiDiCM CP": ([int(s.split(":")[1]) for s in cp],
                                [cell["didicm_samplers"]["test"][s]["top1"] for s in cp])}
        figures.append(str(plot_accuracy_vs_steps(curves, {"twin": cell["twin"]["top1"]}, out / "steps.png",
                                                  title=f"{hardest[0]} px, ratio {hardest[1]:g}, seed {cell['seed']}")))
    figures.append(str(plot_reliability({"twin": cell["twin_reliability"], "DiDiCM": cell["didicm_reliability"]},
                                        out / "reliability_hardest.png",
                                        title=f"hardest cell: {hardest[0]} px, ratio {hardest[1]:g}")))
    if "trajectories" in cell:
        t = cell["trajectories"]
        figures.append(str(plot_trajectories_grid(torch.tensor(t["images"]), torch.tensor(t["trajectory"]).numpy(),
                                                  t["classes"], t["labels"], out / "trajectories.png")))
    return figures


def _cell_commits(cells: list[dict]) -> str:
    return ", ".join(sorted({c.get("commit", "unknown") for c in cells}))


def _devices(cells: list[dict]) -> str:
    return "run on " + ", ".join(sorted({c.get("device", "unknown device") for c in cells}))


def _wall(cells: list[dict]) -> str:
    walls = [c["wall_seconds"] for c in cells]
    return f"{min(walls):.0f}-{max(walls):.0f} s, {sum(walls) / 60:.1f} min summed over cells, which may overlap"


def _fixed_sampler_table(groups: dict, sampler: str) -> str:
    """DiDiCM with a sampler fixed in advance (no selection on validation) against the twin ('' if not run)."""
    if any(sampler not in c["didicm_samplers"]["test"] for group in groups.values() for c in group):
        return ""
    rows = []
    for (resolution, ratio), group in sorted(groups.items(), key=lambda kv: (-kv[0][0], -kv[0][1])):
        fixed = [c["didicm_samplers"]["test"][sampler] for c in group]
        rows.append({"resolution": f"{resolution} px", "data ratio": ratio,
                     "twin top-1": statistics.fmean(c["twin"]["top1"] for c in group),
                     f"{sampler} top-1": statistics.fmean(f["top1"] for f in fixed),
                     "gap": "{:+.2f} ± {:.2f}".format(*_mean_std([f["top1"] - c["twin"]["top1"]
                                                                for f, c in zip(fixed, group, strict=True)])),
                     "twin NLL": statistics.fmean(c["twin"]["nll"] for c in group),
                     f"{sampler} NLL": statistics.fmean(f["nll"] for f in fixed),
                     "twin ECE": statistics.fmean(c["twin"]["ece"] for c in group),
                     f"{sampler} ECE": statistics.fmean(f["ece"] for f in fixed),
                     "twin Brier": statistics.fmean(c["twin"]["brier"] for c in group),
                     f"{sampler} Brier": statistics.fmean(f["brier"] for f in fixed)})
    return markdown_table(rows, title=f"DiDiCM with {sampler} fixed in advance (no sampler selection), mean over "
                                      "seeds")


def _peers_table(groups: dict, peers: dict) -> str:
    """The generative peers beside DiDiCM and the twin in the cells where they ran (means over seeds)."""
    rows = []
    for key in sorted({(p["resolution"], p["data_ratio"]) for p in peers.values()}, key=lambda k: (-k[0], -k[1])):
        runs = [p for p in peers.values() if (p["resolution"], p["data_ratio"]) == key]
        cells = groups.get(key, [])
        methods = [("twin (cross-entropy)", [c["twin_samplers"]["test"]["classifier"] for c in cells],
                    [c["twin"]["train_seconds"] for c in cells]),
                   ("DiDiCM, best sampler", [c["didicm_samplers"]["test"][c["didicm"]["sampler"]] for c in cells],
                    [c["didicm"]["train_seconds"] for c in cells]),
                   ("DiDiCM, cp:8", [c["didicm_samplers"]["test"]["cp:8"] for c in cells
                                     if "cp:8" in c["didicm_samplers"]["test"]],
                    [c["didicm"]["train_seconds"] for c in cells])]
        for name in sorted({m for p in runs for m in p if m.startswith("dc:")}) + ["probe"]:
            label = {"probe": "diffusion features + linear probe"}.get(name, f"Diffusion Classifier {name}")
            # a result a later fix invalidated stays in peers.json, marked, but leaves the table
            valid = [p[name] for p in runs if name in p and "superseded" not in p[name]]
            methods.append((label, valid, [p["train_seconds"] for p in runs]))
        for label, scores, seconds in methods:
            if not scores:
                continue
            rows.append({"cell": f"{key[0]} px, ratio {key[1]:g}", "method": label, "seeds": len(scores),
                         **{m: statistics.fmean(s[m] for s in scores) for m in METRICS},
                         "test images": int(statistics.fmean(s.get("count", 0) for s in scores)),
                         "network evals / image": statistics.fmean(s["evaluations_per_image"] for s in scores),
                         "images / s": statistics.fmean(s["images_per_second"] for s in scores),
                         "train s": statistics.fmean(seconds),
                         "eval s": statistics.fmean(s["seconds"] for s in scores)})
    table = markdown_table(rows, title="generative peers beside DiDiCM and the twin (test split)")
    commands = sorted({p["command"] for p in peers.values() if "command" in p})
    if not commands:
        return table
    first = {c: next(p for p in peers.values() if p.get("command") == c) for c in commands}
    return "\n".join([table, "", "Produced by:", ""] + [f"- `{c}` (commit {_short(first[c])})" for c in commands])


def _short(record: dict) -> str:
    return f"`{record.get('commit', 'unknown')[:12]}`, {record.get('device', 'unknown device')}"


def _report(spec: dict, cells: list[dict], command: str, figures: list[str]) -> str:
    groups = _groups(cells)
    rows, wins = [], 0
    for (resolution, ratio), group in sorted(groups.items(), key=lambda kv: (-kv[0][0], -kv[0][1])):
        gap = _mean_std([c["didicm"]["top1"] - c["twin"]["top1"] for c in group])
        nll = _mean_std([c["didicm"]["nll"] - c["twin"]["nll"] for c in group])
        ece = _mean_std([c["didicm"]["ece"] - c["twin"]["ece"] for c in group])
        win = gap[0] > 0
        wins += win
        rows.append({"resolution": f"{resolution} px", "data ratio": ratio, "seeds": len(group),
                     "twin top-1": statistics.fmean(c["twin"]["top1"] for c in group),
                     "DiDiCM top-1": statistics.fmean(c["didicm"]["top1"] for c in group),
                     "gap (points)": f"{gap[0]:+.2f} ± {gap[1]:.2f}" + (" **win**" if win else ""),
                     "NLL gap": f"{nll[0]:+.3f}", "ECE gap": f"{ece[0]:+.3f}",
                     "samplers": ", ".join(sorted({c["didicm"]["sampler"] for c in group}))})
    lines = [f"# DiDiCM vs its twin on {spec['dataset']}", "",
             f"Produced by `{command}` at commit `{_cell_commits(cells)}` from `{spec['_path']}` "
             f"({_devices(cells)}; wall time per cell {_wall(cells)}).", "",
             f"{len(cells)} finished cells; DiDiCM's mean top-1 is higher in {wins} of {len(groups)} "
             "(resolution, data ratio) settings. Gaps are DiDiCM minus twin, mean ± std over seeds; DiDiCM uses the "
             "sampler with the best validation top-1. Negative NLL/ECE gaps favour DiDiCM.", "",
             markdown_table(rows), "", _fixed_sampler_table(groups, "cp:8"), ""]
    peers_path = Path(spec["output"]) / "peers.json"
    if peers_path.exists():
        lines += [_peers_table(groups, json.loads(peers_path.read_text())), ""]
    lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    findings = Path(spec["output"]) / "findings.md"
    if findings.exists():  # the hand-written reading of these numbers and of the ablations
        lines += ["", findings.read_text().strip()]
    return "\n".join(lines) + "\n"


