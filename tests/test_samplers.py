"""CP and CL samplers against explicit K x K reverse-rate matrices, exact scores and Monte Carlo counts."""

import math

import pytest
import torch

import didicm
from didicm.diffusion import reverse_rate_times, time_grid


def exact_score_model(x: torch.Tensor, c: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The true log-ratios log p_t(j | x) - log p_t(c | x) of a known clean posterior q = x ([B, K])."""
    q = x.double()
    keep = torch.exp(-sigma.double())[:, None]
    log_pt = torch.log(keep * q + (1 - keep) / q.shape[1])
    return (log_pt - log_pt.gather(1, c[:, None])).float()


def label_dependent_model(x: torch.Tensor, c: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """An arbitrary smooth score that depends on x, c and sigma, so that label choice and time matter."""
    return 3 * torch.tanh(x + 0.1 * c[:, None] - 0.5 * sigma[:, None])


def explicit_reverse_rate(log_score: torch.Tensor) -> torch.Tensor:
    """R [K, K] with R_ij = (a_i / a_j) Q_ij off the diagonal and columns summing to 0, a = exp(s)."""
    num_classes = log_score.shape[0]
    a = log_score.double().exp()
    R = torch.empty(num_classes, num_classes, dtype=torch.float64)
    for i in range(num_classes):
        for j in range(num_classes):
            R[i, j] = a[i] / a[j] / num_classes if i != j else 0.0
    for j in range(num_classes):
        R[j, j] = -R[:, j].sum()
    return R


def reference_cp(model, x, schedule, steps, eps, mode, grid):
    """The official CP update written with explicit matrices: p <- (I + dt dsigma R) p, clamp, renormalize."""
    batch, num_classes = x.shape[0], x.shape[1]
    p = torch.full((batch, num_classes), 1.0 / num_classes, dtype=torch.float64)
    if grid == "consistent":
        points = torch.linspace(1, eps, steps + 1, dtype=torch.float64)
        times, dts = points[:-1], points[:-1] - points[1:]
    else:
        times = torch.linspace(1, eps, steps, dtype=torch.float64)
        dts = torch.full((steps,), (1 - eps) / steps, dtype=torch.float64)
    trajectory = [p]
    for t, dt in zip(times, dts, strict=True):
        sigma, dsigma = schedule(torch.full((batch,), t.item(), dtype=torch.float64))
        c = p.argmin(1) if mode == "min" else p.argmax(1)
        log_score = model(x, c, sigma.float()).double().scatter(1, c[:, None], 0.0)
        rows = []
        for b in range(batch):
            step = torch.eye(num_classes, dtype=torch.float64) + dt * dsigma[b] * explicit_reverse_rate(log_score[b])
            rows.append((step @ p[b]).clamp(0, 1))
        p = torch.stack(rows)
        p = p / p.sum(1, keepdim=True)
        trajectory.append(p)
    return torch.stack(trajectory, 1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return 0.5 * (p.double() - q.double()).abs().sum(-1)


def random_posteriors(batch, num_classes, seed, sharpness=4.0):
    return torch.softmax(sharpness * torch.randn(batch, num_classes, generator=torch.Generator().manual_seed(seed)), 1)


@pytest.mark.parametrize("num_classes", [2, 5, 50])
def test_reverse_rate_times_matches_explicit_matrix(num_classes):
    gen = torch.Generator().manual_seed(num_classes)
    p = torch.softmax(2 * torch.randn(4, num_classes, generator=gen, dtype=torch.float64), 1)
    log_score = 5 * torch.randn(4, num_classes, generator=gen, dtype=torch.float64)
    expected = torch.stack([explicit_reverse_rate(s) @ pb for s, pb in zip(log_score, p, strict=True)])
    torch.testing.assert_close(reverse_rate_times(p, log_score), expected, rtol=1e-10, atol=1e-13)
    # A per-row constant in the log-scores (another reference label) does not change R.
    torch.testing.assert_close(reverse_rate_times(p, log_score + 7.0), expected, rtol=1e-10, atol=1e-13)
    # Columns of R sum to zero, so R p carries no mass (up to rounding of its largest entries).
    rate = reverse_rate_times(p, log_score)
    assert (rate.sum(1).abs() <= 1e-13 * rate.abs().sum(1)).all()


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("grid", ["consistent", "official"])
def test_cp_matches_explicit_matrix_updates(mode, grid):
    num_classes, steps = 6, 3
    x = torch.randn(5, num_classes, generator=torch.Generator().manual_seed(1))
    # Log-linear at t = 1 has dsigma ~ 1000: the first Euler step overshoots, so the clamp is exercised too.
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    sampler = didicm.CPSampler(diffusion, steps=steps, eps=1e-5, mode=mode, grid=grid)
    probs, trajectory = sampler.run(label_dependent_model, x, return_trajectory=True)
    expected = reference_cp(label_dependent_model, x, diffusion.schedule, steps, 1e-5, mode, grid)
    torch.testing.assert_close(trajectory.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(probs, trajectory[:, -1])


def test_cp_single_step_with_a_small_rate_needs_no_clamp():
    # Small dsigma keeps (I + dt dsigma R) p inside the simplex: the step is the plain matrix product.
    num_classes = 4
    x = torch.randn(3, num_classes, generator=torch.Generator().manual_seed(2))
    schedule = didicm.GeometricSchedule(sigma_min=0.01, sigma_max=0.1)
    diffusion = didicm.UniformDiffusion(num_classes, schedule)

    def model(x, c, sigma):
        return 0.3 * label_dependent_model(x, c, sigma)

    probs = didicm.CPSampler(diffusion, steps=1, mode="min").run(model, x)
    sigma, dsigma = schedule(torch.ones(3, dtype=torch.float64))
    c = torch.zeros(3, dtype=torch.long)  # argmin of the uniform start is its first index
    log_score = model(x, c, sigma.float()).double().scatter(1, c[:, None], 0.0)
    uniform = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    expected = torch.stack([uniform + (1 - 1e-5) * dsigma[b] * explicit_reverse_rate(log_score[b]) @ uniform
                            for b in range(3)])
    assert (expected > 0).all()
    torch.testing.assert_close(probs.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("return_trajectory", [False, True])
def test_cp_with_exact_scores_recovers_the_posterior(return_trajectory):
    num_classes, batch = 10, 64
    q = random_posteriors(batch, num_classes, seed=3)
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    errors = []
    for steps in (4, 8, 16, 32):
        out = didicm.CPSampler(diffusion, steps=steps).run(exact_score_model, q, return_trajectory=return_trajectory)
        probs = out[0] if return_trajectory else out
        assert probs.shape == (batch, num_classes) and probs.dtype == torch.float32
        errors.append(total_variation(probs, q).max().item())
    # Discretization error only: small at S = 16 and shrinking as the grid refines.
    assert errors[2] < 0.005, errors
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert (total_variation(probs, q) < total_variation(torch.full_like(q, 0.1), q)).all()


def reference_exponential_cp(model, x, schedule, steps, eps):
    """CP with the exponential update from explicit matrices: class i loses mass at r_i = -R_ii exactly over the
    step and gains g_i = sum_{j != i} R_ij p_j held fixed: p_i <- p_i e^{-h r_i} + g_i (1 - e^{-h r_i}) / r_i."""
    batch, num_classes = x.shape[0], x.shape[1]
    p = torch.full((batch, num_classes), 1.0 / num_classes, dtype=torch.float64)
    points = torch.linspace(1, eps, steps + 1, dtype=torch.float64)
    for t, dt in zip(points[:-1], points[:-1] - points[1:], strict=True):
        sigma, dsigma = schedule(torch.full((batch,), t.item(), dtype=torch.float64))
        c = p.argmin(1)
        log_score = model(x, c, sigma.float()).double().scatter(1, c[:, None], 0.0)
        rows = []
        for b in range(batch):
            R, h = explicit_reverse_rate(log_score[b]), (dt * dsigma[b]).item()
            new = torch.empty(num_classes, dtype=torch.float64)
            for i in range(num_classes):
                r = -R[i, i].item()
                g = sum(R[i, j].item() * p[b, j].item() for j in range(num_classes) if j != i)
                new[i] = p[b, i] * math.exp(-h * r) + g * (-math.expm1(-h * r) / r if r > 0 else h)
            rows.append(new / new.sum())
        p = torch.stack(rows)
    return p


def test_exponential_cp_matches_explicit_matrix_updates_and_never_zeroes_a_class():
    num_classes, steps = 6, 3
    x = torch.randn(5, num_classes, generator=torch.Generator().manual_seed(1))
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    probs = didicm.CPSampler(diffusion, steps=steps, update="exponential").run(label_dependent_model, x)
    expected = reference_exponential_cp(label_dependent_model, x, diffusion.schedule, steps, 1e-5)
    torch.testing.assert_close(probs.double(), expected, rtol=1e-5, atol=1e-9)
    # the same network and grid: the Euler step overshoots and its clamp sets classes to exactly zero, while the
    # exponential step keeps every class positive
    euler = didicm.CPSampler(diffusion, steps=steps).run(label_dependent_model, 3 * x)
    exponential = didicm.CPSampler(diffusion, steps=steps, update="exponential").run(label_dependent_model, 3 * x)
    assert (euler == 0).any() and (exponential > 0).all()
    torch.testing.assert_close(exponential.sum(1), torch.ones(5))


def test_exponential_cp_with_exact_scores_converges_to_the_posterior_at_first_order():
    num_classes, batch = 10, 64
    q = random_posteriors(batch, num_classes, seed=3)
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    errors = []
    for steps in (8, 16, 32, 64):
        probs = didicm.CPSampler(diffusion, steps=steps, update="exponential").run(exact_score_model, q)
        errors.append(total_variation(probs, q).max().item())
    # halving the step halves the error (first order); the Euler step is closer at the same S (see its test)
    assert all(0.4 < later / earlier < 0.6 for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.01, errors


@pytest.mark.parametrize("return_trajectory", [False, True])
def test_cl_with_exact_scores_recovers_the_posterior_within_monte_carlo_error(return_trajectory):
    num_classes, batch, chains = 10, 2, 10_000
    q = random_posteriors(batch, num_classes, seed=4, sharpness=3.0)
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    sampler = didicm.CLSampler(diffusion, steps=16, chains=chains)
    out = sampler.run(exact_score_model, q, generator=torch.Generator().manual_seed(0),
                      return_trajectory=return_trajectory)
    probs = out[0] if return_trajectory else out
    assert probs.shape == (batch, num_classes)
    # Per class: 5 binomial standard deviations plus 0.005 of discretization bias (measured ~0.003 in TV at S=16).
    tolerance = 5 * torch.sqrt(q * (1 - q) / chains) + 0.005
    assert ((probs - q).abs() <= tolerance).all(), (probs, q)


def test_cl_single_step_transition_frequencies_match_onehot_plus_rate():
    num_classes, chains = 5, 40_000
    gen = torch.Generator().manual_seed(5)
    table = -2 * torch.rand(num_classes, num_classes, generator=gen)  # s[c, j] in [-2, 0]

    def model(x, c, sigma):
        return table[c]

    schedule = didicm.GeometricSchedule(sigma_min=0.1, sigma_max=0.5)
    diffusion = didicm.UniformDiffusion(num_classes, schedule)
    sampler = didicm.CLSampler(diffusion, steps=1, eps=1e-5, chains=chains)
    _, history = sampler.run(model, torch.zeros(1, 3), generator=gen, return_trajectory=True)
    start, end = history[0, :, 0], history[0, :, 1]
    _, dsigma = schedule(torch.ones(1, dtype=torch.float64))
    for c in range(num_classes):
        # method.md: q_j = dt dsigma exp(s_j) / K for j != c, q_c = -sum_j q_j; draw from onehot(c) + q.
        rate = (1 - 1e-5) * dsigma * table[c].double().exp() / num_classes
        rate[c] = 0.0
        expected = rate.clone()
        expected[c] = 1.0 - rate.sum()
        assert expected[c] > 0
        ends = end[start == c]
        freq = torch.bincount(ends, minlength=num_classes).double() / len(ends)
        tolerance = 5 * torch.sqrt(expected * (1 - expected) / len(ends))
        assert ((freq - expected).abs() <= tolerance).all(), (c, freq, expected)


def test_cp_trajectory_shape_and_rows():
    num_classes, batch, steps = 7, 5, 6
    q = random_posteriors(batch, num_classes, seed=6)
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    probs, trajectory = didicm.CPSampler(diffusion, steps=steps).run(exact_score_model, q, return_trajectory=True)
    assert trajectory.shape == (batch, steps + 1, num_classes)
    assert torch.equal(trajectory[:, 0], torch.full((batch, num_classes), 1.0 / num_classes))
    torch.testing.assert_close(trajectory.sum(-1), torch.ones(batch, steps + 1))
    assert (trajectory >= 0).all()
    torch.testing.assert_close(trajectory[:, -1], probs)
    assert torch.equal(didicm.CPSampler(diffusion, steps=steps).run(exact_score_model, q), probs)


def test_cl_runs_all_chains_in_one_model_call_per_step_and_returns_chains():
    num_classes, batch, chains, steps = 6, 3, 4, 5
    x = torch.arange(batch, dtype=torch.float32)[:, None].expand(batch, 2)
    seen = []

    def model(x_chains, c, sigma):
        seen.append((x_chains.clone(), c.clone(), sigma.clone()))
        return torch.zeros(x_chains.shape[0], num_classes)

    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    sampler = didicm.CLSampler(diffusion, steps=steps, chains=chains)
    probs, history = sampler.run(model, x, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert len(seen) == steps
    for x_chains, c, sigma in seen:
        assert x_chains.shape == (batch * chains, 2) and c.shape == sigma.shape == (batch * chains,)
        # Chain n of image b sees image b.
        assert torch.equal(x_chains[:, 0], torch.arange(batch).repeat_interleave(chains).float())
    for (_, c, _), step in zip(seen, range(steps), strict=True):
        assert torch.equal(c, history[:, :, step].reshape(-1))
    assert history.shape == (batch, chains, steps + 1) and history.dtype == torch.int64
    assert ((history >= 0) & (history < num_classes)).all()
    counts = torch.nn.functional.one_hot(history[:, :, -1], num_classes).float().mean(1)
    torch.testing.assert_close(probs, counts)
    torch.testing.assert_close(probs.sum(1), torch.ones(batch))
    assert probs.shape == (batch, num_classes) and sampler.evaluations_per_image == steps * chains


def test_cp_at_twenty_thousand_classes_builds_no_k_by_k_matrix():
    num_classes, batch = 20_000, 64
    log_score = 5 * torch.randn(batch, num_classes, generator=torch.Generator().manual_seed(7))

    def model(x, c, sigma):
        return log_score

    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    probs = didicm.CPSampler(diffusion, steps=3).run(model, torch.zeros(batch, 1))
    assert probs.shape == (batch, num_classes)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(batch))


def test_time_grids():
    times, dts = time_grid(4, 1e-5, "consistent")
    torch.testing.assert_close(times, torch.tensor([1.0, 0.75 + 0.25e-5, 0.5 + 0.5e-5, 0.25 + 0.75e-5],
                                                   dtype=torch.float64))
    torch.testing.assert_close(dts, torch.full((4,), 0.25 * (1 - 1e-5), dtype=torch.float64))
    assert abs((times[-1] - dts[-1]).item() - 1e-5) < 1e-15  # ends exactly at eps
    times, dts = time_grid(4, 1e-5, "official")
    torch.testing.assert_close(times, torch.linspace(1, 1e-5, 4, dtype=torch.float64))
    torch.testing.assert_close(dts, torch.full((4,), (1 - 1e-5) / 4, dtype=torch.float64))
    assert (times[-1] - dts[-1]).item() < 0  # the official last step runs past t = 0


def test_official_grid_gives_different_probabilities():
    q = random_posteriors(16, 10, seed=8)
    diffusion = didicm.UniformDiffusion(10, didicm.LogLinearSchedule())
    consistent = didicm.CPSampler(diffusion, steps=4).run(exact_score_model, q)
    official = didicm.CPSampler(diffusion, steps=4, grid="official").run(exact_score_model, q)
    assert (consistent - official).abs().max() > 0.05
    # With the exact score the consistent grid is the closer one (method.md's finding).
    assert total_variation(consistent, q).mean() < total_variation(official, q).mean()


def test_generator_makes_random_mode_and_cl_reproducible():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(9))
    diffusion = didicm.UniformDiffusion(8, didicm.LogLinearSchedule())
    cp = didicm.CPSampler(diffusion, steps=5, mode="random")
    cl = didicm.CLSampler(diffusion, steps=5, chains=6)
    for sampler in (cp, cl):
        first = sampler.run(label_dependent_model, x, generator=torch.Generator().manual_seed(1))
        again = sampler.run(label_dependent_model, x, generator=torch.Generator().manual_seed(1))
        other = sampler.run(label_dependent_model, x, generator=torch.Generator().manual_seed(2))
        assert torch.equal(first, again)
        assert not torch.equal(first, other)


@pytest.mark.parametrize("build", [
    lambda d: didicm.CPSampler(d, steps=0),
    lambda d: didicm.CPSampler(d, steps=-2),
    lambda d: didicm.CPSampler(d, steps=2.5),
    lambda d: didicm.CPSampler(d, steps=True),
    lambda d: didicm.CPSampler(d, eps=0.0),
    lambda d: didicm.CPSampler(d, eps=1.0),
    lambda d: didicm.CPSampler(d, eps=-1e-3),
    lambda d: didicm.CPSampler(d, mode="median"),
    lambda d: didicm.CPSampler(d, grid="cosine"),
    lambda d: didicm.CPSampler(d, update="rk4"),
    lambda d: didicm.CLSampler(d, steps=0),
    lambda d: didicm.CLSampler(d, eps=1.5),
    lambda d: didicm.CLSampler(d, chains=0),
    lambda d: didicm.CLSampler(d, chains=-1),
    lambda d: didicm.CLSampler(d, grid="official-ish"),
    lambda d: time_grid(3, 1e-5, "uniform"),
])
def test_bad_options_raise_config_error(build):
    with pytest.raises(didicm.ConfigError):
        build(didicm.UniformDiffusion(4, didicm.LogLinearSchedule()))


@pytest.mark.parametrize("model", [
    lambda x, c, sigma: torch.zeros(x.shape[0], 5),
    lambda x, c, sigma: torch.zeros(x.shape[0]),
    lambda x, c, sigma: torch.zeros(x.shape[0] + 1, 4),
    lambda x, c, sigma: torch.full((x.shape[0], 4), float("nan")),
    lambda x, c, sigma: torch.zeros(x.shape[0], 4).index_fill(1, torch.tensor([2]), float("inf")),
    lambda x, c, sigma: [[0.0] * 4] * x.shape[0],
    lambda x, c, sigma: torch.ones(x.shape[0], 4, dtype=torch.complex64),  # was silently cast to real
    lambda x, c, sigma: torch.ones(x.shape[0], 4, dtype=torch.bool),  # was read as log-ratios 0 and 1
])
@pytest.mark.parametrize("kind", ["cp", "cl"])
def test_bad_model_outputs_raise_input_error(model, kind):
    diffusion = didicm.UniformDiffusion(4, didicm.LogLinearSchedule())
    sampler = didicm.CPSampler(diffusion, steps=2) if kind == "cp" else didicm.CLSampler(diffusion, steps=2, chains=3)
    with pytest.raises(didicm.InputError):
        sampler.run(model, torch.zeros(3, 2))


@pytest.mark.parametrize("x", [torch.tensor(1.0), torch.zeros(0, 3), torch.tensor([[float("nan")]]), [1.0, 2.0]])
def test_bad_images_raise_input_error(x):
    diffusion = didicm.UniformDiffusion(4, didicm.LogLinearSchedule())
    with pytest.raises(didicm.InputError):
        didicm.CPSampler(diffusion, steps=2).run(label_dependent_model, x)


def test_cp_stays_finite_with_extreme_finite_log_scores():
    # A log-ratio spread of 2e4 overflowed 1 / a_j and turned the whole state into NaN.
    log_score = torch.tensor([[15409.96, -2934.29, 0.0], [-1e4, 1e4, 3.0]])

    def model(x, c, sigma):
        return log_score

    diffusion = didicm.UniformDiffusion(3, didicm.LogLinearSchedule())
    probs = didicm.CPSampler(diffusion, steps=2).run(model, torch.zeros(2, 1))
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    # The class with the overwhelming score takes the mass, as the unbounded update would.
    assert probs.argmax(1).tolist() == [0, 1]
