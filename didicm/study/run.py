"""The grid: every cell, cheapest first, in one process or in worker processes, then the write-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError, DidicmError
from .cells import run_cell
from .spec import _cell_name, grid_cells, load_study
from .writeup import aggregate


def run_study(path: str | Path, progress: bool = True, log=print, only: list[str] | None = None, jobs: int = 1,
              aggregate_results: bool = True) -> dict | None:
    """Run every missing arm of every cell of the study at ``path`` (YAML), then aggregate. Resumable.

    ``jobs`` > 1 runs the cells in that many worker processes (``didicm study --only ...``), which keeps a GPU
    busy with the study's small networks; each worker writes its cells as they finish.
    """
    spec = load_study(path)
    grid = grid_cells(spec)
    if only:
        unknown = set(only) - {_cell_name(*cell) for cell in grid}
        if unknown:
            raise ConfigError(f"unknown cells {sorted(unknown)}; names look like res7_ratio0.02_seed0")
        grid = [cell for cell in grid if _cell_name(*cell) in only]
    if jobs > 1 and len(grid) > 1:
        _run_workers(path, [_cell_name(*cell) for cell in grid], jobs, log)
    else:
        for index, cell in enumerate(grid, 1):
            log(f"cell {index}/{len(grid)} {_cell_name(*cell)}")
            run_cell(spec, *cell, progress=progress, log=log)
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
    try:
        failed = [i for i, w in enumerate(workers) if w.wait() != 0]
    except BaseException:  # Ctrl-C or SIGTERM to this process alone: stop the workers too, so none trains unseen
        _stop(workers)
        raise
    if failed:
        raise DidicmError(f"study workers {failed} failed (their finished arms are kept; re-run to continue)")


def _stop(workers: list, grace: float = 60.0) -> None:
    """SIGTERM the workers still running (Ctrl-C in a terminal has already reached them: give those a moment to
    finish unwinding first), wait up to ``grace`` seconds for them to release their locks, then SIGKILL the rest."""
    import time

    deadline = time.monotonic() + 2.0
    while any(w.poll() is None for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    deadline = time.monotonic() + grace
    for worker in workers:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
