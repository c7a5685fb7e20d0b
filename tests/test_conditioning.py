"""Tests for DiDiRN's ``conditioned_stages``: the default reproduces the network from before the option existed
(names, init, outputs), the unconditioned part runs once per image in every CP/CL prediction, score(encode(x))
is the full network for every option, and training reaches every parameter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import didicm.models as models
from didicm import evaluation
from didicm.config import ModelConfig
from didicm.diffusion import LogLinearSchedule, UniformDiffusion, score_entropy
from didicm.errors import ConfigError, InputError
from didicm.models.layers import check_condition, mask_reference, mean_log_score
from didicm.training import build_model

K = 10
REFERENCE = Path(__file__).parent / "data" / "didirn_reference.json"
OPTIONS = (4, 2, 1, 0)


def _randomize_zero_inits(model: nn.Module, seed: int = 1) -> None:
    """The output layers and FiLM projections start at zero; give them values so outputs and gradients are real."""
    torch.manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in ("fc", "proj"):
            nn.init.normal_(module.weight, std=0.5)
            nn.init.normal_(module.bias, std=0.5)


def _inputs(batch: int, chans: int, size: int, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, chans, size, size, generator=gen)
    c = torch.randint(0, K, (batch,), generator=gen)
    sigma = torch.rand(batch, generator=gen) * 3 + 0.05
    return x, c, sigma


def _fingerprint(name: str, kwargs: dict, size: int) -> dict:
    """How tests/data/didirn_reference.json was made (at the commit it records, before the option existed)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    state = {key: [list(v.shape), float(v.double().sum()), float(v.double().abs().sum())]
             for key, v in model.state_dict().items()}
    _randomize_zero_inits(model)
    x, c, sigma = _inputs(3, kwargs["in_chans"], size)
    with torch.no_grad():
        output = model(x, c, sigma)
    return dict(state=state, output=output.tolist(), model=model, inputs=(x, c, sigma))


def _legacy_forward(model, x, c, sigma):
    """DiDiRN's forward as written before ``conditioned_stages``: the embedding into every block, no split."""
    c, sigma = check_condition(c, sigma, x.shape[0], model.num_classes)
    if not model.condition_inputs:
        return mean_log_score(model.fc(model.run_trunk(x).mean(dim=(2, 3))), c, sigma)
    emb = model.embed(c, sigma)
    out = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    for stage in model.stages:
        for block in stage:
            out = block(out, emb)
    out = model.fc(out.mean(dim=(2, 3)))
    return mean_log_score(out, c, sigma) if model.parametrization == "mean" else mask_reference(out, c)


# ---- all stages = the network from before the option ---------------------------------------------------------
REFERENCE_DATA = json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("case", sorted(REFERENCE_DATA["cases"]))
def test_default_reproduces_the_network_before_the_option(case):
    spec, want = REFERENCE_DATA["cases"][case], REFERENCE_DATA["fingerprints"][case]
    got = _fingerprint(spec["name"], spec["kwargs"], spec["size"])
    # Same tensor names in the same order, same shapes, same initial values under the same seed.
    assert list(got["state"]) == list(want["state"])
    for key, (shape, total, abs_total) in want["state"].items():
        assert got["state"][key][0] == shape, key
        assert got["state"][key][1:] == pytest.approx([total, abs_total], rel=1e-9, abs=1e-9), key
    # Outputs: the recorded ones (to float32 rounding, in case this machine's kernels differ from the recording
    # machine's) and, bit for bit, the pre-option forward run on this machine.
    torch.testing.assert_close(torch.tensor(got["output"]), torch.tensor(want["output"]), rtol=1e-5, atol=1e-5)
    model, (x, c, sigma) = got["model"], got["inputs"]
    with torch.no_grad():
        assert torch.equal(model(x, c, sigma), _legacy_forward(model, x, c, sigma))
    assert model.conditioned_stages == 4


