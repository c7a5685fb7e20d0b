"""The write-up: study.json, the figures and report.md, whose prose is generated from the numbers."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..evaluation import parse_sampler
from ..metrics import NLL_FLOOR, apply_temperature, reliability_bins
from ..report import (
    markdown_table,
    plot_accuracy_vs_steps,
    plot_gap,
    plot_reliability,
    plot_trajectories_grid,
    write_json,
)
from .cells import _load_predictions
from .scores import _as_saved
from .spec import HEADLINE, SIGNALS, _cell_name, _in_cell, grid_cells
from .summary import (
    _best_control,
    _cell_cost,
    _controls,
    _recommendation,
    _summaries,
    gap_text,
    plus_minus,
    row_costs,
)


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


def _frontier(spec: dict, summaries: list[dict], out: Path) -> tuple[list[str], list[str]]:
    """Top-1 and temperature-scaled NLL against cost per image in the hardest and the easiest setting."""
    from ..report import plot_frontier

    lines, figures = [], []
    keys = [(min(spec["resolutions"]), min(spec["data_ratios"])), (max(spec["resolutions"]), max(spec["data_ratios"]))]
    for summary in summaries:
        key = (summary["resolution"], summary["data_ratio"])
        if key not in keys:
            continue
        rows = {}
        for cell_rows in summary.get("_rows", []):
            rows.update(cell_rows)
        # DiDiCM options the config places here, run or not: a row still missing is named by the recommendation
        options = {row: {"arm": name, "sampler": sampler} for name, arm in spec["arms"].items()
                   if name.startswith(HEADLINE) and arm.get("role") != "ablation" and _in_cell(spec, arm, *key)
                   for row, sampler in arm.get("predict", {}).items()}
        costs = row_costs(spec, key[0], {**options, **rows})
        table, points = [], {}
        for row, stats in sorted(summary["rows"].items(), key=lambda kv: costs.get(kv[0], 0)):
            if "nll_ts" not in stats or row not in costs:
                continue
            table.append({"row": row, "cost (twin passes, FLOPs)": round(costs[row], 2),
                          "top1": plus_minus(stats["top1"], 2), "nll_ts": plus_minus(stats["nll_ts"], 3),
                          "seeds": stats["seeds"]})
            points[row] = (costs[row], stats["top1"]["mean"], stats["top1"]["std"], stats["nll_ts"]["mean"])
        title = f"{key[0]} px, data ratio {key[1]:g}"
        lines += [markdown_table(table, title=f"Accuracy-compute frontier, {title} (test split, mean ± std over "
                                              "seeds; cost per image in passes of the twin, by counted FLOPs)"), ""]
        ablations = frozenset(row for arm in spec["arms"].values() if arm.get("role") == "ablation"
                              for row in arm.get("predict", {}))
        # the recommendation's own test: a row counts once it has two seeds paired with the headline's
        not_run = [row for row in options if HEADLINE in costs and costs[row] < costs[HEADLINE]
                   and summary["gaps"].get(row, {}).get("top1", {}).get("n", 0) < 2]
        lines += _recommendation(summary, costs, title, exclude=ablations, not_run=not_run)
        name = f"frontier_res{key[0]}_ratio{key[1]:g}.png"
        figures.append(str(plot_frontier(points, out / name, title=f"frontier: {title}")))
    return lines, figures


def _report(spec: dict, study: dict, figures: list[str], frontier: list[str]) -> str:
    summaries = study["summary"]
    cells = study["cells"]
    lines = [f"# The uncertainty study on {spec['dataset']}: DiDiCM against the classifiers a user would pick", "",
             f"Produced by `{study['command']}` from `{spec['_path']}` (protocol `{spec['protocol']}`: "
             + ("the network sees R x R images, as the official `--input-size R`" if spec["protocol"] == "resize"
                else "images area-downsampled to R x R and resized back") + ").",
             f"Commits: {', '.join(f'`{c[:12]}`' for c in study['commits'])}. Devices: {', '.join(study['devices'])}.",
             f"{len(cells)} of {len(grid_cells(spec))} cells "
             "have results; a cell lists the arms finished so far.", "",
             "Every arm trains by one rule: at most the epoch budget, validation after every interval, the weights of "
             f"the best validation {spec['base'].get('eval', {}).get('select', 'metric')} kept, learning rate decayed "
             "on plateaus and training stopped by patience. Every row's temperature is fitted on the validation split "
             "(on its log-probabilities) and calibration is compared after it. DiDiCM's headline row, fixed before any "
             f"result, is `didicm` ({_headline_label(spec)}); its other samplers are secondary rows. Gaps are "
             "DiDiCM minus the other row, "
             "mean ± std over seeds of the per-seed differences; a gap within two standard deviations (or with one "
             "seed) is a tie." + _subset_note(cells), "",
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
                    entry[metric] = plus_minus(stats[metric], digits)
            rows.append(entry)
        lines += [markdown_table(rows, title=f"{key} (test split, mean ± std over seeds)"), ""]
        if summary["gaps"]:
            gap_rows = [{"DiDiCM minus": row,
                         **{f"{label} gap": f"{plus_minus(g[m], 3, signed=True)} ({g[m]['verdict']})"
                            for m, label in (("top1", "top1"), ("nll_ts", "nll_ts"), ("ece_ts", "ece_ts"),
                                             ("auroc_digits_maxprob", "OOD digits AUROC"),
                                             ("auroc_noise_maxprob", "OOD noise AUROC")) if m in g}}
                        for row, g in summary["gaps"].items()]
            lines += [markdown_table(gap_rows, title=f"{key}: gaps (positive top-1 or AUROC gap, negative NLL/ECE "
                                                     "gap: DiDiCM better)"), ""]
    lines += _secondary(study, _headline_label(spec))
    lines += ["## Uncertainty beyond calibration", "",
              "Selective prediction (AURC: lower is better; it ranks images by max-probability unless named) and "
              "out-of-distribution detection (AUROC against scikit-learn's digits and against test images under heavy "
              "noise; 0.5 is chance). `settle` (how late the CP trajectory's top class settles) and `path_entropy` "
              "(the entropy averaged along the trajectory) are DiDiCM's own signals.", ""] + \
        _ood_counts(spec, study, _headline_label(spec)) + _signal_tables(summaries)
    lines += ["## The accuracy-compute frontier", ""] + frontier + [""] + _training_table(cells)
    lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(lines) + "\n"


def _subset_note(cells: list[dict]) -> str:
    """Rows scored on fewer test images than the rest of their cell (CL's ``cl_limit``): their gaps pair different
    image sets, which the reader must know."""
    limited = {}
    for cell in cells:
        full = max(info.get("count", 0) for info in cell["rows"].values())
        for row, info in cell["rows"].items():
            if 0 < info.get("count", full) < full:
                limited.setdefault(row, set()).add(info["count"])
    if not limited:
        return ""
    names = ", ".join(f"`{row}` ({'/'.join(f'{n:,}' for n in sorted(counts))} images)"
                      for row, counts in sorted(limited.items()))
    return (f" Some rows are scored on the first test images only: {names}; every other row on the whole test "
            "split, so gaps with these rows compare different image sets.")


def _headline_label(spec: dict) -> str:
    """'DiDiCM CP-8' for the headline row's sampler 'cp:8'."""
    sampler = spec["arms"][HEADLINE]["predict"][HEADLINE]
    return "DiDiCM " + sampler.split(":")[0].upper() + "-" + ":".join(sampler.split(":")[1:])


def _network_passes(spec: dict, row: str) -> int | None:
    """Network passes an image for a row, read from its sampler (an ensemble: its members); None when not passes of
    one network (the Diffusion Classifier's UNet)."""
    for name, arm in spec["arms"].items():
        if "ensemble" in arm and name == row:
            return int(arm["ensemble"]["members"])
        if row in arm.get("predict", {}):
            parsed = parse_sampler(arm["predict"][row])
            if parsed.kind == "dc":
                return None
            return parsed.steps * (parsed.chains if parsed.kind == "cl" else 1)
    return None


def _ood_counts(spec: dict, study: dict, headline: str) -> list[str]:
    """How often the headline's max-probability OOD detection beats each control's, over the settings (the
    per-setting gaps are in the gap tables), with each row's network passes: the compute-matched control is the one
    with as many as the headline."""
    tallies: dict[str, dict[str, Counter]] = {}
    for summary in study["summary"]:
        for row, gap in summary["gaps"].items():
            if row.startswith(HEADLINE):
                continue
            for metric in ("auroc_digits_maxprob", "auroc_noise_maxprob"):
                if metric in gap:
                    tallies.setdefault(row, {}).setdefault(metric, Counter())[gap[metric]["verdict"]] += 1
    if not tallies:
        return []
    own = _network_passes(spec, HEADLINE)
    lines = [f"OOD detection by the max-probability score, {headline} minus each control (AUROC; a setting counts "
             f"only beyond two seed standard deviations; network passes an image in brackets, {headline}: {own}):",
             ""]
    for row, by_metric in sorted(tallies.items(), key=lambda kv: (kv[0] != "twin", kv[0])):
        parts = []
        for metric, label in (("auroc_digits_maxprob", "digits"), ("auroc_noise_maxprob", "noisy images")):
            if metric in by_metric:
                parts.append(f"{label}: {_verdict_counts(by_metric[metric])}")
        passes = _network_passes(spec, row)
        lines.append(f"- against `{row}`" + (f" ({passes})" if passes is not None else "") + ": " + "; ".join(parts)
                     + ".")
    return lines + [""]


def _signal_tables(summaries: list[dict]) -> list[str]:
    out = []
    for summary in summaries:
        rows = []
        for row, stats in summary["rows"].items():
            entry = {"row": row, "aurc": plus_minus(stats["aurc"], 4)}
            for metric in SIGNALS:
                if metric in stats:
                    entry[metric.replace("auroc_", "")] = plus_minus(stats[metric], 3)
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
                f"{plus_minus(twin['top1'], 2, signed=True)} points ({twin['top1']['verdict']}), "
                f"NLL after temperature scaling {plus_minus(twin['nll_ts'], 3, signed=True)} "
                f"({twin['nll_ts']['verdict']})")
        if best and best != "twin":
            b = gaps[best]
            text += (f"; against the best control (`{best}`), top-1 {gap_text(b, 'top1')}, NLL after scaling "
                     f"{gap_text(b, 'nll_ts')}")
        head = summary["rows"].get(HEADLINE, {})
        if "at_floor" in head and head["at_floor"]["mean"] > 0:
            text += (f". {headline} gives the true class probability 0 (the NLL floor, {-math.log(NLL_FLOOR):.2f} "
                     "nats an image) on "
                     f"{plus_minus(head['at_floor'], 2)}% of test images, "
                     f"{plus_minus(head['nll_at_floor'], 3)} nats of its NLL before "
                     "scaling")
        exponential = exponential_rows.get((summary["resolution"], summary["data_ratio"]))
        if exponential in gaps:
            e = gaps[exponential]
            text += (f"; minus the same network with the exponential update (`{exponential}`): top-1 "
                     f"{gap_text(e, 'top1')}, NLL after scaling {gap_text(e, 'nll_ts')}")
        out.append(text + ".")
    if not out:
        out.append("- No cell has both DiDiCM and its twin yet.")
    return out


