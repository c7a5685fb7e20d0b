"""The uniform forward process against the matrix exponential of its rate matrix."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import didicm


def rate_matrix(num_classes: int) -> torch.Tensor:
    """Q = (1 1^T - K I) / K in float64, built entry by entry so it does not share code with the library."""
    return (torch.ones(num_classes, num_classes, dtype=torch.float64)
            - num_classes * torch.eye(num_classes, dtype=torch.float64)) / num_classes


def matrix_exp_noise(p0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Reference p_t = exp(sigma Q) p0, one dense matrix exponential per example ([B, K] float64).

    torch's matrix_exp is itself only accurate to a few 1e-9 relative (we saw 4e-9 at K = 2, sigma = 0.05, where
    the closed form agrees with math.expm1 to the last digit), hence the 1e-7 tolerances below.
    """
    Q = rate_matrix(p0.shape[1])
    pairs = zip(p0.double(), sigma.double(), strict=True)
    return torch.stack([torch.linalg.matrix_exp(s * Q) @ p for p, s in pairs])


def random_probs(batch: int, num_classes: int, generator: torch.Generator, sharpness: float = 3.0) -> torch.Tensor:
    return torch.softmax(sharpness * torch.randn(batch, num_classes, generator=generator, dtype=torch.float64), 1)


@pytest.mark.parametrize("num_classes", [2, 3, 10, 57])
def test_noise_probs_matches_matrix_exponential(num_classes):
    gen = torch.Generator().manual_seed(num_classes)
    p0 = random_probs(6, num_classes, gen)
    sigma = torch.tensor([1e-6, 1e-3, 0.1, 1.0, 5.0, 30.0], dtype=torch.float64)
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    torch.testing.assert_close(diffusion.noise_probs(p0, sigma), matrix_exp_noise(p0, sigma), rtol=1e-7, atol=1e-13)


def test_noise_probs_in_float32_keeps_dtype_and_accuracy():
    gen = torch.Generator().manual_seed(0)
    p0 = random_probs(5, 12, gen)
    sigma = torch.tensor([1e-5, 1e-2, 0.5, 2.0, 9.0], dtype=torch.float64)
    diffusion = didicm.UniformDiffusion(12, didicm.LogLinearSchedule())
    out = diffusion.noise_probs(p0.float(), sigma.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), matrix_exp_noise(p0, sigma), rtol=1e-5, atol=1e-7)


def test_noise_probs_broadcasts_scalar_sigma_and_limits():
    diffusion = didicm.UniformDiffusion(4, didicm.LogLinearSchedule())
    p0 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    torch.testing.assert_close(diffusion.noise_probs(p0, torch.tensor(0.0)), p0)
    torch.testing.assert_close(diffusion.noise_probs(p0, torch.tensor(60.0)), torch.full((2, 4), 0.25,
                                                                                          dtype=torch.float64))


@pytest.mark.parametrize("num_classes", [2, 5, 31])
def test_hard_target_ratios_match_matrix_exponential_columns(num_classes):
    gen = torch.Generator().manual_seed(100 + num_classes)
    batch = 40
    c0 = torch.randint(0, num_classes, (batch,), generator=gen)
    # Half the noisy labels equal c0 (the two branches of the closed form), half are random.
    c_t = torch.where(torch.arange(batch) % 2 == 0, c0, torch.randint(0, num_classes, (batch,), generator=gen))
    sigma = torch.logspace(-5, 1.5, batch, dtype=torch.float64)
    reference_pt = matrix_exp_noise(torch.nn.functional.one_hot(c0, num_classes).double(), sigma)
    expected = reference_pt / reference_pt.gather(1, c_t[:, None])
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    ratios = diffusion.target_ratios(c_t, sigma, labels=c0)
    torch.testing.assert_close(ratios, expected, rtol=1e-7, atol=0.0)
    log_ratios = diffusion.log_target_ratios(c_t, sigma, labels=c0)
    torch.testing.assert_close(log_ratios, expected.log(), rtol=1e-7, atol=1e-12)
    assert (log_ratios.gather(1, c_t[:, None]) == 0).all()


