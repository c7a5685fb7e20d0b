"""Fuzzing the diffusion core: malformed tensors either work (finite output of the right shape) or raise a
``didicm.DidicmError``; no other exception, and no silent NaN/Inf, may escape."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import didicm

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.complex64]
# A silent lossy cast (complex -> real) is an escape too: it turns bad input into plausible output.
pytestmark = pytest.mark.filterwarnings("error::UserWarning")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw, batch: int, width: int | None = None, kind: str = "float", scales=(1.0, 1e-6, 30.0)):
    """A tensor that is usually close to what the API wants ([batch] or [batch, width] of ``kind``) but often
    has the wrong rank, size or dtype, out-of-range values, NaN or Inf.

    ``scales`` bounds the magnitude of finite values: results that overflow float32 by definition (a log-score
    of 1e4 has a loss of e^1e4) are outside any contract, so each call site names the range it must handle.
    """
    if draw(st.booleans()):
        shape = (batch,) if width is None else (batch, width)
    else:
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
    if draw(st.integers(0, 3)) == 0:
        dtype = draw(st.sampled_from(DTYPES))
    else:
        dtype = torch.float32 if kind == "float" else torch.int64
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    if kind == "labels":
        low, high = draw(st.sampled_from([(0, max(width or 2, 1)), (-3, 0), (0, 40)]))
        values = torch.randint(low, high, shape, generator=gen).double()
    elif kind == "probs":
        values = torch.rand(shape, generator=gen, dtype=torch.float64)
        if len(shape) and shape[-1]:
            values = values / values.sum(-1, keepdim=True).clamp_min(1e-12)
    else:
        scale = draw(st.sampled_from(scales))
        values = scale * (torch.rand(shape, generator=gen, dtype=torch.float64) if kind == "positive"
                          else torch.randn(shape, generator=gen, dtype=torch.float64))
    poison = draw(st.sampled_from([None, None, float("nan"), float("inf"), float("-inf"), -1.0, 0.0]))
    if poison is not None and values.numel():
        values.view(-1)[draw(st.integers(0, values.numel() - 1))] = poison
    if dtype == torch.bool:
        return values != 0
    if not (dtype.is_floating_point or dtype.is_complex):
        return values.nan_to_num(0.0, 0.0, 0.0).clamp(-100, 100).to(dtype)
    return values.to(dtype)


def assert_finite(out, shape):
    assert isinstance(out, torch.Tensor), type(out)
    assert tuple(out.shape) == tuple(shape), (tuple(out.shape), shape)
    if torch.is_floating_point(out):
        assert torch.isfinite(out).all(), out


def call_or_library_error(fn, *args, **kwargs):
    """Run fn; a DidicmError is an accepted answer (returns None), any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except didicm.DidicmError as err:
        assert str(err), "errors must say what is wrong"
        return None


@st.composite
def problem(draw):
    num_classes = draw(st.integers(2, 6))
    batch = draw(st.integers(0, 5))
    return num_classes, batch


SIGMA_SCALES = (1.0, 1e-30, 1e-6, 30.0, 1e4)  # from near-clean to fully noised


@given(problem(), st.data())
@FUZZ
def test_fuzz_noise_probs(shape, data):
    num_classes, batch = shape
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    p0 = data.draw(tensors(batch, num_classes, kind="probs"))
    sigma = data.draw(tensors(batch, kind="positive", scales=SIGMA_SCALES))
    out = call_or_library_error(diffusion.noise_probs, p0, sigma)
    if out is not None:
        assert_finite(out, p0.shape)


@given(problem(), st.data())
@FUZZ
def test_fuzz_sample_labels(shape, data):
    num_classes, batch = shape
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    c0 = data.draw(tensors(batch, kind="labels"))
    sigma = data.draw(tensors(batch, kind="positive", scales=SIGMA_SCALES))
    out = call_or_library_error(diffusion.sample_labels, c0, sigma, generator=torch.Generator().manual_seed(0))
    if out is not None:
        assert_finite(out, c0.shape)
        assert ((out >= 0) & (out < num_classes)).all()


@given(problem(), st.data(), st.booleans(), st.booleans())
@FUZZ
def test_fuzz_target_ratios(shape, data, soft, log):
    num_classes, batch = shape
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    c_t = data.draw(tensors(batch, kind="labels"))
    sigma = data.draw(tensors(batch, kind="positive", scales=SIGMA_SCALES))
    targets = (dict(probs=data.draw(tensors(batch, num_classes, kind="probs"))) if soft
               else dict(labels=data.draw(tensors(batch, kind="labels"))))
    method = diffusion.log_target_ratios if log else diffusion.target_ratios
    out = call_or_library_error(method, c_t, sigma, **targets)
    if out is not None:
        assert_finite(out, (len(c_t), num_classes))


@given(problem(), st.data(), st.booleans())
@FUZZ
def test_fuzz_score_entropy(shape, data, soft):
    num_classes, batch = shape
    log_score = data.draw(tensors(batch, num_classes))
    c_t = data.draw(tensors(batch, kind="labels"))
    sigma = data.draw(tensors(batch, kind="positive", scales=SIGMA_SCALES))
    dsigma = data.draw(tensors(batch, kind="positive", scales=(1.0, 1e-6, 1e3)))
    targets = (dict(probs=data.draw(tensors(batch, num_classes, kind="probs"))) if soft
               else dict(labels=data.draw(tensors(batch, kind="labels"))))
    out = call_or_library_error(didicm.score_entropy, log_score, c_t, sigma, dsigma, **targets)
    if out is not None:
        assert_finite(out, (len(log_score),))
        assert (out >= 0).all()


@given(problem(), st.data(), st.sampled_from(["cp-min", "cp-max", "cp-random", "cl"]),
       st.sampled_from(["consistent", "official"]))
@FUZZ
def test_fuzz_samplers(shape, data, kind, grid):
    num_classes, batch = shape
    diffusion = didicm.UniformDiffusion(num_classes, didicm.LogLinearSchedule())
    if kind == "cl":
        sampler = didicm.CLSampler(diffusion, steps=2, chains=3, grid=grid)
    else:
        sampler = didicm.CPSampler(diffusion, steps=2, mode=kind[3:], grid=grid)
    x = data.draw(tensors(batch, 3, scales=(1.0, 1e30)))
    # The model's answer is fuzzed too: drawn once per call, with the batch size the sampler asked for.
    rows = batch * 3 if kind == "cl" else batch
    answers = [data.draw(tensors(rows, num_classes, scales=(1.0, 30.0, 1e4))) for _ in range(2)]

    def model(x_in, c, sigma):
        return answers.pop()

    out = call_or_library_error(sampler.run, model, x, generator=torch.Generator().manual_seed(0))
    if out is not None:
        assert_finite(out, (len(x), num_classes))
        torch.testing.assert_close(out.sum(1), torch.ones(len(x)))


@pytest.mark.parametrize("steps,eps,extra", [(0, 1e-5, {}), (3, float("nan"), {}), (3, 2.0, {}),
                                             (3, 1e-5, {"chains": 0})])
def test_invalid_sampler_options_are_config_errors(steps, eps, extra):
    diffusion = didicm.UniformDiffusion(3, didicm.LogLinearSchedule())
    with pytest.raises(didicm.ConfigError):
        (didicm.CLSampler if extra else didicm.CPSampler)(diffusion, steps=steps, eps=eps, **extra)