def test_explicit_four_stages_is_the_default():
    torch.manual_seed(0)
    default = timm.create_model("didirn18", num_classes=K, width=8, stem="small")
    torch.manual_seed(0)
    explicit = timm.create_model("didirn18", num_classes=K, width=8, stem="small", conditioned_stages=4)
    assert default.state_dict().keys() == explicit.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values(),
                                                      strict=True))


# ---- structure -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stages", OPTIONS)
def test_only_the_final_stages_are_conditioned(stages):
    model = timm.create_model("didirn18", num_classes=K, width=8, stem="small", conditioned_stages=stages)
    conditioned = [all(block.cond is not None for block in stage) for stage in model.stages]
    unconditioned = [all(block.cond is None for block in stage) for stage in model.stages]
    assert conditioned == [i >= 4 - stages for i in range(4)]
    assert unconditioned == [i < 4 - stages for i in range(4)]
    assert (model.head is not None) == (stages == 0)
    assert (model.embed is None) == (stages == 0)  # the head of conditioned_stages=0 has its own embedding


def test_invalid_options_raise_config_errors():
    for bad in (5, -1, 2.5, True, "2"):
        with pytest.raises(ConfigError, match="conditioned_stages"):
            timm.create_model("didirn18", num_classes=K, conditioned_stages=bad)
    with pytest.raises(ConfigError, match="condition_inputs=False"):
        timm.create_model("didirn18", num_classes=K, parametrization="mean", condition_inputs=False,
                          conditioned_stages=2)
    with pytest.raises(ConfigError, match="head_width"):
        timm.create_model("didirn18", num_classes=K, conditioned_stages=2, head_width=64)


def test_score_rejects_raw_images_with_a_clear_error():
    model = timm.create_model("didirn18", num_classes=K, width=8, stem="small", in_chans=1, conditioned_stages=2)
    x, c, sigma = _inputs(2, 1, 12)
    with pytest.raises(InputError, match="output of encode"):
        model.score(x, c, sigma)


def test_config_kwargs_reach_the_constructor():
    cfg = ModelConfig(name="didirn18", kwargs={"conditioned_stages": 1, "width": 8, "stem": "small"})
    model = build_model(cfg.name, K, 1, cfg.kwargs)
    assert model.conditioned_stages == 1 and model.encoded_channels == 32
    model0 = models.create("didirn18", K, in_chans=1, width=8, conditioned_stages=0, head_width=32, head_depth=1)
    assert model0.head.in_proj.out_features == 32 and len(model0.head.mlps) == 1


# ---- score(encode(x)) is the network, for every option ----------------------------------------------------
@st.composite
def _options(draw):
    stages = draw(st.sampled_from(OPTIONS))
    kwargs = dict(parametrization=draw(st.sampled_from(("score", "mean"))),
                  conditioning=draw(st.sampled_from(("add", "film"))), conditioned_stages=stages,
                  stem=draw(st.sampled_from(("small", "imagenet"))))
    if kwargs["parametrization"] == "mean" and draw(st.integers(0, 3)) == 0:
        kwargs.update(condition_inputs=False, conditioned_stages=4)
    return kwargs


# batch >= 2: a one-channel GroupNorm group on a 1 x 1 map of one image has a single value (torch refuses it).
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=_options(), name=st.sampled_from(("didirn18", "didirn50")), batch=st.integers(2, 3),
       size=st.sampled_from((5, 8, 13)), seed=st.integers(0, 2**16))