@pytest.mark.parametrize("num_classes", [3, 17])
def test_soft_target_ratios_match_matrix_exponential_of_the_mixture(num_classes):
    gen = torch.Generator().manual_seed(7)
    batch = 12
    # A mixup-like soft label: lam * onehot(a) + (1 - lam) * onehot(b).
    a = torch.randint(0, num_classes, (batch,), generator=gen)
    b = torch.randint(0, num_classes, (batch,), generator=gen)
    lam = torch.rand(batch, 1, generator=gen, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot
    probs = lam * onehot(a, num_classes).double() + (1 - lam) * onehot(b, num_classes).double()
    c_t = torch.randint(0, num_classes, (batch,), generator=gen)
    sigma = torch.logspace(-4, 1, batch, dtype=torch.float64)
    reference_pt = matrix_exp_noise(probs, sigma)
    expected = reference_pt / reference_pt.gather(1, c_t[:, None])
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    torch.testing.assert_close(diffusion.target_ratios(c_t, sigma, probs=probs), expected, rtol=1e-7, atol=0.0)


def test_hard_ratios_equal_soft_ratios_of_one_hot_labels_in_float32():
    gen = torch.Generator().manual_seed(3)
    num_classes, batch = 100, 64
    c0 = torch.randint(0, num_classes, (batch,), generator=gen)
    c_t = torch.where(torch.rand(batch, generator=gen) < 0.5, c0, torch.randint(0, num_classes, (batch,),
                                                                                 generator=gen))
    sigma = torch.logspace(-5, 1, batch)
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    hard = diffusion.log_target_ratios(c_t, sigma, labels=c0)
    soft = diffusion.log_target_ratios(c_t, sigma, probs=torch.nn.functional.one_hot(c0, num_classes).float())
    assert hard.dtype == torch.float32 and torch.isfinite(hard).all()
    torch.testing.assert_close(hard, soft, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sigma_value", [0.05, 0.7, 3.0])
def test_sample_labels_frequencies_match_forward_marginal(sigma_value):
    num_classes, draws = 6, 60_000
    c0 = torch.full((draws,), 2)
    sigma = torch.full((draws,), sigma_value, dtype=torch.float64)
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    c_t = diffusion.sample_labels(c0, sigma, generator=torch.Generator().manual_seed(11))
    assert c_t.dtype == torch.int64 and c_t.shape == (draws,)
    freq = torch.bincount(c_t, minlength=num_classes).double() / draws
    expected = matrix_exp_noise(torch.nn.functional.one_hot(c0[:1], num_classes).double(), sigma[:1])[0]
    # Each frequency is a binomial mean: allow 5 standard deviations.
    tolerance = 5 * torch.sqrt(expected * (1 - expected) / draws)
    assert ((freq - expected).abs() <= tolerance).all(), (freq, expected)


def test_sample_labels_is_reproducible_with_a_generator_and_clean_at_zero_noise():
    diffusion = didicm.UniformDiffusion(50, didicm.LogLinearSchedule())
    c0 = torch.randint(0, 50, (500,))
    sigma = torch.full((500,), 1.0)
    first = diffusion.sample_labels(c0, sigma, generator=torch.Generator().manual_seed(5))
    second = diffusion.sample_labels(c0, sigma, generator=torch.Generator().manual_seed(5))
    other = diffusion.sample_labels(c0, sigma, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert torch.equal(diffusion.sample_labels(c0, torch.zeros(500)), c0)


@given(num_classes=st.integers(2, 40), batch=st.integers(1, 8), log_sigma=st.floats(-6.0, 1.5),
       seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_property_noising_is_a_distribution_and_ratios_are_consistent(num_classes, batch, log_sigma, seed):
    gen = torch.Generator().manual_seed(seed)
    p0 = random_probs(batch, num_classes, gen, sharpness=5.0)
    sigma = torch.full((batch,), 10.0**log_sigma, dtype=torch.float64)
    diffusion = didicm.UniformDiffusion(num_classes, didicm.GeometricSchedule())
    pt = diffusion.noise_probs(p0, sigma)
    torch.testing.assert_close(pt.sum(1), torch.ones(batch, dtype=torch.float64))
    torch.testing.assert_close(pt, matrix_exp_noise(p0, sigma), rtol=1e-7, atol=1e-12)
    # Noise only flattens: every entry moves towards 1/K.
    assert ((pt - 1 / num_classes).abs() <= (p0 - 1 / num_classes).abs() + 1e-15).all()
    c_t = torch.randint(0, num_classes, (batch,), generator=gen)
    ratios = diffusion.target_ratios(c_t, sigma, probs=p0)
    torch.testing.assert_close(ratios, pt / pt.gather(1, c_t[:, None]), rtol=1e-7, atol=0.0)


@pytest.mark.parametrize("call", [
    lambda d: d.noise_probs(torch.rand(3, 4), torch.rand(3)),  # K = 4, diffusion has 5
    lambda d: d.noise_probs(torch.ones(3, 5, dtype=torch.long), torch.rand(3)),
    lambda d: d.noise_probs(torch.rand(3, 5), torch.rand(2)),
    lambda d: d.sample_labels(torch.tensor([0, 5]), torch.rand(2)),
    lambda d: d.sample_labels(torch.tensor([0.0, 1.0]), torch.rand(2)),
    lambda d: d.target_ratios(torch.tensor([0, 1]), torch.rand(2)),
    lambda d: d.target_ratios(torch.tensor([0, 1]), torch.rand(2), labels=torch.tensor([0, 1]),
                              probs=torch.rand(2, 5)),
    lambda d: d.target_ratios(torch.tensor([0, 1]), torch.rand(2), labels=torch.tensor([0, 1, 2])),
    lambda d: d.target_ratios(torch.tensor([0, 1]), torch.rand(2), probs=torch.rand(3, 5)),
    lambda d: d.target_ratios(torch.tensor([0, -1]), torch.rand(2), labels=torch.tensor([0, 1])),
])
def test_bad_inputs_raise_input_error(call):
    with pytest.raises(didicm.InputError):
        call(didicm.UniformDiffusion(5, didicm.LogLinearSchedule()))


@pytest.mark.parametrize("num_classes", [1, 0, 2.5])
def test_bad_num_classes_raise_config_error(num_classes):
    with pytest.raises(didicm.ConfigError):
        didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())


@pytest.mark.parametrize("soft", [False, True])
def test_ratios_stay_finite_and_exact_at_extreme_noise_levels_in_float32(soft):
    # sigma = 200 overflows e^sigma - 1 in float32 (it gave NaN); sigma = 1e-30 makes K / m overflow-prone.
    num_classes = 7
    c0 = torch.tensor([0, 0, 3, 3])
    c_t = torch.tensor([0, 2, 3, 1])
    sigma = torch.tensor([200.0, 200.0, 1e-30, 1e-30])
    p0 = torch.nn.functional.one_hot(c0, num_classes).double()
    targets = dict(probs=p0.float()) if soft else dict(labels=c0)
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    log_ratios = diffusion.log_target_ratios(c_t, sigma, **targets)
    assert torch.isfinite(log_ratios).all()
    # float64 reference: log p_t(j) - log p_t(c_t) with p_t(j) = e^{-sigma} [j == c0] + (1 - e^{-sigma}) / K.
    moved = -torch.expm1(-sigma.double())[:, None]
    log_pt = torch.log((1 - moved) * p0 + moved / num_classes)
    torch.testing.assert_close(log_ratios.double(), log_pt - log_pt.gather(1, c_t[:, None]), rtol=1e-5, atol=1e-5)


def test_ratios_need_positive_sigma():
    diffusion = didicm.UniformDiffusion(3, didicm.LogLinearSchedule())
    with pytest.raises(didicm.InputError, match="sigma must be > 0"):
        diffusion.target_ratios(torch.tensor([0, 1]), torch.tensor([0.0, 1.0]), labels=torch.tensor([0, 0]))
