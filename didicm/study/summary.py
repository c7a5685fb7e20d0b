"""Across seeds: each row's mean and std per setting, DiDiCM's gaps with their verdicts, the controls, each row's
prediction cost in twin passes, and the default recommended from the accuracy-compute frontier."""

from __future__ import annotations

import statistics

import torch

from ..config import merge_dicts
from ..data.degradations import parse_degradation
from ..evaluation import parse_sampler
from ..report import markdown_table
from .spec import HEADLINE, REPORTED, SIGNALS, _dc_passes, _degradation


def _cell_cost(record: dict) -> dict:
    """What the cell took: the devices, training and wall seconds summed over its arms (an arm's wall time is its
    last session's, training time counts every session of a resumed arm), and evaluation images/s per row."""
    arms = record["arms"].values()
    return {"devices": sorted({a["device"] for a in arms if "device" in a}),
            "train_seconds": round(sum(a.get("train_seconds", 0.0) for a in arms), 2),
            "wall_seconds": round(sum(a.get("wall_seconds", 0.0) for a in arms), 2),
            "eval_images_per_second": {row: info["images_per_second"] for row, info in record["rows"].items()
                                       if "images_per_second" in info}}


# the metrics gaps are taken on: accuracy, calibration after scaling, selective prediction, and OOD detection by
# the max-probability score (AUROC against scikit-learn's digits and against noisy test images)
GAP_METRICS = ("top1", "nll_ts", "ece_ts", "brier_ts", "aurc", "auroc_digits_maxprob", "auroc_noise_maxprob")
HIGHER_IS_BETTER = frozenset({"top1", "auroc_digits_maxprob", "auroc_noise_maxprob"})


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
            if row != HEADLINE and (gap := _paired_gap(group, HEADLINE, row)):
                summary["gaps"][row] = gap
        # DiDiCM's secondary rows (other samplers, the best recipe, the frontier's options) against the twin and the
        # best control: whether a row the headline does not cover wins where the headline does not
        best = _best_control(summary)
        for row in rows:
            if row.startswith(HEADLINE) and row != HEADLINE:
                versus = {c: gap for c in dict.fromkeys(("twin", best)) if c and (gap := _paired_gap(group, row, c))}
                if versus:
                    summary.setdefault("secondary", {})[row] = versus
        summaries.append(summary)
    return summaries


def _paired_gap(group: list[dict], row: str, other: str) -> dict | None:
    """``row`` minus ``other`` over the seeds that have both: mean and std of the per-seed differences and the
    verdict, per metric (positive top-1, negative NLL/ECE/Brier/AURC: ``row`` better); None with no such seed."""
    paired = [c for c in group if row in c["rows"] and other in c["rows"]]
    if not paired:
        return None
    gap = {}
    for metric in GAP_METRICS:
        if not all(metric in c["rows"][row] and metric in c["rows"][other] for c in paired):
            continue  # e.g. OOD scores of cells from before they were measured
        mean, std = _mean_std([c["rows"][row][metric] - c["rows"][other][metric] for c in paired])
        better = mean if metric in HIGHER_IS_BETTER else -mean
        gap[metric] = {"mean": mean, "std": std, "n": len(paired), "verdict": _verdict(better, std, len(paired))}
    return gap


def _controls(spec: dict) -> list[str]:
    """The rows that are not DiDiCM (the classifiers a user would pick instead)."""
    rows = []
    for name, arm in spec["arms"].items():
        if name.startswith("didicm"):
            continue
        rows += [name] if "ensemble" in arm else list(arm["predict"])
    return rows


def _flops(fn, *args) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


def row_costs(spec: dict, resolution: int, rows: dict) -> dict[str, float]:
    """Each row's prediction cost per image in passes of the twin, by counted FLOPs at the cell's input size:
    the label-independent part (``encode``) once, the conditioned part (``score``) once per CP step (once per step
    and chain for CL); an ensemble of M costs M, S-view TTA costs S, the mean read-out one pass."""
    from ..models import create

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


