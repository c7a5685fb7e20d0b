"""CP's two updates side by side: the paper's Euler step (clamped) and the exponential step, per CP step.

For K in {10, 100, 1000, 20000} and B = 256, on the same random state and scores, in one run:
- the median time of one update (rate product, step, clamp or not, renormalisation), and its ratio to Euler's;
- the share of classes each update sets to exactly 0, at the first step of the default run (t = 1, where the
  log-linear schedule's dsigma is largest) and at a middle one (t = 0.5).

Usage: python benchmarks/bench_cp_updates.py [--classes 10 100 1000 20000] [--batch 256] [--threads N]
    [--output PATH]
Prints a table and writes JSON (benchmarks/results/bench_cp_updates.json by default).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _harness, also when loaded by path (tests)
from _harness import machine_info, median_seconds, write_results  # noqa: E402

import didicm  # noqa: E402
from didicm.diffusion import exponential_reverse_step, reverse_rate_times  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "bench_cp_updates.json"


def euler(probs: torch.Tensor, log_score: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    probs = (probs + h * reverse_rate_times(probs, log_score)).clamp(0.0, 1.0)
    return probs / probs.sum(dim=1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)


def exponential(probs: torch.Tensor, log_score: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    probs = exponential_reverse_step(probs, log_score, h)
    return probs / probs.sum(dim=1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)


def bench_one(num_classes: int, batch: int, repeats: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    schedule = didicm.LogLinearSchedule()
    log_score = 4 * torch.randn(batch, num_classes, generator=gen)
    out = {"num_classes": num_classes, "batch": batch}
    for label, t, probs in (("first_step", 1.0, torch.full((batch, num_classes), 1.0 / num_classes,
                                                             dtype=torch.float64)),
                            ("middle_step", 0.5, torch.softmax(3 * torch.randn(batch, num_classes, generator=gen,
                                                                               dtype=torch.float64), dim=1))):
        _, dsigma = schedule(torch.full((batch,), t, dtype=torch.float64))
        h = (dsigma / 8).reshape(-1, 1)  # dt = 1/8: the default S = 8
        out[label] = {"t": t, "h": h[0].item(),
                      "zeroed_share_euler": (euler(probs, log_score, h) == 0).double().mean().item(),
                      "zeroed_share_exponential": (exponential(probs, log_score, h) == 0).double().mean().item()}
        if label == "middle_step":
            seconds = {name: median_seconds(lambda f=f, p=probs, h=h: f(p, log_score, h), repeats)[0]
                       for name, f in (("euler", euler), ("exponential", exponential))}
            out["seconds"] = seconds
            out["exponential_over_euler"] = seconds["exponential"] / seconds["euler"]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000, 20000])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    rows = [bench_one(k, args.batch, args.repeats, args.seed) for k in args.classes]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B = {args.batch}, float64 state; "
          "median per update")
    print(f"{'K':>6} {'euler':>10} {'exponential':>12} {'ratio':>6}  zeroed at t=1 (euler / exp)  at t=0.5")
    for r in rows:
        first, middle = r["first_step"], r["middle_step"]
        print(f"{r['num_classes']:>6} {r['seconds']['euler'] * 1e3:>7.3f} ms {r['seconds']['exponential'] * 1e3:>9.3f}"
              f" ms {r['exponential_over_euler']:>5.2f}x  {first['zeroed_share_euler']:>10.1%} / "
              f"{first['zeroed_share_exponential']:.1%}  {middle['zeroed_share_euler']:>8.1%} / "
              f"{middle['zeroed_share_exponential']:.1%}")
    report = {"benchmark": "bench_cp_updates", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(),
              "statistic": "median seconds per update", "results": rows}
    write_results(args.output, report)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
