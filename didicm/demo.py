"""`didicm demo`: DiDiCM against its cross-entropy twin on the embedded digits set, in a few minutes on a CPU."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from .config import config_from_dict
from .data import create_dataset
from .evaluation import evaluate as evaluate_samplers
from .evaluation import parse_sampler
from .loader import eval_batches
from .report import format_table, write_json
from .training import device_name, train

__all__ = ["run_demo", "LEGEND"]

# what each row and column means, printed under the table
LEGEND = """\
How to read it (every row predicts the same test images; lower is better for nll, ece and brier):
  twin (cross-entropy)  the same network without the diffusion, trained with cross-entropy: the baseline
  DiDiCM cp:S           the CP sampler: S network passes move the class probabilities from uniform
                        (pure label noise) to the prediction; cp:8 is the model's default, the row to read.
                        cp:1 and cp:2 stop after 1 and 2 steps, to show what the steps buy (a near-
                        uniform guess can have a low ece without being useful: read ece beside top1)
  DiDiCM cl:8x10        the CL sampler: 10 simulated label chains of 8 steps; probabilities are the
                        frequencies of the chains' final labels (80 passes per image)
  top1   accuracy in %          nll    mean -log p(true class); ln 10 = 2.30 is a uniform guess
  ece    expected calibration error: |confidence - accuracy| averaged over 15 confidence bins (0: a 90%
         confidence is right 90% of the time)
  brier  squared error of the probability vector against the one-hot label (0 best, 2 worst)"""


def _verdict(rows: list[dict]) -> str:
    """One line comparing the row to read (cp:8) with the twin, from the numbers."""
    by_name = {row["method"]: row for row in rows}
    twin, didicm = by_name.get("twin (cross-entropy)"), by_name.get("DiDiCM cp:8")
    if twin is None or didicm is None:
        return ""
    gap = didicm["top1"] - twin["top1"]
    return (f"Read DiDiCM cp:8 against the twin: top-1 {didicm['top1']:.2f}% vs {twin['top1']:.2f}% "
            f"({gap:+.2f} points), NLL {didicm['nll']:.3f} vs {twin['nll']:.3f}, ECE {didicm['ece']:.4f} vs "
            f"{twin['ece']:.4f}. "
            "Digits is easy and plentiful; the study (README) compares them where data is scarce.")


def run_demo(steps: int, output: str, seed: int, progress: bool, base: dict) -> dict:
    """Train DiDiCM and its twin with one recipe, evaluate both on the test split, print and return the table."""
    started = time.perf_counter()
    rows, results = [], {}
    arms = [("twin (cross-entropy)", base["model"]["name"] + "_twin", ["classifier"]),
            ("DiDiCM", base["model"]["name"], ["cp:1", "cp:2", "cp:8", "cl:8x10"])]
    for label, model_name, samplers in arms:
        values = {**base, "model": {**base["model"], "name": model_name}, "seed": seed,
                  "output": str(Path(output) / model_name), "optim": {**base["optim"], "steps": steps}}
        config = config_from_dict(values)
        print(f"training {label}: {model_name} on {config.data.dataset}, {steps} steps ...", flush=True)
        result = train(config, resume=False, progress=progress, log=lambda *_: None)
        test_set = create_dataset(config.data.dataset, "test", val_size=config.data.val_size,
                                  seed=config.data.split_seed)
        specs = [parse_sampler(s) for s in samplers]
        scores = evaluate_samplers(result.model, eval_batches(test_set, 512), specs, result.diffusion, seed=seed,
                                   num_classes=test_set.num_classes, progress=len(test_set) if progress else None)
        for name, metrics in scores.items():
            rows.append(dict(method=f"{label} {name}" if name != "classifier" else label,
                             top1=metrics["top1"], nll=metrics["nll"], ece=metrics["ece"], brier=metrics["brier"],
                             evals_per_image=metrics["evaluations_per_image"],
                             train_s=round(result.metrics["train_seconds"], 1)))
        results[model_name] = scores
    seconds = time.perf_counter() - started
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {device_name(result.model)}, "
               f"{platform.python_implementation()} {platform.python_version()}")
    print(format_table(rows, title=f"digits test set ({len(test_set)} images, 10 classes, chance 10%)"))
    print(LEGEND)
    print(_verdict(rows))
    print(f"demo finished in {seconds:.0f} s on {machine}; runs and demo.json in {output}")
    write_json(Path(output) / "demo.json", {"rows": rows, "results": results, "steps": steps, "seed": seed,
                                            "seconds": round(seconds, 1), "machine": machine})
    return {"rows": rows, "results": results}
