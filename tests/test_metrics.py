"""Metrics against slow, loop-based references and hand-computed cases."""

import itertools
import math

import numpy as np
import pytest
import torch

from didicm.errors import ConfigError, InputError
from didicm.metrics import (
    NLL_FLOOR,
    MetricAccumulator,
    aurc,
    brier,
    classification_metrics,
    ece,
    mean_entropy,
    nll,
    optimal_aurc,
    reliability_bins,
    top_k_accuracy,
)


# ---- slow references: plain Python over lists ------------------------------------------------------------------
def ref_top_k(probs, labels, k):
    """Mean over rows of P(y among the first k) over every ordering of the classes sorted by probability."""
    hits = []
    for row, y in zip(probs, labels, strict=True):
        orders = [o for o in itertools.permutations(range(len(row)))
                  if all(row[o[i]] >= row[o[i + 1]] for i in range(len(o) - 1))]
        hits.append(sum(y in o[:k] for o in orders) / len(orders))
    return 100.0 * sum(hits) / len(hits)


def ref_top_k_distinct(probs, labels, k):
    """For rows without ties: is y among the k largest?"""
    hits = 0
    for row, y in zip(probs, labels, strict=True):
        ranked = sorted(range(len(row)), key=lambda j: -row[j])
        hits += y in ranked[:k]
    return 100.0 * hits / len(labels)


def ref_nll(probs, labels):
    return sum(-math.log(max(row[y], NLL_FLOOR)) for row, y in zip(probs, labels, strict=True)) / len(labels)


def ref_brier(probs, labels):
    total = 0.0
    for row, y in zip(probs, labels, strict=True):
        total += sum((p - (1.0 if j == y else 0.0)) ** 2 for j, p in enumerate(row))
    return total / len(labels)


def ref_entropy(probs):
    return sum(-sum(p * math.log(p) for p in row if p > 0) for row in probs) / len(probs)


