"""Training throughput of the study's network with a runtime option off and on, in one process.

    python benchmarks/bench_train_step.py [--compare sync_free|channels_last] [--device cuda] [--steps 300]
        [--rounds 3] [--resolution 28] [--threads N]

Each round trains the study's narrow DiDiRN-18 (and its twin) on Fashion-MNIST (installed by
scripts/setup.sh's data step; digits when it is missing) for --steps steps with no validation, once with
``optim.sync_free: false`` (the loss read on the host every step) and once with ``true`` (a fused AdamW that
skips non-finite steps on the device; the loop reads the device every 10 steps), timed from step 10 to the
last by the training log's clock. On a GPU it also counts the synchronizing CUDA calls of each run
(``torch.cuda.set_sync_debug_mode('warn')``). ``--compare channels_last`` instead trains with NCHW and with NHWC
weights (``channels_last``), checked steps both. Reports the median images/s per mode and their ratio per round
(one process, alternating modes: these machines are noisy), and writes
benchmarks/results/bench_train_step_<device>[_channels_last].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from didicm.config import config_from_dict  # noqa: E402
from didicm.data import dataset_info  # noqa: E402
from didicm.training import train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _dataset() -> str:
    try:
        dataset_info("fashion-mnist")
        return "fashion-mnist"
    except Exception:  # not installed: the embedded set keeps the benchmark runnable
        return "digits"


def _run(model: str, dataset: str, resolution: int, steps: int, option: str, on: bool, device: str, out: Path
         ) -> dict:
    values = {
        "data": {"dataset": dataset, "val_size": 5000 if dataset == "fashion-mnist" else 0.1,
                 "degradation": None if resolution == 28 else f"resize={resolution}"},
        "model": {"name": model, "kwargs": {"width": 16, "stem": "imagenet"}},
        "optim": {"opt": "adamw", "lr": 2e-3, "weight_decay": 0.05, "batch_size": 128, "steps": steps,
                  "warmup_steps": 50, "sync_free": False},
        "eval": {"sampler": "cp", "steps": 1, "batch_size": 512},
        "checkpoint_every": 10 * steps, "device": device, "output": str(out),
    }
    if option == "sync_free":
        values["optim"]["sync_free"] = on
    else:
        values[option] = on
    config = config_from_dict(values)
    syncs = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.startswith("cuda"):
            torch.cuda.set_sync_debug_mode("warn")
        try:
            train(config, progress=False, log=lambda *_: None)
        finally:
            if device.startswith("cuda"):
                torch.cuda.set_sync_debug_mode("default")
        if device.startswith("cuda"):
            syncs = sum("synchronizing" in str(w.message) for w in caught)
    # steps 10..end from log.csv's clock: data loading, model building and the first steps' warm-up left out
    import csv
    with (out / "log.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle)]
    first, last = rows[0], rows[-1]
    seconds = float(last["seconds"]) - float(first["seconds"])
    images = (int(last["step"]) - int(first["step"])) * 128
    return {"images_per_second": round(images / seconds, 1), "timed_steps": images // 128,
            "timed_seconds": round(seconds, 3), "cuda_syncs": syncs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=("sync_free", "channels_last"), default="sync_free",
                        help="the option trained off and on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=28)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is steadier beside other jobs: 2 threads on a busy 2-core "
                             "machine varied 10x between identical runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = _dataset()
    names = {False: "checked", True: "sync-free"} if args.compare == "sync_free" else {False: "NCHW", True: "NHWC"}
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        _run("didirn18_twin", dataset, args.resolution, 20, args.compare, False, args.device,
             Path(tmp) / "warm-up")  # data cache
        for model in ("didirn18", "didirn18_twin"):
            runs = {False: [], True: []}
            for round_ in range(args.rounds):
                for on in (False, True) if round_ % 2 == 0 else (True, False):
                    out = Path(tmp) / f"{model}_{on}_{round_}"
                    runs[on].append(_run(model, dataset, args.resolution, args.steps, args.compare, on, args.device,
                                         out))
            raw[model] = {names[k]: v for k, v in runs.items()}
            ratios = [f["images_per_second"] / c["images_per_second"]
                      for c, f in zip(runs[False], runs[True], strict=True)]
            rows.append({"model": model,
                         f"{names[False]} img/s": statistics.median(r["images_per_second"] for r in runs[False]),
                         f"{names[True]} img/s": statistics.median(r["images_per_second"] for r in runs[True]),
                         "ratio (median of rounds)": round(statistics.median(ratios), 3),
                         "cuda syncs off / on": f"{runs[False][0]['cuda_syncs']} / {runs[True][0]['cuda_syncs']}"})
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"{args.compare} off/on; {dataset}, {args.resolution} px, batch 128, {args.steps} steps, {args.rounds} "
          f"rounds; {device_name}")
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.compare == "sync_free" else f"_{args.compare}"
    path = RESULTS / f"bench_train_step_{'cuda' if args.device.startswith('cuda') else 'cpu'}{suffix}.json"
    path.write_text(json.dumps({"compare": args.compare, "device": device_name, "dataset": dataset,
                                "resolution": args.resolution,
                                "steps": args.steps, "rounds": args.rounds, "torch": torch.__version__,
                                "python": platform.python_version(), "rows": rows, "runs": raw}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
