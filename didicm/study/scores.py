"""Every reported number of a prediction row, computed from its saved float16 arrays (so it can be recomputed from
the predictions file), and the uncertainty scores read off a CP trajectory."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..metrics import (
    NLL_FLOOR,
    _aurc_from,
    accuracy_at_coverage,
    apply_temperature,
    auroc,
    classification_metrics,
    fit_temperature,
)
from .spec import METRICS_VERSION, OOD_SETS


def _as_saved(probs: torch.Tensor) -> torch.Tensor:
    """Probabilities as the predictions file stores them (float16), back in float32 and renormalised: every metric
    is computed from exactly these values, so it can be recomputed from the file."""
    p = torch.as_tensor(np.asarray(probs, dtype=np.float16)).float()
    return p / p.sum(dim=1, keepdim=True)


def arm_metrics(val_probs, val_labels, test_probs, test_labels, ood: dict | None = None,
                scores: dict | None = None) -> dict:
    """Every reported number of one prediction row, from its saved arrays.

    Args:
        val_probs, test_probs: [N, K] float16 arrays (as saved); val_labels, test_labels: [N] ints.
        ood: {shift name: [M, K] float16 probabilities on that shifted set}.
        scores: {score name: {"test": [N], "<shift>": [M]}}: extra uncertainty scores (higher = less sure), e.g.
            DiDiCM's trajectory signals; each gets an AURC on test and an AUROC per shift.
    Returns:
        test metrics before (top1, nll, ece, brier, aurc, acc_at_90, top5, entropy) and after temperature
        scaling (T fitted on validation: nll_ts, ece_ts, brier_ts), val_top1/val_nll, and OOD AUROCs.
        ``at_floor`` is the percentage of test images whose true class has probability below NLL_FLOOR (0 as
        saved: e.g. where CP's Euler clamp zeroed it, or below float16's resolution) and ``nll_at_floor`` the nats
        those images add to the mean NLL before scaling (27.63 each; after scaling by T a zero costs about
        27.63 / T plus the log-normaliser).
    """
    val, test = _as_saved(val_probs), _as_saved(test_probs)
    val_labels, test_labels = torch.as_tensor(val_labels).long(), torch.as_tensor(test_labels).long()
    out = classification_metrics(test, test_labels)
    out["acc_at_90"] = accuracy_at_coverage(test, test_labels, 0.9)
    temperature = fit_temperature(val, val_labels)
    scaled = classification_metrics(apply_temperature(test, temperature), test_labels)
    floored = test.gather(1, test_labels.reshape(-1, 1)).squeeze(1) < NLL_FLOOR
    out.update(T=temperature, nll_ts=scaled["nll"], ece_ts=scaled["ece"], brier_ts=scaled["brier"],
               count=int(test.shape[0]), val_count=int(val.shape[0]),
               at_floor=100.0 * float(floored.double().mean()),
               nll_at_floor=float(floored.double().mean()) * -math.log(NLL_FLOOR), metrics_version=METRICS_VERSION)
    val_metrics = classification_metrics(val, val_labels)
    out.update(val_top1=val_metrics["top1"], val_nll=val_metrics["nll"])
    in_conf = test.max(dim=1).values
    in_entropy = -torch.special.xlogy(test, test).sum(dim=1)
    for shift, probs in (ood or {}).items():
        shifted = _as_saved(probs)
        out[f"auroc_{shift}_maxprob"] = auroc(-in_conf, -shifted.max(dim=1).values)
        out[f"auroc_{shift}_entropy"] = auroc(in_entropy, -torch.special.xlogy(shifted, shifted).sum(dim=1))
    correct = (test.argmax(dim=1) == test_labels).double()
    for name, values in (scores or {}).items():
        score = torch.as_tensor(np.asarray(values["test"], dtype=np.float16)).double()
        out[f"aurc_{name}"] = _aurc_from(-score, correct)
        for shift in (ood or {}):
            if shift in values:
                shifted = torch.as_tensor(np.asarray(values[shift], dtype=np.float16)).double()
                out[f"auroc_{shift}_{name}"] = auroc(score, shifted)
    return out


def trajectory_scores(trajectory: torch.Tensor) -> dict[str, torch.Tensor]:
    """Uncertainty scores of a CP trajectory [N, S+1, K] (higher = less sure), which no one-pass peer has:

    - ``settle``: the fraction of the S steps that passed before the top class took its final value (0: it
      held from step 1 on; (S - 1) / S: it changed at the last step);
    - ``path_entropy``: the entropy of the class distribution averaged over steps 1..S.
    """
    steps = trajectory.shape[1] - 1
    top = trajectory[:, 1:].argmax(dim=2)  # [N, S]
    differs = top != top[:, -1:]
    last_change = torch.where(differs.any(dim=1), steps - differs.flip(1).int().argmax(dim=1),
                              torch.zeros_like(top[:, 0]))
    p = trajectory[:, 1:].clamp_min(0)
    entropy = -torch.special.xlogy(p, p).sum(dim=2).mean(dim=1)
    return {"settle": last_change.float() / steps, "path_entropy": entropy}


def _row_metrics(arrays: dict, row: str, signal_row: str | None) -> dict:
    ood = {s: arrays[f"{s}_{row}"] for s in OOD_SETS if f"{s}_{row}" in arrays}
    n_val = arrays[f"val_{row}"].shape[0]
    n_test = arrays[f"test_{row}"].shape[0]
    scores = {}
    if signal_row == row:
        for name in ("settle", "path_entropy"):
            scores[name] = {split: arrays[f"{split}_{row}_{name}"] for split in ("test", *OOD_SETS)
                            if f"{split}_{row}_{name}" in arrays}
    return arm_metrics(arrays[f"val_{row}"], arrays["val_labels"][:n_val], arrays[f"test_{row}"],
                       arrays["test_labels"][:n_test], ood, scores)


def _rescore(record: dict, arrays: dict, arm_name: str, signal_row: str | None) -> bool:
    """Recompute, from the saved predictions, the metrics of this arm's rows that an older arm_metrics wrote."""
    stale = [row for row, info in record["rows"].items() if info.get("arm") == arm_name
             and info.get("metrics_version") != METRICS_VERSION and f"test_{row}" in arrays]
    for row in stale:
        record["rows"][row].update(_row_metrics(arrays, row, signal_row))
    return bool(stale)