def test_score_of_encode_is_forward_and_the_unsplit_network(options, name, batch, size, seed):
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=K, in_chans=2, width=4, **options).eval()
    _randomize_zero_inits(model, seed)
    x, c, sigma = _inputs(batch, 2, size, seed)
    with torch.no_grad():
        z = model.encode(x)
        got = model.score(z, c, sigma)
        assert torch.equal(got, model(x, c, sigma))
        assert got.shape == (batch, K) and torch.isfinite(got).all()
        assert got.gather(1, c.reshape(-1, 1)).eq(0).all()
        if model.head is None and model.condition_inputs:
            # Without the split: every block of the trunk run on the image, the embedding offered to all of them.
            raw = model.forward_head(model.run_trunk(x, model.embed(*check_condition(c, sigma, batch, K))))
            unsplit = mean_log_score(raw, c, sigma) if model.parametrization == "mean" else mask_reference(raw, c)
            torch.testing.assert_close(got, unsplit, rtol=1e-5, atol=1e-5)
        if model.parametrization == "mean":
            assert torch.equal(model.clean_logits(x).argmax(1), model.clean_logits(x).argmax(1))
            assert model.clean_logits(x).shape == (batch, K)


# ---- the cached part runs once per image per prediction --------------------------------------------------------
class _Counter:
    """Counts the calls of a module and the rows they saw (forward hook)."""

    def __init__(self, module: nn.Module):
        self.calls, self.rows = 0, 0
        module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1
        self.rows += args[0].shape[0]


def _counted_model(stages: int, parametrization: str = "score"):
    model = timm.create_model("didirn18", num_classes=K, in_chans=1, width=8, stem="small",
                              conditioned_stages=stages, parametrization=parametrization).eval()
    _randomize_zero_inits(model)
    first = model.first_conditioned_stage
    cached = _Counter(model.conv1)  # the stem: always in the unconditioned part
    cached_last = _Counter(model.stages[first - 1][-1]) if 0 < first else None
    per_step = _Counter(model.head if model.head is not None else model.stages[first][0])
    return model, cached, cached_last, per_step


@pytest.mark.parametrize("stages", OPTIONS)
@pytest.mark.parametrize("steps", (1, 2, 8))
def test_cp_and_cl_predictions_encode_once_per_image(stages, steps):
    batch, chains = 3, 4
    diffusion = UniformDiffusion(K, LogLinearSchedule())
    x = _inputs(batch, 1, 12)[0]
    for spec, rows_per_step in ((evaluation.parse_sampler(f"cp:{steps}"), batch),
                                (evaluation.parse_sampler(f"cl:{steps}x{chains}"), batch * chains)):
        model, cached, cached_last, per_step = _counted_model(stages)
        probs = evaluation.predict(model, x, spec, diffusion, torch.Generator().manual_seed(0))
        assert probs.shape == (batch, K) and torch.allclose(probs.sum(1), torch.ones(batch))
        assert (cached.calls, cached.rows) == (1, batch), spec.name
        if cached_last is not None:
            assert (cached_last.calls, cached_last.rows) == (1, batch), spec.name
        assert (per_step.calls, per_step.rows) == (steps, steps * rows_per_step), spec.name


@pytest.mark.parametrize("stages", OPTIONS)
def test_evaluate_encodes_each_batch_once_for_all_samplers(stages):
    model, cached, cached_last, per_step = _counted_model(stages)
    diffusion = UniformDiffusion(K, LogLinearSchedule())
    batches = [(_inputs(3, 1, 12, seed)[0], torch.tensor([0, 1, 2])) for seed in (0, 1)]
    specs = [evaluation.parse_sampler(name) for name in ("cp:1", "cp:2", "cp:8", "cl:2x4")]
    results = evaluation.evaluate(model, batches, specs, diffusion)
    assert set(results) == {"cp:1", "cp:2", "cp:8", "cl:2x4"}
    assert (cached.calls, cached.rows) == (2, 6)  # one encode per batch, shared by the four samplers
    assert per_step.calls == 2 * (1 + 2 + 8 + 2)


@pytest.mark.parametrize("stages", OPTIONS)
def test_mean_read_out_is_one_pass(stages):
    model, cached, _, per_step = _counted_model(stages, parametrization="mean")
    probs = evaluation.predict(model, _inputs(3, 1, 12)[0], evaluation.parse_sampler("mean"))
    assert probs.shape == (3, K)
    assert (cached.calls, per_step.calls) == (1, 1)


