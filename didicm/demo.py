"""`didicm demo`: DiDiCM against its cross-entropy twin on the embedded digits set, in a few minutes on a CPU."""

from __future__ import annotations

import time
from pathlib import Path

from .config import config_from_dict
from .data import create_dataset
from .evaluation import evaluate as evaluate_samplers
from .evaluation import parse_sampler
from .loader import eval_batches
from .report import format_table, write_json
from .training import train

__all__ = ["run_demo"]


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
                                   num_classes=test_set.num_classes)
        for name, metrics in scores.items():
            rows.append(dict(method=f"{label} {name}" if name != "classifier" else label,
                             top1=metrics["top1"], nll=metrics["nll"], ece=metrics["ece"], brier=metrics["brier"],
                             evals_per_image=metrics["evaluations_per_image"],
                             train_s=round(result.metrics["train_seconds"], 1)))
        results[model_name] = scores
    print(format_table(rows, title=f"digits test set ({len(test_set)} images, 10 classes, chance 10%)"))
    print(f"demo finished in {time.perf_counter() - started:.0f} s; runs in {output}")
    write_json(Path(output) / "demo.json", {"rows": rows, "results": results})
    return {"rows": rows, "results": results}

