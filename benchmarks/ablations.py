"""Ablations of the DiDiCM recipe in one study cell, judged on the validation split (never the test set).

    python benchmarks/ablations.py --cell res7_ratio0.02 --seeds 0 1 --variants twin base sigma mean ...

Every variant is the study's base recipe plus a few overrides (see VARIANTS); each trains, evaluates on the
validation split with the study's samplers, and lands in one JSON file (resumable: finished variants are
skipped). Prints a table of top-1/NLL/ECE per variant with the best sampler and the wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from didicm.config import apply_overrides, config_from_dict  # noqa: E402
from didicm.data import create_dataset  # noqa: E402
from didicm.evaluation import evaluate, parse_sampler  # noqa: E402
from didicm.loader import eval_batches  # noqa: E402
from didicm.report import format_table, load_results, markdown_table, write_json  # noqa: E402
from didicm.study import load_study  # noqa: E402
from didicm.training import device_name, train  # noqa: E402

NARROW_TIMM = "{channels: [16, 32, 64, 128], stem_width: 16}"
# DiDiCM's CP label mode and time grid, judged on the same trained network (no extra training)
LABEL_MODES = ("cp:8:max", "cp:8:random", "cp:8:min:official")

# name -> (arm the overrides start from, overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "twin": ("twin", []),
    "twin_ls": ("twin", ["optim.label_smoothing=0.1"]),
    "twin_ema": ("twin", ["optim.ema_decay=0.995"]),
    "twin_noisy": ("twin", ["optim.noisy_labels=true"]),
    "base": ("didicm", []),
    "official": ("didicm", ["diffusion.t_sampling=uniform", "diffusion.t_min=1e-5", "optim.clip_grad=null"]),
    "clip1": ("didicm", ["optim.clip_grad=1.0"]),
    "antithetic": ("didicm", ["diffusion.t_sampling=antithetic"]),
    "sigma": ("didicm", ["diffusion.t_sampling=sigma"]),
    "tmin1e-3": ("didicm", ["diffusion.t_min=1e-3"]),
    "eps1e-2": ("didicm", ["diffusion.schedule_eps=1e-2"]),
    "geometric": ("didicm", ["diffusion.schedule=geometric", "diffusion.sigma_min=1e-3", "diffusion.sigma_max=8.0"]),
    "film": ("didicm", ["model.kwargs.conditioning=film"]),
    "mean": ("didicm", ["model.kwargs.parametrization=mean"]),
    "mean_nocond": ("didicm", ["model.kwargs.parametrization=mean", "model.kwargs.condition_inputs=false"]),
    "mean_hybrid": ("didicm", ["model.kwargs.parametrization=mean", "diffusion.ce_weight=1.0"]),
    "ema": ("didicm", ["optim.ema_decay=0.995"]),
    "mixup": ("didicm", ["optim.mixup=0.2", "optim.cutmix=1.0"]),
    "twin_mixup": ("twin", ["optim.mixup=0.2", "optim.cutmix=1.0"]),
    "long": ("didicm", ["optim.patience=*2"]),
    "twin_long": ("twin", ["optim.patience=*2"]),
    "long4": ("didicm", ["optim.patience=*4"]),
    "twin_long4": ("twin", ["optim.patience=*4"]),
    "aug": ("didicm", ["data.augment=true"]),
    "twin_aug": ("twin", ["data.augment=true"]),
    # the paper's baseline: a stock timm ResNet-18 (7x7 stride-2 stem + max-pool, stride 4) at the study's width
    "timm_resnet18": ("twin", ["model.name=resnet18", f"model.kwargs={NARROW_TIMM}"]),
    # DiDiCM as a backbone wrapper: the same stock ResNet-18 encodes once, a conditioned head runs per step
    "wrapper": ("didicm", ["model.name=didicm:resnet18", f"model.kwargs={NARROW_TIMM}"]),
}


def _variant_config(spec: dict, arm: str, overrides: list[str], resolution: int, ratio: float, seed: int,
                     out: Path) -> dict:
    from didicm.study.spec import _arm_config

    values = _arm_config(spec, arm, resolution, ratio, seed)
    resolved = []
    for item in overrides:
        key, value = item.split("=", 1)
        if value.startswith("*"):  # multiply the base value (e.g. the patience: how long past the best to go on)
            node = values
            for part in key.split(".")[:-1]:
                node = node[part]
            value = str(int(node[key.split(".")[-1]] * float(value[1:])))
        resolved.append(f"{key}={value}")
    values = apply_overrides(values, resolved)
    values["output"] = str(out)
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="configs/study_fashion_mnist.yaml")
    parser.add_argument("--cell", default="res7_ratio0.02", help="resR_ratioQ")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["twin", "base"], choices=sorted(VARIANTS))
    parser.add_argument("--out", default="results/fashion-mnist/ablations.json")
    parser.add_argument("--runs", default="runs/ablations")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="only merge these result files (e.g. scripts/gpu_study.sh's groups) into --out and "
                             "write its table; trains nothing")
    args = parser.parse_args()

    spec = load_study(args.study)
    resolution = int(args.cell.split("_")[0][3:])
    ratio = float(args.cell.split("_")[1][5:])
    out = Path(args.out)
    results = load_results(out, args.merge or [])
    for name in [] if args.merge else args.variants:
        arm, overrides = VARIANTS[name]
        for seed in args.seeds:
            key = f"{args.cell}/{name}/seed{seed}"
            if key in results:
                continue
            values = _variant_config(spec, arm, overrides, resolution, ratio, seed,
                                     Path(args.runs) / args.cell / name / f"seed{seed}")
            config = config_from_dict(values)
            started = time.perf_counter()
            result = train(config, progress=False, log=lambda *_: None)
            val_set = create_dataset(config.data.dataset, "val", degradation=config.data.degradation,
                                     val_size=config.data.val_size, seed=config.data.split_seed)
            if result.diffusion is None:  # the TTA views are the compute-matched control for cp:S
                specs = [parse_sampler("classifier")] + [parse_sampler(f"tta:{s}") for s in (2, 4, 8)]
            else:
                samplers = spec["arms"][arm]["predict"].values()
                specs = [parse_sampler(s) for s in (*samplers, *LABEL_MODES) if not s.startswith(("cl", "mean"))]
                if config.model.kwargs.get("parametrization") == "mean":
                    specs.append(parse_sampler("mean"))
            device = next(result.model.parameters()).device
            scores = evaluate(result.model, eval_batches(val_set, 512, device), specs,
                              result.diffusion, seed=seed, num_classes=val_set.num_classes,
                              augment=val_set.batch_augment())
            # the best sampler is chosen among the study's own samplers only (label modes are reported, not picked)
            best = "classifier" if result.diffusion is None else \
                max((s for s in scores if s not in LABEL_MODES), key=lambda s: scores[s]["top1"])
            results[key] = {"variant": name, "arm": arm, "overrides": overrides, "seed": seed, "best": best,
                            "val": {s: {k: m[k] for k in ("top1", "nll", "ece", "brier")} for s, m in scores.items()},
                            "train_seconds": result.metrics["train_seconds"],
                            "seconds": round(time.perf_counter() - started, 1), "steps": result.steps_done,
                            "device": device_name(result.model)}
            write_json(out, results)
            m = scores[best]
            print(f"{key}: {best} top1 {m['top1']:.2f} nll {m['nll']:.3f} ece {m['ece']:.3f} "
                  f"({results[key]['seconds']:.0f} s)", flush=True)
    cells = sorted({key.split("/")[0] for key in results})
    for cell in cells if args.merge else [args.cell]:
        print(format_table(_rows(results, cell), title=f"ablations, cell {cell} (validation split)"))
    text = ["# Recipe ablations (validation split; the test set is never used here)", "",
            f"Produced by `python benchmarks/ablations.py` from `{args.study}`; raw numbers in `{out.name}`. "
            "`best` is the sampler with the highest validation top-1 (a selection the twin does not get); "
            "the next three columns are fixed in advance at 8 network passes per image: `cp:8` for DiDiCM and, "
            "for the twin, `tta:8` (its softmax averaged over the image and 7 random crops/flips).", ""]
    for cell in cells:
        text += [markdown_table(_rows(results, cell), title=f"cell {cell}"), ""]
    out.with_suffix(".md").write_text("\n".join(text))
    return 0


def _rows(results: dict, cell: str) -> list[dict]:
    rows = []
    for key, r in sorted(results.items(), key=lambda kv: (kv[1]["arm"] != "twin", kv[0])):
        if key.startswith(cell + "/"):
            best = r["val"][r["best"]]
            fixed = r["val"].get("cp:8", r["val"].get("tta:8"))  # None for runs made before tta existed
            rows.append({"variant": r["variant"], "seed": r["seed"], "overrides": " ".join(r["overrides"]) or "-",
                         "best": r["best"], "top1": best["top1"], "nll": best["nll"], "ece": best["ece"],
                         "cp:8/tta:8 top1": fixed["top1"] if fixed else None,
                         "nll ": fixed["nll"] if fixed else None, "ece ": fixed["ece"] if fixed else None,
                         "train s": r["train_seconds"], "device": r.get("device", "cpu")})
    return rows


if __name__ == "__main__":
    sys.exit(main())
