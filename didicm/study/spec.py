"""The study's configuration: its constants, the YAML loader and its checks, and what defines an arm of a cell
(its training config, its recipe hash, its run folder)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from pathlib import Path

import torch
import yaml

from ..config import merge_dicts
from ..errors import ConfigError
from ..evaluation import parse_sampler

HEADLINE = "didicm"  # the pre-registered DiDiCM row: CP-8 (the config's didicm arm), chosen before any result


REPORTED = ("top1", "nll", "ece", "brier", "nll_ts", "ece_ts", "brier_ts", "aurc", "acc_at_90", "at_floor",
            "nll_at_floor")


# a row's metrics carry the version of arm_metrics that computed them; older rows are rescored from their saved
# predictions when the study runs again (2: at_floor and nll_at_floor)
METRICS_VERSION = 2


# uncertainty scores: max-probability and entropy for every row, and the CP trajectory's for DiDiCM
SIGNALS = tuple(f"auroc_{shift}_{score}" for shift in ("digits", "noise")
                for score in ("maxprob", "entropy", "settle", "path_entropy")) + ("aurc_settle", "aurc_path_entropy")


ARM_KEYS = ("where", "predict", "ensemble", "trajectory", "describe", "role")

# role: ablation marks an arm that explains a result rather than offers an option (never the recommended default)
ROLES = ("option", "ablation")


# how fast, not what: merged into every arm's training config but not into its recipe, so finished arms stay cached
RUNTIME_KEYS = ("channels_last", "device")


WHERE = ("all", "hard", "extremes", "hardest")


OOD_SETS = ("digits", "noise")


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
        if arm.get("role", "option") not in ROLES:
            raise ConfigError(f"arm {name!r}: role must be one of {ROLES}, got {arm.get('role')!r}")
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
    _check_extra_seeds(spec)
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


def _check_extra_seeds(spec: dict) -> None:
    """``extra_seeds``: more seeds for some settings only, a list of {resolution, data_ratio, seeds}."""
    extra = spec.setdefault("extra_seeds", [])
    if not isinstance(extra, list):
        raise ConfigError(f"study extra_seeds must be a list of {{resolution, data_ratio, seeds}}, got {extra!r}")
    for entry in extra:
        if not isinstance(entry, dict) or set(entry) != {"resolution", "data_ratio", "seeds"}:
            raise ConfigError(f"each extra_seeds entry needs exactly resolution, data_ratio and seeds, got {entry!r}")
        ratio = [q for q in spec["data_ratios"] if isinstance(entry["data_ratio"], (int, float))
                 and math.isclose(float(entry["data_ratio"]), float(q))]
        if entry["resolution"] not in spec["resolutions"] or not ratio:
            raise ConfigError(f"extra_seeds entry {entry!r} names a setting outside the grid (resolutions "
                              f"{spec['resolutions']}, data ratios {spec['data_ratios']})")
        entry["data_ratio"] = ratio[0]  # the grid's own value, so its cells are the grid's
        seeds = entry["seeds"]
        if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
            raise ConfigError(f"extra_seeds entry {entry!r}: seeds must be a list of integers")
        if set(seeds) & set(spec["seeds"]):
            raise ConfigError(f"extra_seeds entry {entry!r} repeats seeds the whole grid already runs "
                              f"({spec['seeds']})")


def grid_cells(spec: dict) -> list[tuple[int, float, int]]:
    """Every (resolution, data ratio, seed) cell in the order the grid runs them."""
    cells = {(r, q, s) for s in spec["seeds"] for q in spec["data_ratios"] for r in spec["resolutions"]}
    for entry in spec["extra_seeds"]:  # checked by load_study: each names a setting of the grid
        cells |= {(entry["resolution"], entry["data_ratio"], s) for s in entry["seeds"]}
    # cheapest first (pixels x data), every seed of a setting together: verdicts need two seeds, and low
    # resolution with little data finishes in minutes, so results land early
    return sorted(cells, key=lambda c: (c[0] * c[0] * c[1], c[0], c[2]))


def _cell_name(resolution: int, ratio: float, seed: int) -> str:
    return f"res{resolution}_ratio{ratio:g}_seed{seed}"


def _in_cell(spec: dict, arm: dict, resolution: int, ratio: float) -> bool:
    where = arm.get("where", "all")
    if where == "all":
        return True
    easiest = (max(spec["resolutions"]), max(spec["data_ratios"]))
    if where == "hard":  # issue 12: resolution <= 14 px or data ratio <= 0.1, i.e. every cell but the easiest
        return (resolution, ratio) != easiest
    hardest = (min(spec["resolutions"]), min(spec["data_ratios"]))
    if where == "hardest":  # ablations that explain a result there, at the cheapest cell's cost
        return (resolution, ratio) == hardest
    return (resolution, ratio) in (easiest, hardest)


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


def _commit(ignore: str | Path | None = None) -> str:
    """The checkout's commit, ``-dirty`` if tracked files changed; DIDICM_COMMIT names it where there is no git.

    Changes under ``ignore`` (the study's own output folder, whose tracked results the grid rewrites as cells land)
    do not count: otherwise every arm trained after the first result was written would read ``-dirty``.
    """
    if os.environ.get("DIDICM_COMMIT"):
        return os.environ["DIDICM_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        top = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                                  check=True).stdout.strip())
        status = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=no"], capture_output=True,
                                text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    # -z: 'XY path' entries from the top level, unquoted, NUL-separated; a rename or copy is followed by its source,
    # and both sides count (code moved out of the repository's code into the output folder is a change)
    changed, entries = [], iter(status.split("\0"))
    for entry in entries:
        if len(entry) > 3:
            changed.append(entry[3:])
            if "R" in entry[:2] or "C" in entry[:2]:
                changed.append(next(entries, ""))
    skip = Path(ignore).resolve() if ignore is not None else None

    def counts(path: str) -> bool:  # the folder is resolved, not the file: a tracked symlink counts where it lies
        where = top / path
        return skip is None or not (where.parent.resolve() / where.name).is_relative_to(skip)

    return head + ("-dirty" if any(counts(path) for path in changed if path) else "")


def _arm_run_dir(spec: dict, name: str, resolution: int, ratio: float, seed: int, member: int = 0) -> Path:
    """The arm's training folder, named by a hash of its training config (not of its prediction rows)."""
    values = _arm_config(spec, name, resolution, ratio, seed, member)
    recipe = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]
    suffix = f"_m{member}" if member else ""
    return Path(spec.get("runs", "runs/study")) / _cell_name(resolution, ratio, seed) / f"{name}{suffix}-{recipe}"


def _dc_passes(parsed, num_classes: int = 10) -> float:
    from ..peers import evaluations_per_image

    return evaluations_per_image(num_classes, parsed.steps, parsed.mode == "adaptive")


def _device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
