"""The generative peers in study cells: a class-conditional UNet trained on the cell's data, then classified
with the Diffusion Classifier (full and adaptive) and with a linear probe on its features.

    python benchmarks/peers.py --cells res28_ratio1 res7_ratio0.02 --seeds 0 1

The UNet sees exactly the twin's data (the study's split, degradation, data ratio and seed) through the same
training loop (`didicm train --set model.name=unet`). The Diffusion Classifier's probability scale and the
probe's (block, t) are fit on the validation split; the test set is used once. Results land in
results/fashion-mnist/peers.json (resumable: finished entries are skipped); `didicm study` puts them in its
report beside DiDiCM and the twin.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from didicm import peers  # noqa: E402
from didicm.config import apply_overrides, config_from_dict  # noqa: E402
from didicm.data import create_dataset  # noqa: E402
from didicm.evaluation import evaluate, parse_sampler  # noqa: E402
from didicm.loader import eval_batches  # noqa: E402
from didicm.report import format_table, load_results, write_json  # noqa: E402
from didicm.study import _cell_config, _commit, load_study  # noqa: E402
from didicm.training import device_name, train  # noqa: E402

UNET = ["model.name=unet", "model.kwargs={channels: [32, 64, 64], layers_per_block: 1, label_dropout: 0.1}",
        "optim.lr=1e-3", "optim.weight_decay=0.0", "optim.mixup=0", "optim.cutmix=0", "optim.ema_decay=0.999"]
METRICS = ("top1", "nll", "ece", "brier", "evaluations_per_image", "images_per_second", "seconds", "count")


def _subset(dataset, limit: int | None, seed: int):
    """A fixed random subset (the same images for every method and seed) as (images, labels) tensors."""
    images, labels = dataset.tensors()
    if limit is None or limit >= len(labels):
        return images, labels
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return images[keep], labels[keep]


def _batches(images, labels, size, device):
    for start in range(0, len(labels), size):
        yield images[start:start + size].to(device), labels[start:start + size].to(device)


def run(spec: dict, cell: str, seed: int, args) -> dict:
    resolution, ratio = int(cell.split("_")[0][3:]), float(cell.split("_")[1][5:])
    values = apply_overrides(_cell_config(spec, "twin", resolution, ratio, seed),
                             UNET + [f"optim.steps={args.steps}", f"optim.warmup_steps={args.steps // 20}"])
    values["output"] = str(Path(args.runs) / cell / f"seed{seed}")
    config = config_from_dict(values)
    result = train(config, resume=True, progress=False, log=lambda *_: None)
    model = result.model.eval()
    device = next(model.parameters()).device
    common = dict(root=config.data.root, image_size=config.data.image_size, degradation=config.data.degradation,
                  val_size=config.data.val_size, seed=config.data.split_seed)
    train_set, val_set, test_set = (create_dataset(config.data.dataset, split, **common, **extra) for split, extra in
                                    (("train", {"data_ratio": ratio}), ("val", {}), ("test", {})))
    record = {"cell": cell, "resolution": resolution, "data_ratio": ratio, "seed": seed, "commit": _commit(),
              "device": device_name(model),
              "train_seconds": result.metrics["train_seconds"], "steps": config.optim.steps,
              "parameters": sum(p.numel() for p in model.parameters()), "dc_test_images": args.dc_limit}
    val_images, val_labels = _subset(val_set, args.val_limit, seed=0)
    test_images, test_labels = _subset(test_set, args.dc_limit, seed=0)
    for adaptive in (False, True):
        name = f"dc:{args.draws}" + (":adaptive" if adaptive else "")
        started = time.perf_counter()
        scale = peers.calibrate_error_scale(model, _batches(val_images, val_labels, args.batch_size, device),
                                            args.draws, seed=seed, adaptive=adaptive)
        scores = evaluate(model, _batches(test_images, test_labels, args.batch_size, device),
                          [parse_sampler(name)], seed=seed, num_classes=test_set.num_classes)[name]
        record[name] = {**{k: scores[k] for k in METRICS}, "error_scale": scale,
                        "wall_seconds": round(time.perf_counter() - started, 1)}
    started = time.perf_counter()
    probe, rows = peers.fit_feature_probe(
        model, lambda: eval_batches(train_set, args.batch_size, device, limit=args.probe_train_limit),
        lambda: eval_batches(val_set, args.batch_size, device, limit=args.val_limit), args.times, seed=seed)
    scores = evaluate(probe, eval_batches(test_set, args.batch_size, device), [parse_sampler("classifier")],
                      seed=seed, num_classes=test_set.num_classes)["classifier"]
    record["probe"] = {**{k: scores[k] for k in METRICS}, "block": probe.block, "t": probe.t, "candidates": rows,
                       "wall_seconds": round(time.perf_counter() - started, 1)}
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="configs/study_fashion_mnist.yaml")
    parser.add_argument("--cells", nargs="+", default=["res28_ratio1", "res7_ratio0.02"], help="resR_ratioQ")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=3000, help="UNet optimizer steps (batch as in the study)")
    parser.add_argument("--draws", type=int, default=20, help="Diffusion Classifier draws per class")
    parser.add_argument("--dc-limit", type=int, default=None,
                        help="Diffusion Classifier on this fixed random subset of the test set (default: all)")
    parser.add_argument("--val-limit", type=int, default=2000, help="validation images for the scale and probe")
    parser.add_argument("--probe-train-limit", type=int, default=None, help="training images for the probe")
    parser.add_argument("--times", type=int, nargs="+", default=[25, 100, 250], help="probe noise levels t")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", default="results/fashion-mnist/peers.json")
    parser.add_argument("--runs", default="runs/peers")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="only merge these result files (e.g. scripts/gpu_study.sh's parts) into --out; trains "
                             "nothing")
    args = parser.parse_args()

    spec = load_study(args.study)
    out = Path(args.out)
    results = load_results(out, args.merge or [])
    for cell in [] if args.merge else args.cells:
        for seed in args.seeds:
            key = f"{cell}/seed{seed}"
            # a record with a result a later fix superseded is measured again (the trained UNet is reused)
            if key in results and not any(isinstance(v, dict) and "superseded" in v for v in results[key].values()):
                continue
            previous = results.get(key)
            results[key] = run(spec, cell, seed, args)
            if previous is not None:  # a re-measurement reuses the trained UNet: keep its training time
                results[key]["train_seconds"] = previous["train_seconds"]
            results[key]["command"] = "python " + " ".join(sys.argv)
            write_json(out, results)
            r = results[key]
            print(f"{key}: dc {r[f'dc:{args.draws}']['top1']:.2f}, adaptive "
                  f"{r[f'dc:{args.draws}:adaptive']['top1']:.2f}, probe {r['probe']['top1']:.2f} "
                  f"({r['probe']['block']}, t={r['probe']['t']}); UNet trained in {r['train_seconds']:.0f} s",
                  flush=True)
    rows = [{"cell": key, **{f"{m} top1": r[m]["top1"] for m in r if m.startswith("dc:") or m == "probe"},
             "train s": r["train_seconds"], "device": r.get("device")} for key, r in sorted(results.items())]
    print(format_table(rows, title="generative peers (test split)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
