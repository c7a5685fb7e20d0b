"""Score entropy against its term-by-term definition, at its optimum, and in low precision."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import didicm

onehot = torch.nn.functional.one_hot


def reference_log_ratios(c_t: torch.Tensor, sigma: torch.Tensor, p0: torch.Tensor) -> torch.Tensor:
    """log p_t(j) - log p_t(c_t) in float64 from p_t = e^{-sigma} p0 + (1 - e^{-sigma}) / K."""
    p0 = p0.double()
    keep = torch.exp(-sigma.double())[:, None]
    pt = keep * p0 + (1 - keep) / p0.shape[1]
    return pt.log() - pt.log().gather(1, c_t[:, None])


def naive_score_entropy(log_score, c_t, sigma, dsigma, p0) -> torch.Tensor:
    """method.md's formula, one class at a time in float64: dsigma/K sum_{j != c_t} e^s - r s + r (log r - 1)."""
    log_r = reference_log_ratios(c_t, sigma, p0)
    batch, num_classes = log_score.shape
    out = torch.zeros(batch, dtype=torch.float64)
    for b in range(batch):
        total = 0.0
        for j in range(num_classes):
            if j == c_t[b]:
                continue
            s, r = log_score[b, j].item(), log_r[b, j].exp().item()
            total += torch.tensor(s, dtype=torch.float64).exp().item() - r * s + r * (log_r[b, j].item() - 1.0)
        out[b] = dsigma[b].item() * total / num_classes
    return out


def make_batch(batch: int, num_classes: int, seed: int, soft: bool):
    gen = torch.Generator().manual_seed(seed)
    c0 = torch.randint(0, num_classes, (batch,), generator=gen)
    if soft:
        p0 = torch.softmax(3 * torch.randn(batch, num_classes, generator=gen, dtype=torch.float64), 1)
    else:
        p0 = onehot(c0, num_classes).double()
    c_t = torch.where(torch.rand(batch, generator=gen) < 0.5, c0, torch.randint(0, num_classes, (batch,),
                                                                                generator=gen))
    t = torch.rand(batch, generator=gen, dtype=torch.float64) * (1 - 1e-5) + 1e-5
    sigma, dsigma = didicm.LogLinearSchedule()(t)
    targets = dict(probs=p0) if soft else dict(labels=c0)
    return gen, c_t, sigma, dsigma, p0, targets


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("num_classes", [2, 7])
def test_value_matches_term_by_term_formula(soft, num_classes):
    gen, c_t, sigma, dsigma, p0, targets = make_batch(16, num_classes, seed=num_classes, soft=soft)
    log_score = 4 * torch.randn(16, num_classes, generator=gen, dtype=torch.float64)
    expected = naive_score_entropy(log_score, c_t, sigma, dsigma, p0)
    loss = didicm.score_entropy(log_score, c_t, sigma, dsigma, **targets)
    assert loss.dtype == torch.float64 and loss.shape == (16,)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)
    loss32 = didicm.score_entropy(log_score.float(), c_t, sigma.float(), dsigma.float(),
                                  **{k: (v.float() if k == "probs" else v) for k, v in targets.items()})
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), expected, rtol=1e-4, atol=1e-4)


