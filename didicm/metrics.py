"""Classification metrics computed from predicted class probabilities.

Every function takes ``probs`` [N, K] float (rows on the simplex: softmax outputs, CP states, or CL label
histograms) and, where needed, ``labels`` [N] int. Nothing here takes logits: pass ``logits.softmax(-1)``.

Conventions, shared by all functions so that numbers from different code paths agree:

- **Ties.** A CL histogram from N = 10 chains often ties two classes. Top-k correctness of an example is the
  expected value under a uniformly random ordering of tied classes: with g classes strictly more probable than
  the true one and e classes (the true one included) exactly as probable, the credit is
  ``clip((k - g) / e, 0, 1)``. For continuous probabilities (softmax) ties do not happen and this is the usual
  0/1 top-k accuracy. ECE, AURC and the reliability bins use the same top-1 credit as "correct".
- **Units.** Top-k accuracy is in percent; NLL and entropy are in nats; ECE, Brier and AURC are fractions
  (ECE and AURC in [0, 1], Brier in [0, 2]).
- **Precision.** Inputs are converted to float64 (float32 on devices without it) before any sum.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError, InputError

__all__ = [
    "NLL_FLOOR", "ROW_SUM_TOLERANCE", "top_k_accuracy", "nll", "ece", "brier", "mean_entropy", "aurc",
    "optimal_aurc", "reliability_bins", "classification_metrics", "MetricAccumulator", "fit_temperature",
    "apply_temperature", "accuracy_at_coverage", "auroc",
]

# A CL histogram puts exactly 0 on classes no chain reached; -log 0 is infinite, so probabilities are clamped
# here first. A miss then costs -log(1e-12) = 27.63 nats: finite and comparable, but it dominates the mean,
# so report CL's NLL together with the number of chains. Softmax outputs almost never fall below this.
NLL_FLOOR = 1e-12
# Rows may drift from 1 by rounding (half-precision softmax); logits or raw counts are far outside this.
ROW_SUM_TOLERANCE = 1e-2


# ---- input checks ---------------------------------------------------------------------------------------------
def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _check_probs(probs) -> torch.Tensor:
    """Validates probs and returns it as a detached [N, K] tensor in the working precision."""
    if not isinstance(probs, torch.Tensor):
        try:
            probs = torch.as_tensor(probs)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(f"probs must be a [N, K] tensor or array of probabilities, got {type(probs).__name__}"
                             ) from err
    if probs.ndim != 2:
        raise InputError(f"probs must have shape (N, K), got {tuple(probs.shape)}; add a batch dimension for "
                         f"a single example")
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise InputError(f"probs must hold at least one example and one class, got shape {tuple(probs.shape)}")
    if not torch.is_floating_point(probs):
        raise InputError(f"probs must be floating point, got {probs.dtype}; divide label counts by their total")
    probs = probs.detach().to(_work_dtype(probs.device))
    if not torch.isfinite(probs).all():
        raise InputError("probs contains NaN or Inf; check the model outputs before computing metrics")
    if (probs < 0).any():
        raise InputError("probs contains negative values; these look like logits: pass logits.softmax(-1)")
    worst = (probs.sum(dim=1) - 1).abs().max().item()
    if worst > ROW_SUM_TOLERANCE:
        raise InputError(f"rows of probs must sum to 1, but one is off by {worst:.3g}; pass probabilities "
                         f"(softmax of logits, or label counts divided by the number of chains)")
    return probs


def _check_labels(labels, probs: torch.Tensor) -> torch.Tensor:
    """Validates labels against probs [N, K] and returns them as int64 [N] on probs' device."""
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(f"labels must be a [N] tensor or array of class indices, got {type(labels).__name__}"
                             ) from err
    if labels.dtype == torch.bool or torch.is_floating_point(labels) or torch.is_complex(labels):
        raise InputError(f"labels must be integer class indices, got dtype {labels.dtype}; "
                         f"for one-hot or soft targets pass their argmax")
    if labels.shape != (probs.shape[0],):
        raise InputError(f"labels must have shape ({probs.shape[0]},) to match probs {tuple(probs.shape)}, "
                         f"got {tuple(labels.shape)}")
    labels = labels.to(device=probs.device, dtype=torch.int64)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= probs.shape[1]:
        bad = low if low < 0 else high
        raise InputError(f"labels hold class index {bad}, outside [0, {probs.shape[1] - 1}] for K = "
                         f"{probs.shape[1]} classes; do the labels and the model use the same class list?")
    return labels


