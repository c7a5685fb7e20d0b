"""Closed forms vs explicit matrices: time per CP update and per soft-label noising.

For K in {10, 100, 1000} and B = 256, times (in the same run, on the same threads)
- the CP update p <- clamp((I + dt dsigma R) p), renormalized: our O(BK) ``reverse_rate_times`` against the
  official construction of the B x K x K reverse-rate matrix R followed by a bmm (float32, as that code runs);
- soft-label noising p_t = exp(sigma Q) p0: our O(BK) ``UniformDiffusion.noise_probs`` against the official
  route (eigendecomposition of Q once, then V diag(exp(sigma lambda)) V^T per example in float64 and a bmm).

Usage: python benchmarks/bench_core.py [--classes 10 100 1000] [--batch 256] [--threads N] [--output PATH]
Prints a table and writes JSON (machine, torch version, threads, medians, ratios, agreement of the outputs).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _harness, also when loaded by path (tests)
from _harness import machine_info, median_seconds, write_results  # noqa: E402

import didicm  # noqa: E402
from didicm.diffusion import reverse_rate_times  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "bench_core.json"
# Goals from issue 2 at K = 1000, B = 256: how many times faster the closed form must be.
GOALS = {"cp_update": 500.0, "noising": 100.0}


# ---- the two forms of each operation -----------------------------------------------------------------
def closed_cp_update(probs: torch.Tensor, log_score: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Our CP step as CPSampler.run takes it: float64 state [B, K], O(K) rate product, clamp, renormalize."""
    probs = probs + step.reshape(-1, 1) * reverse_rate_times(probs, log_score)
    probs = probs.clamp(0.0, 1.0)
    return probs / probs.sum(dim=1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)


def matrix_cp_update(probs: torch.Tensor, log_score: torch.Tensor, step: torch.Tensor,
                     rate_matrix: torch.Tensor) -> torch.Tensor:
    """The official CP step: a = exp(s) normalized, R_ij = (a_i / a_j) Q_ij with columns summing to zero,
    then (I + step R) p by bmm, clamp and renormalize. Materializes three [B, K, K] tensors."""
    num_classes = probs.shape[1]
    a = log_score.exp()
    a = a / a.sum(dim=1, keepdim=True)
    rates = (a.unsqueeze(2) * (1.0 / a).unsqueeze(1)) * rate_matrix.unsqueeze(0)
    rates = rates - torch.diag_embed(rates.sum(dim=1))
    rates = rates * step.reshape(-1, 1, 1) + torch.eye(num_classes, dtype=probs.dtype)
    probs = torch.bmm(rates, probs.unsqueeze(2)).squeeze(2).clamp(0.0, 1.0)
    return probs / probs.sum(dim=1, keepdim=True)


def matrix_noising(p0: torch.Tensor, sigma: torch.Tensor, eigenvalues: torch.Tensor,
                   eigenvectors: torch.Tensor) -> torch.Tensor:
    """The official soft-label noising: per example V diag(exp(sigma lambda)) V^T in float64, then a bmm."""
    batch = p0.shape[0]
    vectors = eigenvectors.repeat(batch, 1, 1)
    diagonals = torch.diag_embed(torch.exp(eigenvalues.unsqueeze(0) * sigma.double().unsqueeze(1)))
    transition = torch.bmm(vectors, torch.bmm(diagonals, vectors.transpose(1, 2))).to(p0.dtype)
    return torch.bmm(transition, p0.unsqueeze(2))[:, :, 0]


# ---- timing -------------------------------------------------------------------------------------------
def matrix_repeats(num_classes: int) -> tuple[int, int]:
    """(repeats, warmup) for the matrix forms, which take seconds at K = 1000."""
    if num_classes >= 1000:
        return 3, 1
    if num_classes >= 100:
        return 10, 2
    return 30, 3