def test_value_in_the_far_branch_where_scores_exceed_log_ratios_by_a_lot():
    # Scores 25 above the targets use the overflow-safe form e^s - r (u + 1); it must still equal the formula.
    gen, c_t, sigma, dsigma, p0, targets = make_batch(8, 5, seed=1, soft=True)
    log_score = reference_log_ratios(c_t, sigma, p0) + 25.0
    expected = naive_score_entropy(log_score, c_t, sigma, dsigma, p0)
    torch.testing.assert_close(didicm.score_entropy(log_score, c_t, sigma, dsigma, **targets), expected,
                               rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_at_the_exact_ratios_with_zero_gradient(soft, dtype):
    gen, c_t, sigma, dsigma, p0, targets = make_batch(64, 10, seed=2, soft=soft)
    log_score = reference_log_ratios(c_t, sigma, p0).to(dtype).requires_grad_(True)
    loss = didicm.score_entropy(log_score, c_t, sigma.to(dtype), dsigma.to(dtype), **targets)
    scale = 1e-9 if dtype == torch.float64 else 1e-3
    # dsigma reaches ~1000 near t = 1, so compare per unit of weight.
    assert (loss.detach() / dsigma.to(dtype)).abs().max() <= scale
    loss.sum().backward()
    assert (log_score.grad / dsigma.to(dtype)[:, None]).abs().max() <= scale


@pytest.mark.parametrize("soft", [False, True])
def test_exactly_zero_at_the_library_ratios(soft):
    gen, c_t, sigma, dsigma, p0, targets = make_batch(32, 6, seed=3, soft=soft)
    diffusion = didicm.UniformDiffusion(6, didicm.LogLinearSchedule())
    log_score = diffusion.log_target_ratios(c_t, sigma.float(), **targets).float()
    assert torch.equal(didicm.score_entropy(log_score, c_t, sigma.float(), dsigma.float(), **targets),
                       torch.zeros(32))


def test_hard_labels_equal_soft_one_hot_labels():
    gen, c_t, sigma, dsigma, p0, targets = make_batch(128, 20, seed=4, soft=False)
    log_score = 3 * torch.randn(128, 20, generator=gen)
    hard = didicm.score_entropy(log_score, c_t, sigma.float(), dsigma.float(), labels=targets["labels"])
    soft = didicm.score_entropy(log_score, c_t, sigma.float(), dsigma.float(), probs=p0.float())
    torch.testing.assert_close(hard, soft, rtol=1e-4, atol=1e-4)


def test_entry_at_noisy_label_is_ignored_and_weight_is_linear():
    gen, c_t, sigma, dsigma, p0, targets = make_batch(16, 9, seed=5, soft=True)
    log_score = torch.randn(16, 9, generator=gen, dtype=torch.float64)
    loss = didicm.score_entropy(log_score, c_t, sigma, dsigma, **targets)
    moved = log_score.scatter(1, c_t[:, None], 50.0)
    torch.testing.assert_close(didicm.score_entropy(moved, c_t, sigma, dsigma, **targets), loss)
    torch.testing.assert_close(didicm.score_entropy(log_score, c_t, sigma, 3 * dsigma, **targets), 3 * loss)


@given(num_classes=st.integers(2, 30), batch=st.integers(1, 6), log_sigma=st.floats(-5.0, 1.5),
       score_scale=st.floats(0.0, 30.0), soft=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_property_non_negative_on_random_scores(num_classes, batch, log_sigma, score_scale, soft, seed):
    gen = torch.Generator().manual_seed(seed)
    c0 = torch.randint(0, num_classes, (batch,), generator=gen)
    c_t = torch.randint(0, num_classes, (batch,), generator=gen)
    sigma = torch.full((batch,), 10.0**log_sigma)
    log_score = (2 * torch.rand(batch, num_classes, generator=gen) - 1) * score_scale
    if soft:
        targets = dict(probs=torch.softmax(4 * torch.randn(batch, num_classes, generator=gen), 1))
    else:
        targets = dict(labels=c0)
    loss = didicm.score_entropy(log_score, c_t, sigma, torch.ones(batch), **targets)
    assert torch.isfinite(loss).all()
    assert (loss >= 0).all()
    # And positive whenever the score is off its optimum by a clear margin somewhere.
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    gap = (log_score - diffusion.log_target_ratios(c_t, sigma, **targets)).scatter(1, c_t[:, None], 0.0)
    assert (loss[gap.abs().amax(1) > 1.0] > 0).all()


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("num_classes", [10, 1000])
def test_finite_in_float32_and_bf16_autocast_over_the_whole_time_range(soft, num_classes):
    batch = 64
    gen = torch.Generator().manual_seed(6)
    t = torch.cat([torch.tensor([1e-5, 1.0]), torch.logspace(-5, 0, batch - 2)])
    sigma, dsigma = didicm.LogLinearSchedule(eps=1e-3)(t)
    c0 = torch.randint(0, num_classes, (batch,), generator=gen)
    c_t = torch.where(torch.arange(batch) % 2 == 0, c0, (c0 + 1) % num_classes)
    if soft:
        targets = dict(probs=0.7 * onehot(c0, num_classes).float() + 0.3 / num_classes)
    else:
        targets = dict(labels=c0)
    # A tiny head whose outputs span [-30, 30]: the plausible range of log-ratios and beyond.
    head = torch.nn.Linear(8, num_classes)
    features = torch.randn(batch, 8, generator=gen)
    for autocast in (False, True):
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            log_score = 30 * torch.tanh(head(features))
            assert log_score.dtype == (torch.bfloat16 if autocast else torch.float32)
            loss = didicm.score_entropy(log_score, c_t, sigma, dsigma, **targets)
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss).all() and (loss >= 0).all()
        loss.mean().backward()
        assert torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("call", [
    lambda: didicm.score_entropy(torch.randn(4), torch.zeros(4, dtype=torch.long), torch.ones(4), torch.ones(4),
                                 labels=torch.zeros(4, dtype=torch.long)),
    lambda: didicm.score_entropy(torch.randn(4, 3), torch.zeros(5, dtype=torch.long), torch.ones(4),
                                 torch.ones(4), labels=torch.zeros(4, dtype=torch.long)),
    lambda: didicm.score_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(4),
                                 torch.ones(3), labels=torch.zeros(4, dtype=torch.long)),
    lambda: didicm.score_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(4),
                                 torch.ones(4)),
    lambda: didicm.score_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(4),
                                 torch.ones(4), probs=torch.rand(4, 5)),
    lambda: didicm.score_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(4),
                                 torch.ones(4), labels=torch.full((4,), 3)),
])
def test_bad_inputs_raise_input_error(call):
    with pytest.raises(didicm.InputError):
        call()


@pytest.mark.parametrize("change", [
    dict(log_score=torch.tensor([[0.0, float("nan"), 1.0], [0.0, 0.0, 0.0]])),
    dict(log_score=torch.tensor([[0.0, float("inf"), 1.0], [0.0, 0.0, 0.0]])),
    dict(log_score=torch.zeros(2, 3, dtype=torch.long)),
    dict(sigma=torch.tensor([1.0 + 1.0j, 0.5])),
    dict(sigma=torch.tensor([float("nan"), 0.5])),
    dict(sigma=torch.tensor([0.0, 0.5])),
    dict(dsigma=torch.tensor([-1.0, 1.0])),
    dict(dsigma=torch.tensor([float("inf"), 1.0])),
])
def test_nan_inf_negative_or_complex_inputs_raise_input_error(change):
    # None of these is a valid input; each used to pass silently (NaN/inf loss, dropped imaginary part).
    args = dict(log_score=torch.zeros(2, 3), c_t=torch.tensor([0, 1]), sigma=torch.tensor([1.0, 0.5]),
                dsigma=torch.ones(2), labels=torch.tensor([0, 2]))
    args.update(change)
    with pytest.raises(didicm.InputError):
        didicm.score_entropy(**args)