def _check_k(k: int, num_classes: int) -> int:
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= num_classes:
        raise ConfigError(f"k must be an integer in [1, {num_classes}] (the number of classes), got {k!r}")
    return int(k)


def _check_bins(bins: int) -> int:
    if isinstance(bins, bool) or int(bins) != bins or bins < 1:
        raise ConfigError(f"bins must be a positive integer, got {bins!r}")
    return int(bins)


# ---- per-example quantities (every metric is an aggregate of these) ---------------------------------------------
def _top_k_credit(probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """[N] float in [0, 1]: expected top-k correctness with ties broken uniformly at random."""
    p_true = probs.gather(1, labels.reshape(-1, 1))
    above = (probs > p_true).sum(dim=1).to(probs.dtype)
    tied = (probs == p_true).sum(dim=1).to(probs.dtype)  # >= 1: the true class ties with itself
    return ((k - above) / tied).clamp(0.0, 1.0)


def _per_example(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The [N] float64 CPU vectors every metric is computed from (checked inputs only)."""
    one_hot = torch.zeros_like(probs).scatter_(1, labels.reshape(-1, 1), 1.0)
    stats = {
        "correct1": _top_k_credit(probs, labels, 1),
        "nll": -probs.gather(1, labels.reshape(-1, 1)).squeeze(1).clamp_min(NLL_FLOOR).log(),
        "confidence": probs.max(dim=1).values,
        "entropy": -torch.special.xlogy(probs, probs).sum(dim=1),
        "brier": (probs - one_hot).square().sum(dim=1),
    }
    if probs.shape[1] >= 5:
        stats["correct5"] = _top_k_credit(probs, labels, 5)
    return {name: value.to("cpu", torch.float64) for name, value in stats.items()}


def _bin_statistics(confidence: torch.Tensor, correct: torch.Tensor, bins: int) -> dict:
    """Equal-width bins (lo, hi] on confidence; bin 0 also takes confidence 0. Returns counts and sums."""
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    # bucketize(right=False) gives i with edges[i-1] < c <= edges[i], so c = 1.0 lands in the last bin and a
    # confidence exactly on an inner edge belongs to the bin below it (Guo et al.'s (lo, hi] convention).
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    correct_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    return {"edges": edges, "count": count, "conf_sum": conf_sum, "correct_sum": correct_sum}


def _ece_from(confidence: torch.Tensor, correct: torch.Tensor, bins: int) -> float:
    stats = _bin_statistics(confidence, correct, bins)
    # sum_b (n_b / N) |acc_b - conf_b| = sum_b |correct_sum_b - conf_sum_b| / N; empty bins add 0.
    return float((stats["correct_sum"] - stats["conf_sum"]).abs().sum() / confidence.numel())


def _aurc_from(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    order = torch.sort(confidence, descending=True, stable=True).indices
    conf_sorted, errors = confidence[order], 1.0 - correct[order]
    # Examples with equal confidence cannot be ordered by the selector, so each gets its group's mean error:
    # the expected curve under a random order within ties, and a result that is independent of input order.
    _, group, group_size = torch.unique_consecutive(conf_sorted, return_inverse=True, return_counts=True)
    group_errors = torch.zeros(group_size.numel(), dtype=torch.float64).index_add_(0, group, errors)
    errors = (group_errors / group_size)[group]
    covered = torch.arange(1, errors.numel() + 1, dtype=torch.float64)
    return float((errors.cumsum(0) / covered).mean())


def _metrics_from(stats: dict[str, torch.Tensor], bins: int = 15) -> dict[str, float]:
    out = {"top1": 100.0 * float(stats["correct1"].mean())}
    if "correct5" in stats:
        out["top5"] = 100.0 * float(stats["correct5"].mean())
    out.update({
        "nll": float(stats["nll"].mean()),
        "ece": _ece_from(stats["confidence"], stats["correct1"], bins),
        "brier": float(stats["brier"].mean()),
        "entropy": float(stats["entropy"].mean()),
        "aurc": _aurc_from(stats["confidence"], stats["correct1"]),
    })
    return out


# ---- public metrics -----------------------------------------------------------------------------------------
def top_k_accuracy(probs: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Percentage of examples whose true class is among the k most probable (ties: see the module docstring).

    Args:
        probs: [N, K] float, class probabilities.
        labels: [N] int, true classes.
        k: how many top classes count as a hit, 1 <= k <= K.
    Returns:
        Accuracy in percent, in [0, 100].
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    return 100.0 * float(_top_k_credit(probs, labels, _check_k(k, probs.shape[1])).mean())


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class, -log max(p_y, NLL_FLOOR), in nats.

    Args:
        probs: [N, K] float, class probabilities; exact zeros (CL histograms) are clamped to ``NLL_FLOOR``
            (1e-12), so a true class no chain reached costs 27.63 nats instead of infinity.
        labels: [N] int, true classes.
    Returns:
        The mean over the N examples, >= 0.
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    return float(_per_example(probs, labels)["nll"].mean())


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins (Guo et al., 2017).

    Math: ECE = sum_b (n_b / N) |acc_b - conf_b|, confidence = max_j p_j, bins (b/B, (b+1)/B] (bin 0 closed at
    0), acc_b the mean top-1 credit and conf_b the mean confidence of the n_b examples in bin b.

    Args:
        probs: [N, K] float, class probabilities.
        labels: [N] int, true classes.
        bins: B, the number of equal-width bins on [0, 1].
    Returns:
        ECE as a fraction in [0, 1] (multiply by 100 for the percent some papers print).
    """
    bins = _check_bins(bins)
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    return _ece_from(probs.max(dim=1).values.cpu(), _top_k_credit(probs, labels, 1).cpu(), bins)


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: squared error against the one-hot label, summed over classes, mean over examples.

    Math: BS = (1/N) sum_n sum_j (p_nj - 1[j = y_n])^2 (Brier's original definition; not divided by K).
    Perfect predictions give 0, uniform ones (K - 1) / K, the worst possible 2.

    Args:
        probs: [N, K] float, class probabilities.
        labels: [N] int, true classes.
    Returns:
        The score in [0, 2].
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    return float(_per_example(probs, labels)["brier"].mean())


def mean_entropy(probs: torch.Tensor) -> float:
    """Mean Shannon entropy -sum_j p_j log p_j of the predicted distributions, in nats (0 log 0 = 0).

    Args:
        probs: [N, K] float, class probabilities.
    Returns:
        The mean over examples, in [0, log K].
    """
    probs = _check_probs(probs)
    return float((-torch.special.xlogy(probs, probs).sum(dim=1)).mean())


def aurc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the risk-coverage curve of the selective classifier that abstains on low max-probability.

    Math: sort the N examples by confidence max_j p_j, most confident first. For n = 1..N the classifier covers
    the n most confident examples (coverage n / N) with risk(n) = (errors among them) / n, where an example's
    error is 1 - its top-1 credit. AURC = (1/N) sum_n risk(n), the right Riemann sum over coverages 1/N..1.
    Examples with equal confidence take their group's mean error (the expected risk under a random order of
    the tie), so the value does not depend on the input order. A predictor whose confidences rank every correct
    example above every wrong one, with m errors among N, scores (1/N) [m - (N - m)(H_N - H_{N-m})], H the
    harmonic numbers; lower is better.

    Args:
        probs: [N, K] float, class probabilities.
        labels: [N] int, true classes.
    Returns:
        AURC as a fraction in [0, 1].
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    return _aurc_from(probs.max(dim=1).values.cpu(), _top_k_credit(probs, labels, 1).cpu())


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """Per-bin confidence, accuracy and count for a reliability diagram (same bins as ``ece``).

    Args:
        probs: [N, K] float, class probabilities.
        labels: [N] int, true classes.
        bins: B, the number of equal-width bins on [0, 1].
    Returns:
        A JSON-ready dict of plain Python values: ``edges`` (B + 1 floats), ``confidence`` and ``accuracy``
        (B floats each: mean max-probability and mean top-1 credit as fractions, ``None`` for an empty bin),
        ``count`` (B ints), ``ece`` (float) and ``num_examples`` (int).
    """
    bins = _check_bins(bins)
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    confidence = probs.max(dim=1).values.cpu()
    correct = _top_k_credit(probs, labels, 1).cpu()
    stats = _bin_statistics(confidence, correct, bins)
    counts = stats["count"].tolist()
    mean_conf = [s / n if n else None for s, n in zip(stats["conf_sum"].tolist(), counts, strict=True)]
    mean_acc = [s / n if n else None for s, n in zip(stats["correct_sum"].tolist(), counts, strict=True)]
    return {"edges": stats["edges"].tolist(), "confidence": mean_conf, "accuracy": mean_acc, "count": counts,
            "ece": _ece_from(confidence, correct, bins), "num_examples": int(confidence.numel())}


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """All summary metrics at once, from one pass over the inputs.

    Args:
        probs: [N, K] float, class probabilities.
        labels: [N] int, true classes.
    Returns:
        ``{"top1", "top5" (only when K >= 5), "nll", "ece" (15 bins), "brier", "entropy", "aurc"}``, with the
        units of the individual functions (accuracies in percent).
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    return _metrics_from(_per_example(probs, labels))


class MetricAccumulator:
    """Collects batches and computes ``classification_metrics`` on their concatenation.

    Only the per-example quantities the metrics need are kept (at most six float64 numbers each, on the CPU), so
    memory is O(N) whatever K is, and the result equals the one-shot metrics on the concatenated batches.

    Args:
        num_classes: K, if known; otherwise it is fixed by the first batch. Later batches must match it.
        bins: the number of ECE bins.

    Example:
        >>> acc = MetricAccumulator()
        >>> for images, labels in loader:
        ...     acc.update(model(images).softmax(-1), labels)
        >>> acc.compute()["top1"]
    """

    def __init__(self, num_classes: int | None = None, bins: int = 15):
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) != num_classes
                                        or num_classes < 1):
            raise ConfigError(f"num_classes must be a positive integer or None, got {num_classes!r}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.bins = _check_bins(bins)
        self._chunks: list[dict[str, torch.Tensor]] = []

    def __len__(self) -> int:
        """The number of examples seen since construction or the last ``reset``."""
        return sum(chunk["nll"].numel() for chunk in self._chunks)

    def reset(self) -> None:
        """Forgets every batch; the number of classes stays fixed if it was set."""
        self._chunks.clear()

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds one batch: probs [B, K] float, labels [B] int (any device; nothing is kept on it)."""
        probs = _check_probs(probs)
        if self.num_classes is None:
            self.num_classes = probs.shape[1]
        elif probs.shape[1] != self.num_classes:
            raise InputError(f"this batch has K = {probs.shape[1]} classes but the accumulator has "
                             f"K = {self.num_classes}; use one MetricAccumulator per model and data set")
        labels = _check_labels(labels, probs)
        self._chunks.append(_per_example(probs, labels))

    def compute(self) -> dict[str, float]:
        """The metrics of ``classification_metrics`` over every example added so far."""
        if not self._chunks:
            raise InputError("MetricAccumulator.compute() needs at least one batch; call update() first")
        stats = {name: torch.cat([chunk[name] for chunk in self._chunks]) for name in self._chunks[0]}
        return _metrics_from(stats, self.bins)


def optimal_aurc(num_examples: int, num_errors: int) -> float:
    """AURC of a perfectly ranked selective classifier, (1/N) [m - (N - m)(H_N - H_{N-m})].

    Useful as the floor that a real predictor's AURC is compared with (excess AURC).

    Args:
        num_examples: N >= 1.
        num_errors: m, 0 <= m <= N.
    Returns:
        The optimal AURC as a fraction.
    """
    if num_examples < 1 or not 0 <= num_errors <= num_examples:
        raise ConfigError(f"need N >= 1 and 0 <= m <= N, got N = {num_examples!r}, m = {num_errors!r}")
    correct = num_examples - num_errors
    harmonic_gap = math.fsum(1.0 / n for n in range(correct + 1, num_examples + 1))
    return (num_errors - correct * harmonic_gap) / num_examples



# ---- post-hoc calibration and uncertainty scores -------------------------------------------------------------
# Temperatures are searched over log T in [log 0.05, log 20]: wide enough for every network seen here (CP
# outputs are rarely off by more than 3x), narrow enough that a degenerate split cannot send T to 0 or infinity.
_LOG_T_RANGE = (math.log(0.05), math.log(20.0))


def apply_temperature(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log p / T): the temperature-scaled distribution (rows of ``probs`` on the simplex).

    For a softmax classifier log p equals the logits up to a per-row constant, so this is ordinary temperature
    scaling; for CP outputs it scales their log-probabilities. Zeros (CL histograms) are clamped to NLL_FLOOR.
    """
    probs = _check_probs(probs)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"temperature must be a positive finite number, got {temperature!r}")
    return torch.softmax(probs.clamp_min(NLL_FLOOR).log() / temperature, dim=1)


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the NLL of ``apply_temperature(probs, T)`` on (probs, labels).

    Guo et al. (2017) fit T on a validation split and apply it to the test split; the NLL is convex in 1/T, so a
    bounded 1-D search on log T finds the optimum. Deterministic (no random start).
    """
    from scipy.optimize import minimize_scalar  # scipy ships with scikit-learn, already a dependency

    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    log_p = probs.clamp_min(NLL_FLOOR).log()

    def loss(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(log_p / math.exp(log_t), labels))

    result = minimize_scalar(loss, bounds=_LOG_T_RANGE, method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x))


def accuracy_at_coverage(probs: torch.Tensor, labels: torch.Tensor, coverage: float = 0.9) -> float:
    """Top-1 accuracy (percent) on the ``coverage`` fraction of examples with the highest max-probability.

    Examples tied with the last one kept share the remaining slots by their mean credit (as in ``aurc``).
    """
    if not 0 < coverage <= 1:
        raise ConfigError(f"coverage must lie in (0, 1], got {coverage!r}")
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    confidence, correct = probs.max(dim=1).values.cpu(), _top_k_credit(probs, labels, 1).cpu()
    keep = max(1, math.ceil(coverage * confidence.numel()))
    threshold = torch.sort(confidence, descending=True).values[keep - 1]
    above = confidence > threshold
    tied = confidence == threshold
    slots = keep - int(above.sum())
    total = float(correct[above].sum()) + slots * float(correct[tied].mean())
    return 100.0 * total / keep


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve for telling out-of-distribution inputs from in-distribution ones, where a
    HIGHER score means "more likely out of distribution" (e.g. entropy, or 1 - max-probability).

    The Mann-Whitney statistic: the probability that a random OOD input scores above a random in-distribution
    one, ties counting one half. 0.5 is chance, 1.0 perfect separation.
    """
    a = torch.as_tensor(in_scores, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(out_scores, dtype=torch.float64).reshape(-1)
    if a.numel() == 0 or b.numel() == 0:
        raise InputError("auroc needs at least one in-distribution and one out-of-distribution score")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise InputError("auroc scores hold NaN or Inf")
    joint = torch.cat([a, b])
    # average ranks (1-based) so that ties count one half
    order = torch.argsort(joint, stable=True)
    sorted_scores = joint[order]
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(joint)
    ranks[order] = mean_rank[inverse]
    rank_sum_out = float(ranks[a.numel():].sum())
    n_in, n_out = a.numel(), b.numel()
    return (rank_sum_out - n_out * (n_out + 1) / 2) / (n_in * n_out)