def ref_ece(probs, labels, bins):
    """Rows without ties in the top class: correct = argmax == y. Bins (lo, hi], the first one closed."""
    conf = [max(row) for row in probs]
    correct = [float(row.index(max(row)) == y) for row, y in zip(probs, labels, strict=True)]
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(conf) if (lo < c <= hi) or (b == 0 and c == 0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            mean_conf = sum(conf[i] for i in members) / len(members)
            total += len(members) / len(conf) * abs(acc - mean_conf)
    return total


def ref_aurc_order(conf_and_error):
    """AURC for one fixed order (most confident first): mean over n of the error rate among the first n."""
    risks, errors = [], 0.0
    for n, (_, error) in enumerate(conf_and_error, start=1):
        errors += error
        risks.append(errors / n)
    return sum(risks) / len(risks)


def ref_aurc(probs, labels):
    """Average of the AURC over every order of the examples that sorts the confidences non-increasingly."""
    items = [(max(row), 1.0 - ref_top_k([row], [y], 1) / 100.0) for row, y in zip(probs, labels, strict=True)]
    values = [ref_aurc_order(order) for order in itertools.permutations(items)
              if all(order[i][0] >= order[i + 1][0] for i in range(len(order) - 1))]
    return sum(values) / len(values)


# ---- input generators -------------------------------------------------------------------------------------------
def random_probs(n, k, seed, temperature=1.0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=generator, dtype=torch.float64) * temperature
    labels = torch.randint(0, k, (n,), generator=generator)
    return logits.softmax(dim=1), labels


def histogram_probs(n, k, chains, seed):
    """CL-like predictions: counts of `chains` draws per row, divided by `chains` (ties and zeros abound)."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, k, (n, chains), generator=generator)
    counts = torch.zeros(n, k, dtype=torch.float64).scatter_add_(1, draws, torch.ones(n, chains, dtype=torch.float64))
    return counts / chains, torch.randint(0, k, (n,), generator=generator)


# ---- against the references -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_loop_references_on_random_softmax(seed):
    probs, labels = random_probs(200, 7, seed, temperature=2.0)
    rows, ys = probs.tolist(), labels.tolist()
    for k in (1, 3, 7):
        assert top_k_accuracy(probs, labels, k) == pytest.approx(ref_top_k_distinct(rows, ys, k), abs=1e-9)
    assert nll(probs, labels) == pytest.approx(ref_nll(rows, ys), rel=1e-12)
    assert brier(probs, labels) == pytest.approx(ref_brier(rows, ys), rel=1e-12)
    assert mean_entropy(probs) == pytest.approx(ref_entropy(rows), rel=1e-12)
    for bins in (1, 5, 15):
        assert ece(probs, labels, bins) == pytest.approx(ref_ece(rows, ys, bins), abs=1e-12)


def test_top_k_with_ties_equals_average_over_tie_orders():
    probs, labels = histogram_probs(40, 5, chains=4, seed=3)
    rows, ys = probs.tolist(), labels.tolist()
    for k in (1, 2, 5):
        assert top_k_accuracy(probs, labels, k) == pytest.approx(ref_top_k(rows, ys, k), abs=1e-9)


def test_top_k_tie_hand_cases():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0], [0.5, 0.25, 0.25, 0.0]])
    labels = torch.tensor([0, 3, 1, 3])
    # credits: 1/2 (tied pair), 0 (top-1 taken), 0 (below the max), 0
    assert top_k_accuracy(probs, labels, 1) == pytest.approx(12.5)
    # top-2 credits: 1, 0, 1/2 (two tied for the second slot), 0
    assert top_k_accuracy(probs, labels, 2) == pytest.approx(100 * 1.5 / 4)
    # top-3 credits: 1, 1/2 (class 3 ties with class 2 for the third slot), 1, 0 (class 3 is last)
    assert top_k_accuracy(probs, labels, 3) == pytest.approx(100 * 2.5 / 4)


def test_aurc_matches_reference_on_random_inputs_without_ties():
    probs, labels = random_probs(7, 4, seed=5, temperature=3.0)
    assert aurc(probs, labels) == pytest.approx(ref_aurc(probs.tolist(), labels.tolist()), abs=1e-12)


def test_aurc_with_tied_confidences_is_the_mean_over_tie_orders_and_order_free():
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [0.5, 0.0, 0.5],
                          [1.0, 0.0, 0.0], [0.75, 0.25, 0.0]], dtype=torch.float64)
    labels = torch.tensor([1, 0, 2, 1, 0, 0])
    expected = ref_aurc(probs.tolist(), labels.tolist())
    assert aurc(probs, labels) == pytest.approx(expected, abs=1e-12)
    for seed in range(3):
        order = torch.randperm(6, generator=torch.Generator().manual_seed(seed))
        assert aurc(probs[order], labels[order]) == pytest.approx(expected, abs=1e-12)


# ---- hand-computed cases ------------------------------------------------------------------------------------------
def test_perfect_predictions():
    labels = torch.tensor([3, 0, 9, 5, 5, 1])
    probs = torch.eye(10)[labels]
    metrics = classification_metrics(probs, labels)
    assert metrics == {"top1": 100.0, "top5": 100.0, "nll": 0.0, "ece": 0.0, "brier": 0.0, "entropy": 0.0,
                       "aurc": 0.0}


@pytest.mark.parametrize("num_classes", [2, 5, 10, 1000])
def test_uniform_predictions(num_classes):
    labels = torch.arange(8) % num_classes
    probs = torch.full((8, num_classes), 1.0 / num_classes)
    metrics = classification_metrics(probs, labels)
    assert metrics["entropy"] == pytest.approx(math.log(num_classes), rel=1e-6)
    assert metrics["nll"] == pytest.approx(math.log(num_classes), rel=1e-6)
    assert metrics["brier"] == pytest.approx((num_classes - 1) / num_classes, rel=1e-6)
    # every class ties: top-k credit k / K, so ECE (confidence 1/K vs accuracy 1/K) is 0
    assert metrics["top1"] == pytest.approx(100.0 / num_classes)
    assert metrics["ece"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["aurc"] == pytest.approx(1.0 - 1.0 / num_classes, rel=1e-6)
    if num_classes >= 5:
        assert metrics["top5"] == pytest.approx(500.0 / num_classes)
    else:
        assert "top5" not in metrics


def test_brier_worst_case_and_nll_floor():
    probs = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1])
    assert brier(probs, labels) == pytest.approx(2.0)
    # a CL histogram that never reached the true class: finite, -log of the documented floor
    assert nll(probs, labels) == pytest.approx(-math.log(NLL_FLOOR))
    assert math.isfinite(nll(probs, labels))


def test_ece_hand_case():
    # bins of width 0.5: (0, 0.5] holds confidence 0.4 (wrong); (0.5, 1] holds 0.9 (right) and 0.7 (wrong)
    probs = torch.tensor([[0.4, 0.3, 0.3], [0.9, 0.1, 0.0], [0.7, 0.3, 0.0]])
    labels = torch.tensor([1, 0, 1])
    expected = (1 / 3) * abs(0.0 - 0.4) + (2 / 3) * abs(0.5 - 0.8)
    assert ece(probs, labels, bins=2) == pytest.approx(expected, abs=1e-7)


def test_ece_bin_edges_and_confidence_one():
    # confidences 1.0, 0.75, 0.5, 0.25 with 4 bins: each on an upper edge, so each in the bin below the edge
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.75, 0.25, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0],
                          [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2])
    bins = reliability_bins(probs, labels, bins=4)
    assert bins["edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert bins["count"] == [1, 1, 1, 1]
    assert bins["confidence"] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # credits: uniform row 1/4, row 3 wrong, row 2 right, row 1 right
    assert bins["accuracy"] == pytest.approx([0.25, 0.0, 1.0, 1.0])
    assert bins["ece"] == pytest.approx((0.0 + 0.5 + 0.25 + 0.0) / 4)
    assert bins["ece"] == pytest.approx(ece(probs, labels, bins=4))
    assert bins["num_examples"] == 4


def test_reliability_bins_empty_bins_are_none_and_counts_sum_to_n():
    probs, labels = random_probs(300, 10, seed=7, temperature=0.5)  # confidences stay low: high bins empty
    bins = reliability_bins(probs, labels, bins=15)
    assert sum(bins["count"]) == 300
    assert len(bins["edges"]) == 16 and len(bins["confidence"]) == len(bins["accuracy"]) == 15
    for count, conf, acc in zip(bins["count"], bins["confidence"], bins["accuracy"], strict=True):
        assert (count == 0) == (conf is None) == (acc is None)
    assert bins["count"][-1] == 0
    assert bins["ece"] == pytest.approx(ece(probs, labels))


def test_aurc_of_a_perfectly_ranked_predictor_has_its_closed_form():
    num_examples, num_errors = 50, 12
    confidence = torch.linspace(0.95, 0.55, num_examples, dtype=torch.float64)  # distinct, decreasing
    probs = torch.stack([confidence, 1 - confidence], dim=1)
    # the most confident 38 are right (label 0), the least confident 12 wrong (label 1)
    labels = torch.tensor([0] * (num_examples - num_errors) + [1] * num_errors)
    correct = num_examples - num_errors
    closed_form = (num_errors - correct * sum(1 / n for n in range(correct + 1, num_examples + 1))) / num_examples
    assert aurc(probs, labels) == pytest.approx(closed_form, abs=1e-12)
    assert optimal_aurc(num_examples, num_errors) == pytest.approx(closed_form, abs=1e-12)
    # the reverse ranking (every error most confident) is far worse
    assert aurc(probs, 1 - labels) > 0.5


def test_optimal_aurc_approaches_its_continuum_limit():
    risk = 0.2
    limit = risk + (1 - risk) * math.log(1 - risk)  # Geifman et al.'s optimal AURC for error rate `risk`
    assert optimal_aurc(100_000, 20_000) == pytest.approx(limit, abs=1e-4)
    assert optimal_aurc(10, 0) == 0.0 and optimal_aurc(10, 10) == 1.0


# ---- streaming ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: random_probs(257, 12, seed=11), lambda: histogram_probs(257, 12, 10, 12)])
def test_accumulator_equals_one_shot(make):
    probs, labels = make()
    accumulator = MetricAccumulator()
    for start, stop in [(0, 1), (1, 64), (64, 200), (200, 257)]:
        accumulator.update(probs[start:stop].float(), labels[start:stop])
    assert len(accumulator) == 257
    streamed, one_shot = accumulator.compute(), classification_metrics(probs.float(), labels)
    assert streamed.keys() == one_shot.keys()
    for name, value in one_shot.items():
        assert streamed[name] == pytest.approx(value, abs=1e-12), name
    accumulator.reset()
    assert len(accumulator) == 0
    with pytest.raises(InputError, match="update"):
        accumulator.compute()


def test_accumulator_rejects_a_different_number_of_classes():
    accumulator = MetricAccumulator()
    accumulator.update(torch.full((2, 4), 0.25), torch.tensor([0, 1]))
    with pytest.raises(InputError, match="K = 5"):
        accumulator.update(torch.full((2, 5), 0.2), torch.tensor([0, 1]))
    fixed = MetricAccumulator(num_classes=3)
    with pytest.raises(InputError, match="K = 3"):
        fixed.update(torch.full((2, 4), 0.25), torch.tensor([0, 1]))


def test_accepts_numpy_and_float32_and_ignores_grad():
    probs, labels = random_probs(30, 6, seed=4)
    expected = classification_metrics(probs, labels)
    from_numpy = classification_metrics(probs.numpy(), labels.numpy())
    with_grad = classification_metrics(probs.float().requires_grad_(), labels.int())
    assert from_numpy == pytest.approx(expected, abs=1e-12)
    assert with_grad == pytest.approx(expected, abs=1e-5)
    assert isinstance(np.float64(from_numpy["nll"]), np.floating) and isinstance(from_numpy["nll"], float)


# ---- errors -------------------------------------------------------------------------------------------------------
GOOD_PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
GOOD_LABELS = torch.tensor([0, 2])


@pytest.mark.parametrize("probs, labels, message", [
    (GOOD_PROBS[0], GOOD_LABELS, "shape"),
    (GOOD_PROBS, torch.tensor([0, 1, 2]), "shape"),
    (GOOD_PROBS, torch.tensor([[0, 2]]), "shape"),
    (torch.empty(0, 3), torch.empty(0, dtype=torch.long), "at least one"),
    (torch.tensor([[0.5, float("nan"), 0.5], [0.1, 0.1, 0.8]]), GOOD_LABELS, "NaN"),
    (torch.tensor([[0.5, float("inf"), 0.5], [0.1, 0.1, 0.8]]), GOOD_LABELS, "Inf"),
    (torch.tensor([[2.0, -1.0, 0.0], [0.1, 0.1, 0.8]]), GOOD_LABELS, "logits"),
    (torch.tensor([[3.0, 4.0, 3.0], [0.1, 0.1, 0.8]]), GOOD_LABELS, "sum to 1"),
    (torch.tensor([[3, 4, 3], [1, 1, 8]]), GOOD_LABELS, "floating point"),
    (GOOD_PROBS, torch.tensor([0, 3]), "outside"),
    (GOOD_PROBS, torch.tensor([-1, 0]), "outside"),
    (GOOD_PROBS, torch.tensor([0.0, 2.0]), "integer"),
    ("not probabilities", GOOD_LABELS, "tensor"),
])
def test_bad_inputs_raise_input_error(probs, labels, message):
    for metric in (nll, brier, aurc, ece, top_k_accuracy, reliability_bins, classification_metrics):
        with pytest.raises(InputError, match=message):
            metric(probs, labels)
    with pytest.raises(InputError, match=message):
        MetricAccumulator().update(probs, labels)


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="k must be"):
        top_k_accuracy(GOOD_PROBS, GOOD_LABELS, k=4)
    with pytest.raises(ConfigError, match="k must be"):
        top_k_accuracy(GOOD_PROBS, GOOD_LABELS, k=0)
    with pytest.raises(ConfigError, match="bins"):
        ece(GOOD_PROBS, GOOD_LABELS, bins=0)
    with pytest.raises(ConfigError, match="bins"):
        MetricAccumulator(bins=2.5)
    with pytest.raises(ConfigError, match="N >= 1"):
        optimal_aurc(5, 6)
    with pytest.raises(InputError, match="NaN"):
        mean_entropy(torch.tensor([[float("nan"), 1.0]]))
