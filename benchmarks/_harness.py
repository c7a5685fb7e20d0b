"""What every benchmark script shares: the machine a number was measured on, a median timer, and the JSON write.

Imported by the scripts beside it (``python benchmarks/<script>.py`` puts this folder on sys.path); not a script.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def machine_info(**extra) -> dict:
    """The machine, the software and the load: numbers from a shared machine mean little without them."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:  # no git: the numbers are still worth writing
        commit = ""
    info = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "commit": commit or "unknown",
            # other jobs distort small-op timings most: a parallel op waits for its slowest thread
            "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    return {**info, **extra}


def median_seconds(fn, repeats: int, warmup: int = 3) -> tuple[float, list[float]]:
    """The median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, and every sample."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), samples


def write_results(path: str | os.PathLike, result, indent: int = 2) -> Path:
    """Write ``result`` as JSON (folders made as needed); a later run replaces the file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=indent) + "\n")
    tmp.replace(path)  # atomic: an interrupted run leaves the previous file intact
    return path
