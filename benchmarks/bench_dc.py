"""The Diffusion Classifier's prediction cost: images/s of ``dc:N`` on Fashion-MNIST test images at the study's
input sizes (the paper's resize protocol), with the UNet of configs/study_fashion_mnist_peers.yaml. The weights do
not change the cost, so the network is untrained; the error scale is left at 1.

    nice -n 10 python benchmarks/bench_dc.py --images 50 --sizes 28 7 --draws 100 --out results/bench_dc.json

Prints one line per size and the extrapolated cost of one study cell (validation + test + the two shifted sets).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from didicm import create_dataset
from didicm.evaluation import collect_probs, parse_sampler
from didicm.models import create
from didicm.runtime import device_name, resolve_device

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "study_fashion_mnist_peers.yaml"


def cell_images(spec: dict) -> int:
    """Images one study cell predicts for a row: the validation split, the test split and the shifted sets."""
    return int(spec["base"]["data"]["val_size"]) + 10_000 + 2 * int(spec["ood"]["count"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 7])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--sampler", default=None, help="default: dc:<draws>")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    spec = yaml.safe_load(CONFIG.read_text())
    arm = spec["arms"]["dc100"]
    device = resolve_device(args.device)
    sampler = parse_sampler(args.sampler or f"dc:{args.draws}")
    rows = []
    for size in args.sizes:
        degradation = f"resize={size}" if size < spec["native_resolution"] else None
        images, labels = create_dataset(spec["dataset"], "test", degradation=degradation).tensors()
        images, labels = images[:args.images].to(device), labels[:args.images].to(device)
        torch.manual_seed(0)
        model = create("unet", num_classes=10, in_chans=1, **arm["model"]["kwargs"]).to(device).eval()
        batches = [(images[i:i + args.batch], labels[i:i + args.batch]) for i in range(0, len(labels), args.batch)]
        collect_probs(model, batches[:1], parse_sampler("dc:1"))  # warm-up (allocator, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            collect_probs(model, batches, sampler)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        per_second = len(labels) / seconds
        cell = cell_images(spec)
        row = {"size": size, "sampler": sampler.name, "images": len(labels), "seconds": round(seconds, 2),
               "images_per_second": round(per_second, 3),
               "passes_per_second": round(per_second * 10 * sampler.steps, 1) if sampler.mode != "adaptive" else None,
               "cell_images": cell, "cell_hours": round(cell / per_second / 3600, 2),
               "device": device_name(model), "threads": torch.get_num_threads()}
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