def bench_one(num_classes: int, batch: int, closed_repeats: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rate_matrix32 = (torch.ones(num_classes, num_classes) - num_classes * torch.eye(num_classes)) / num_classes
    # A state part-way through sampling, scores in a plausible range, and the step of the first CP step.
    probs = torch.softmax(3 * torch.randn(batch, num_classes, generator=gen, dtype=torch.float64), dim=1)
    log_score = 4 * torch.randn(batch, num_classes, generator=gen)
    log_score[:, 0] = 0.0
    schedule = didicm.LogLinearSchedule()
    t = torch.rand(batch, generator=gen, dtype=torch.float64) * 0.5 + 0.25
    sigma, dsigma = schedule(t)
    step = dsigma / 8  # dt = 1/8: the default S = 8

    closed_cp, closed_cp_samples = median_seconds(lambda: closed_cp_update(probs, log_score, step),
                                                  closed_repeats, warmup=5)
    repeats, warmup = matrix_repeats(num_classes)
    matrix_cp, matrix_cp_samples = median_seconds(
        lambda: matrix_cp_update(probs.float(), log_score, step.float(), rate_matrix32), repeats, warmup)
    cp_gap = (closed_cp_update(probs, log_score, step)
              - matrix_cp_update(probs.float(), log_score, step.float(), rate_matrix32).double()).abs().max().item()

    diffusion = didicm.UniformDiffusion(num_classes, schedule)
    p0 = torch.softmax(3 * torch.randn(batch, num_classes, generator=gen), dim=1)  # float32, like mixup targets
    sigma32 = sigma.float()
    eigenvalues, eigenvectors = torch.linalg.eigh(rate_matrix32.double())  # once, outside the timed region
    closed_noise, closed_noise_samples = median_seconds(lambda: diffusion.noise_probs(p0, sigma32),
                                                        closed_repeats, warmup=5)
    # At K = 1000 one call allocates ~8 GB afresh and runs for most of a minute: a warm-up would change nothing.
    noise_repeats, noise_warmup = (2, 0) if num_classes >= 1000 else (repeats, warmup)
    matrix_noise, matrix_noise_samples = median_seconds(
        lambda: matrix_noising(p0, sigma32, eigenvalues, eigenvectors), noise_repeats, noise_warmup)
    noise_gap = (diffusion.noise_probs(p0, sigma32).double()
                 - matrix_noising(p0, sigma32, eigenvalues, eigenvectors).double()).abs().max().item()
    return {
        "num_classes": num_classes, "batch": batch,
        "cp_update": {"closed_s": closed_cp, "matrix_s": matrix_cp, "speedup": matrix_cp / closed_cp,
                      "closed_samples_s": closed_cp_samples, "matrix_samples_s": matrix_cp_samples,
                      "closed_dtype": "float64", "matrix_dtype": "float32", "max_abs_difference": cp_gap},
        "noising": {"closed_s": closed_noise, "matrix_s": matrix_noise, "speedup": matrix_noise / closed_noise,
                    "closed_samples_s": closed_noise_samples, "matrix_samples_s": matrix_noise_samples,
                    "closed_dtype": "float32", "matrix_dtype": "float64 transition, float32 product",
                    "max_abs_difference": noise_gap},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50, help="timed repeats of the closed forms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice). On a shared machine prefer a count "
                             "below the idle cores: a parallel op waits for its slowest thread, which costs ~8 ms "
                             "per op when another process holds a core")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    rows = [bench_one(k, args.batch, args.repeats, args.seed) for k in args.classes]
    goals = {}
    at_1000 = [r for r in rows if r["num_classes"] == 1000 and r["batch"] == 256]
    if at_1000:
        goals = {op: {"required_speedup": need, "speedup": at_1000[0][op]["speedup"],
                      "met": at_1000[0][op]["speedup"] >= need} for op, need in GOALS.items()}
    report = {"benchmark": "bench_core", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(didicm=didicm.__version__), "statistic": "median seconds per call",
              "results": rows, "goals": goals}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B = {args.batch}; median per call")
    print(f"{'K':>6} {'operation':<10} {'closed form':>13} {'matrix form':>13} {'speedup':>10} {'max |diff|':>11}")
    for row in rows:
        for op in ("cp_update", "noising"):
            r = row[op]
            print(f"{row['num_classes']:>6} {op:<10} {r['closed_s'] * 1e3:>10.3f} ms {r['matrix_s'] * 1e3:>10.1f} ms "
                  f"{r['speedup']:>9.0f}x {r['max_abs_difference']:>11.1e}")
    for op, goal in goals.items():
        print(f"goal at K=1000: {op} >= {goal['required_speedup']:.0f}x: {goal['speedup']:.0f}x, "
              f"{'met' if goal['met'] else 'NOT met'}")
    write_results(args.output, report)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
