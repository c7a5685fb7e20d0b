"""didicm's training loader against timm's create_loader on the same JPEG folder, and start-up cost at ImageNet scale.

    python benchmarks/bench_loader.py [--images 3000] [--workers 2] [--batch-size 64] [--batches 30]

1. Throughput: a folder of ImageNet-size JPEGs is generated once (under --cache), then both loaders read it with
   the Strong Aug transforms (RandomResizedCrop 224 with random interpolation, flip, RandAugment
   rand-m7-mstd0.5-inc1), the same workers and batch size, and hand over normalized float batches (timm through
   its prefetcher, didicm through TrainStream). The two run alternately, ``--rounds`` times each, in one process;
   the median images/s of each is reported, and their ratio.
2. Start-up: a listing of ``--listing`` empty files (1000 classes, ImageNet names) is generated once; a fresh
   process per measurement builds the training set and its TrainStream and draws the first step, reporting the
   seconds and its resident memory, beside what the same listing costs as a Python list of (Path, label).

Prints a table and writes benchmarks/results/bench_loader.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
AUTO_AUGMENT = "rand-m7-mstd0.5-inc1"


def make_jpegs(root: Path, count: int, classes: int = 10) -> Path:
    """``count`` JPEGs of ImageNet-like sizes (shorter side 300-500 px, aspect 3:4 to 4:3) with smooth content
    plus noise (so their file sizes, about 100 kB, and decoding cost resemble photos)."""
    from PIL import Image

    done = root / f".done_{count}"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(count):
        short = int(rng.integers(300, 501))
        long = int(short * rng.uniform(1.0, 4 / 3))
        h, w = (short, long) if rng.random() < 0.5 else (long, short)
        coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img_{i}.JPEG", quality=90)
    done.touch()
    return root


def make_listing(root: Path, count: int, classes: int = 1000) -> Path:
    """``count`` empty files named like ImageNet's, in ``classes`` class folders (listing cost only)."""
    done = root / f".done_{count}"
    if done.exists():
        return root
    per_class = -(-count // classes)
    made = 0
    for c in range(classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(min(per_class, count - made)):
            os.close(os.open(folder / f"n{c:08d}_{i}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
        made += min(per_class, count - made)
    done.touch()
    return root


def _timm_loader(root: Path, args):
    import torch
    from timm.data import create_dataset, create_loader

    dataset = create_dataset("", root=str(root / "train"), is_training=True)
    return create_loader(dataset, input_size=(3, args.size, args.size), batch_size=args.batch_size, is_training=True,
                         use_prefetcher=True, device=torch.device("cpu"), num_workers=args.workers,
                         auto_augment=AUTO_AUGMENT, interpolation="random", persistent_workers=False)


def _didicm_batches(root: Path, args, start: int):
    from didicm.data import create_dataset
    from didicm.loader import TrainStream

    dataset = create_dataset(f"folder:{root}", "train", image_size=args.size, augment=True, val_size=0,
                             transform=dict(auto_augment=AUTO_AUGMENT, train_interpolation="random"))
    stream = TrainStream(dataset, args.batch_size, seed=start, num_workers=args.workers)
    return stream.batches(0, args.batches + 1)


def _time(batches, count: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the next ``count`` batches)."""
    started = time.perf_counter()
    iterator = iter(batches)
    next(iterator)
    first = time.perf_counter() - started
    started, images = time.perf_counter(), 0
    for _ in range(count):
        images += next(iterator)[0].shape[0]
    return first, images / (time.perf_counter() - started)


def throughput(args) -> dict:
    root = make_jpegs(Path(args.cache) / "jpeg", args.images)
    runs = {"timm": [], "didicm": []}
    firsts = {"timm": [], "didicm": []}
    for round_index in range(args.rounds):
        for name in ("timm", "didicm") if round_index % 2 == 0 else ("didicm", "timm"):
            batches = _timm_loader(root, args) if name == "timm" else _didicm_batches(root, args, round_index)
            first, rate = _time(batches, args.batches)
            del batches
            runs[name].append(rate)
            firsts[name].append(first)
            print(f"  round {round_index}: {name:6s} {rate:7.1f} images/s (first batch {first:.2f} s)", flush=True)
    median = {name: statistics.median(rates) for name, rates in runs.items()}
    return dict(images=args.images, workers=args.workers, batch_size=args.batch_size, batches=args.batches,
                image_size=args.size, auto_augment=AUTO_AUGMENT, rounds=args.rounds, images_per_second=runs,
                first_batch_seconds=firsts, median_images_per_second=median,
                ratio_didicm_to_timm=median["didicm"] / median["timm"])


def _startup_child(root: str, mode: str) -> None:
    """Runs in a fresh process: prints JSON with seconds and resident memory for one way of listing."""
    import resource

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    import timm.data  # noqa: F401
    import torch  # noqa: F401  (imported before measuring: every rank has it loaded anyway)

    from didicm.data import create_dataset
    from didicm.loader import TrainStream

    before = rss_mb()
    started = time.perf_counter()
    if mode == "didicm":
        dataset = create_dataset(f"folder:{root}", "train", image_size=224, augment=True, val_size=0,
                                 transform=dict(auto_augment=AUTO_AUGMENT, train_interpolation="random"))
        stream = TrainStream(dataset, 256, seed=0, rank=0, world=8, repeats=3)
        stream.indices(0)
        count, list_bytes = len(dataset), dataset.samples.nbytes
    else:  # the former listing: a Python list of (Path, label), as torchvision's ImageFolder and timm keep it
        samples = [(path, c) for c, folder in enumerate(sorted((Path(root) / "train").iterdir()))
                   for path in sorted(folder.iterdir())]
        count, list_bytes = len(samples), None
    seconds = time.perf_counter() - started
    print(json.dumps(dict(mode=mode, files=count, seconds=seconds, rss_mb=rss_mb(), rss_growth_mb=rss_mb() - before,
                          max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          list_bytes=list_bytes)))


def startup(args) -> dict:
    started = time.perf_counter()
    root = make_listing(Path(args.cache) / f"listing_{args.listing}", args.listing)
    made = time.perf_counter() - started
    out = {"listing_files": args.listing, "generate_seconds": round(made, 1)}
    for mode in ("didicm", "python_list"):
        result = subprocess.run([sys.executable, __file__, "--startup-child", str(root), mode], check=True,
                                capture_output=True, text=True)
        out[mode] = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"  {mode}: {out[mode]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per run (after the first)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--listing", type=int, default=1_281_167, help="files in the start-up listing (ImageNet's)")
    parser.add_argument("--cache", default="/tmp/didicm_bench_loader")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--startup-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup_child:
        _startup_child(*args.startup_child)
        return
    results = dict(cpu_count=os.cpu_count())
    path = RESULTS / "bench_loader.json"
    if path.exists():  # keep the part not re-measured
        results.update({k: v for k, v in json.loads(path.read_text()).items() if k in ("throughput", "startup")})
    if not args.skip_throughput:
        print("throughput (images/s, same folder, transforms, workers and batch size):", flush=True)
        results["throughput"] = throughput(args)
    if not args.skip_startup:
        print(f"start-up with a listing of {args.listing} files (fresh process each):", flush=True)
        results["startup"] = startup(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")

    t = results.get("throughput")
    if t:
        print(f"\n| loader | images/s (median of {t['rounds']}) |\n|---|---|")
        for name, rate in t["median_images_per_second"].items():
            print(f"| {name} | {rate:.1f} |")
        print(f"| ratio didicm / timm | {t['ratio_didicm_to_timm']:.3f} |")
    s = results.get("startup")
    if s:
        print(f"\n| listing of {s['listing_files']} files | seconds | resident MB (growth) | list bytes |\n"
              "|---|---|---|---|")
        for mode in ("didicm", "python_list"):
            r = s[mode]
            print(f"| {mode} | {r['seconds']:.2f} | {r['rss_mb']:.0f} ({r['rss_growth_mb']:+.0f}) | "
                  f"{r['list_bytes'] or '-'} |")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