def _verdict_counts(tally: Counter) -> str:
    """'wins in 1, ties in 6, loses in 1' (with how many settings had one seed), from a Counter of verdicts."""
    return (f"wins in {tally['win']}, ties in {tally['tie']}, loses in {tally['loss']}"
            + (f" ({tally['one seed']} with one seed)" if tally["one seed"] else ""))


def _secondary(study: dict, headline: str) -> list[str]:
    """DiDiCM's other rows (samplers, the best recipe, the frontier's options) against the twin and the best control,
    with each row's verdicts counted over the settings: the headline was fixed in advance, these were not, so a win
    here is a lead to test, not a result."""
    summaries = [s for s in study["summary"] if s.get("secondary")]
    if not summaries:
        return []
    lines = ["## DiDiCM's other rows against the controls (generated from study.json)", "",
             f"The headline ({headline}) was fixed before any result; the rows below were not, and choosing the best "
             "of them after seeing the test split would flatter DiDiCM. Each gap is the row minus the control, mean ± "
             "std over seeds of the per-seed differences (positive top-1, negative NLL: the DiDiCM row better).", ""]
    counts: dict[str, dict[str, Counter]] = {}
    for summary in summaries:
        for row, versus in summary["secondary"].items():
            if "twin" not in versus:
                continue
            for metric in ("top1", "nll_ts"):
                counts.setdefault(row, {}).setdefault(metric, Counter())[versus["twin"][metric]["verdict"]] += 1
    for row, by_metric in sorted(counts.items()):
        parts = []
        for metric, label in (("top1", "top-1"), ("nll_ts", "NLL after scaling")):
            parts.append(f"{label} {_verdict_counts(by_metric[metric])}")
        settings = sum(by_metric["top1"].values())
        lines.append(f"- `{row}` minus twin, over {settings} setting{'s' if settings > 1 else ''}: "
                     + "; ".join(parts) + ".")
    lines.append("")
    for summary in summaries:
        table = []
        for row, versus in summary["secondary"].items():
            seeds = max(gap["top1"]["n"] for gap in versus.values())
            entry = {"row": row, "seeds": seeds}
            for control, gap in versus.items():
                name = "twin" if control == "twin" else f"best control `{control}`"
                fewer = f" [{gap['top1']['n']} seed]" if gap["top1"]["n"] < seeds else ""  # paired on fewer seeds
                entry[f"minus {name}, top-1"] = gap_text(gap, "top1") + fewer
                entry[f"minus {name}, nll_ts"] = gap_text(gap, "nll_ts") + fewer
            table.append(entry)
        lines += [markdown_table(table, title=f"{summary['resolution']} px, data ratio {summary['data_ratio']:g}: "
                                              "DiDiCM's other rows minus the controls"), ""]
    return lines


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