# ---- training reaches every parameter ----------------------------------------------------------------------
@pytest.mark.parametrize("stages,parametrization,conditioning", [
    (4, "score", "add"), (2, "mean", "film"), (1, "score", "film"), (0, "mean", "add"), (0, "score", "film")])
def test_gradient_reaches_every_parameter(stages, parametrization, conditioning):
    # Width 64 (the official one): narrower stages have one channel per GroupNorm group, which cancels a
    # per-channel injection, so their conditioning would get no gradient.
    torch.manual_seed(0)
    model = timm.create_model("didirn18", num_classes=K, in_chans=1, stem="small", conditioned_stages=stages,
                              parametrization=parametrization, conditioning=conditioning).train()
    _randomize_zero_inits(model)
    diffusion = UniformDiffusion(K, LogLinearSchedule())
    x, c0, _ = _inputs(4, 1, 8)
    t = torch.rand(4, dtype=torch.float64) * 0.9 + 0.05
    sigma, dsigma = diffusion.schedule(t)
    c_t = diffusion.sample_labels(c0, sigma, torch.Generator().manual_seed(0))
    loss = score_entropy(model(x, c_t, sigma.float()), c_t, sigma, dsigma, labels=c0).mean()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_one_channel_groupnorm_groups_cancel_additive_conditioning():
    # Why conditioned_stages=2 loses nothing in the narrow (width 16) study net: its first two stages have one
    # channel per GroupNorm group, and normalizing a channel over its own map removes any per-channel bias.
    torch.manual_seed(0)
    model = timm.create_model("didirn18", num_classes=K, in_chans=1, width=16, stem="imagenet").eval()
    _randomize_zero_inits(model)
    x, c, sigma = _inputs(4, 1, 28)
    with torch.no_grad():
        before = model(x, c, sigma)
        for stage in model.stages[:2]:
            assert all(block.out_norm.num_groups == block.out_norm.num_channels for block in stage)
            for block in stage:
                block.cond.proj.weight.normal_(std=5.0), block.cond.proj.bias.normal_(std=5.0)
        torch.testing.assert_close(model(x, c, sigma), before, rtol=1e-4, atol=1e-4)
        model.stages[2][0].cond.proj.bias.normal_(std=5.0)  # two channels per group: the bias matters
        assert not torch.allclose(model(x, c, sigma), before, rtol=1e-4, atol=1e-4)


# ---- the cost benchmark ------------------------------------------------------------------------------------
def test_frontier_benchmark_reports_every_option_with_flop_ratios():
    import importlib.util

    path = Path(__file__).parent.parent / "benchmarks" / "bench_models.py"
    spec = importlib.util.spec_from_file_location("bench_models", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    setting = dict(kwargs=dict(width=8, stem="small", in_chans=1), size=8, batch=2)
    result = bench.bench_frontier("tiny", setting, repeats=2)
    rows = {(row["option"], row["sampler"]): row for row in result["rows"]}
    samplers = [f"cp:{s}" for s in bench.FRONTIER_STEPS] + ["mean"]
    assert set(rows) == {(f"conditioned_stages={n}", s) for n in bench.FRONTIER_STAGES for s in samplers} | \
        {("twin", "classifier")}
    assert all(row["cost_vs_twin"] > 0 and len(row["seconds"]) == 2 for row in rows.values())
    one_step = rows[("conditioned_stages=4", "cp:1")]["flops_vs_twin"]
    for steps in bench.FRONTIER_STEPS:
        # FLOPs are exact: the official network pays S passes but the stem (run once), later options less
        flops = [rows[(f"conditioned_stages={n}", f"cp:{steps}")]["flops_vs_twin"] for n in (4, 2, 1)]
        assert 0.9 * steps * one_step <= flops[0] <= steps * one_step + 1e-9
        assert flops[0] >= flops[1] >= flops[2] >= 1.0
    assert "conditioned_stages=0" in bench.frontier_table([result])