def plus_minus(stat: dict, digits: int, signed: bool = False) -> str:
    """'mean ± std' at ``digits`` decimals, with more (up to three) where the spread would print as zero: a seed
    spread of 0.0035 is not 0.00."""
    std, most = abs(float(stat["std"])), digits + 3
    while std > 0 and round(std, digits) == 0 and digits < most:
        digits += 1
    return f"{stat['mean']:{'+' if signed else ''}.{digits}f} ± {std:.{digits}f}"


def gap_text(gap: dict, metric: str) -> str:
    """'+1.28 ± 0.29 (win)': a gap with its seed spread (2 decimals for top-1, 3 otherwise) and its verdict."""
    return f"{plus_minus(gap[metric], 2 if metric == 'top1' else 3, signed=True)} ({gap[metric]['verdict']})"


def _recommendation(summary: dict, costs: dict, title: str, exclude: frozenset = frozenset(),
                    not_run: list[str] | tuple = ()) -> list[str]:
    """Issue 15's default: the cheapest DiDiCM row that matches the headline (CP-8 of the full network) within seed
    noise, i.e. the headline beats it beyond seed noise in neither top-1 nor temperature-scaled NLL; stored in the
    summary (study.json) and written from it, with what every cheaper row saves and costs.
    ``exclude``: rows that are not options (ablation arms' rows); ``not_run``: cheaper options the config places in
    this setting that lack two seeds paired with the headline's, named so that a missing row is not read as a
    failed one."""
    if HEADLINE not in costs or HEADLINE not in summary["rows"]:
        return []
    head_cost = costs[HEADLINE]
    options = sorted((row for row in summary["gaps"] if row.startswith(HEADLINE) and row in costs
                      and row not in exclude and costs[row] < head_cost), key=lambda row: costs[row])
    table, match = [], None
    for row in options:
        gap = summary["gaps"][row]
        matches = gap["top1"]["n"] >= 2 and all(gap[m]["verdict"] != "win" for m in ("top1", "nll_ts"))
        if matches and match is None:
            match = row
        table.append({"row": row, "cost": round(costs[row], 2), "saves": f"{head_cost / costs[row]:.1f}x",
                      "CP-8 minus row, top-1": gap_text(gap, "top1"), "nll_ts": gap_text(gap, "nll_ts"),
                      "matches": matches})
    seeds = len(summary["seeds"])
    summary["recommendation"] = {"row": match, "cost": round(costs[match], 2) if match else None,
                                 "headline_cost": round(head_cost, 2), "seeds": seeds, "not_run": list(not_run)}
    if not table:
        return []
    pending = (f" Not run here with two seeds yet, so not considered: {', '.join(f'`{r}`' for r in not_run)}."
               if not_run else "")
    if match:
        gap = summary["gaps"][match]
        arms = {r: i["arm"] for cell_rows in summary.get("_rows", []) for r, i in cell_rows.items()}
        text = (f"Recommended in this setting: `{match}` (arm `{arms.get(match, match)}`), the cheapest DiDiCM row "
                f"that is not worse than the headline beyond seed noise ({round(costs[match], 2)} twin passes against "
                f"{round(head_cost, 2)}; headline minus it: top-1 {gap_text(gap, 'top1')}, NLL after scaling "
                f"{gap_text(gap, 'nll_ts')}; {seeds} seeds).{pending}")
    else:
        text = (f"No cheaper DiDiCM row {'run so far ' if not_run else ''}matches the headline within seed noise in "
                f"this setting.{pending} What each saves and loses:")
    return [text, "", markdown_table(table, title=f"Cheaper DiDiCM rows against the headline, {title} (cost in twin "
                                                  "passes; a row matches when the headline beats it beyond seed noise "
                                                  "in neither top-1 nor NLL after scaling)"), ""]


def _best_control(summary: dict) -> str | None:
    """The control row with the best mean test top-1 in this setting (chosen on test: an upper bound on what a
    user choosing on validation would get, so the comparison is against the strongest control)."""
    controls = [r for r in summary["gaps"] if not r.startswith("didicm")]
    return max(controls, key=lambda r: summary["rows"][r]["top1"]["mean"]) if controls else None
