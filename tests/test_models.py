"""Tests for didicm.models: DiDiRN and twins (timm registry, kwargs, shapes, parameter counts), the reference
mask, the 'mean' closed form against matrix_exp, BackboneDiDiCM's single backbone pass, the factory, and a
few training steps of every model kind."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import didicm.models as models
from didicm.diffusion import CPSampler, LogLinearSchedule, UniformDiffusion, score_entropy
from didicm.errors import ConfigError, InputError

K = 10  # classes in the tiny tests
ALL_NAMES = models.DIDIRN_NAMES + models.TWIN_NAMES
DIDIRN50_PARAMS_K1000 = 27_705_384  # official DiDiRN-50 at K = 1000 ("about 27.7 M")
DIDIRN50_TWIN_PARAMS_K1000 = 25_579_560  # ResNet-50 (25,557,032) - 7,680 (3x3 stem) + 30,208 (GroupNorm affine)


def _batch(batch: int = 4, chans: int = 3, size: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, chans, size, size, generator=gen)
    c = torch.randint(0, K, (batch,), generator=gen)
    sigma = torch.rand(batch, generator=gen) * 3 + 0.05
    return x, c, sigma


def _randomize_head(model: nn.Module) -> None:
    """The output layers start at zero (all ratios 1); give them values so the tests see real outputs."""
    torch.manual_seed(1)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in ("fc", "proj"):
            nn.init.normal_(module.weight, std=0.5)
            nn.init.normal_(module.bias, std=0.5)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- registry and kwargs -----------------------------------------------------------------------------------
def test_registry_lists_all_ten_names():
    assert set(timm.list_models("didirn*")) == set(ALL_NAMES)
    assert len(ALL_NAMES) == 10


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_name_builds_with_timm_kwargs(name):
    model = timm.create_model(name, num_classes=7, in_chans=1, stem="small")
    assert model.num_classes == 7
    assert model.conv1.weight.shape == (64, 1, 3, 3)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 7
    assert model.pretrained_cfg["classifier"] == "fc"
    assert models.is_diffusion_model(model) == (not name.endswith("_twin"))
    if not name.endswith("_twin"):
        assert model.embed.label_embed.num_embeddings == 7


@pytest.mark.parametrize("stem, sizes", [("imagenet", (8, 1)), ("small", (16, 2))])
def test_stem_sets_feature_map_size(stem, sizes):
    """The 'imagenet' stem halves the input with a max-pool, 'small' keeps it: 16 px -> 8 or 16 at stage 1."""
    model = timm.create_model("didirn18_twin", num_classes=K, stem=stem).eval()
    x = torch.randn(2, 3, 16, 16)
    stem_out = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    assert stem_out.shape[-1] == sizes[0]
    assert model.forward_features(x).shape == (2, 512, sizes[1], sizes[1])


def test_options_are_validated():
    with pytest.raises(ConfigError, match="stem"):
        timm.create_model("didirn18", stem="huge")
    with pytest.raises(ConfigError, match="parametrization"):
        timm.create_model("didirn18", parametrization="logits")
    with pytest.raises(ConfigError, match="conditioning"):
        timm.create_model("didirn18", conditioning="concat")
    with pytest.raises(ConfigError, match="condition_inputs"):
        timm.create_model("didirn18", condition_inputs=False)  # a score network must see (c, sigma)
    with pytest.raises(ConfigError, match="pretrained"):
        timm.create_model("didirn18", pretrained=True)
    model = timm.create_model("didirn18", num_classes=K, in_chans=1)
    x, c, sigma = _batch(chans=3)
    with pytest.raises(InputError, match="in_chans"):
        model(x, c, sigma)
    with pytest.raises(InputError, match="c must be"):
        model(x[:, :1], c[:2], sigma)
    with pytest.raises(InputError, match="outside"):
        model(x[:, :1], c + K, sigma)


# ---- parameter counts and the twin ---------------------------------------------------------------------------
def test_didirn50_parameter_count_matches_official():
    assert _params(timm.create_model("didirn50", num_classes=1000)) == DIDIRN50_PARAMS_K1000
    assert _params(timm.create_model("didirn50_twin", num_classes=1000)) == DIDIRN50_TWIN_PARAMS_K1000
    assert _params(timm.create_model("resnet50", num_classes=1000)) == 25_557_032


@pytest.mark.parametrize("name", ["didirn18", "didirn50"])
def test_twin_is_the_backbone_without_conditioning(name):
    didirn = timm.create_model(name, num_classes=K)
    twin = timm.create_model(f"{name}_twin", num_classes=K)
    twin_shapes = {key: value.shape for key, value in twin.state_dict().items()}
    assert not any(key.startswith("embed.") or ".cond." in key for key in twin_shapes)
    backbone_shapes = {key: value.shape for key, value in didirn.state_dict().items()
                       if not (key.startswith("embed.") or ".cond." in key)}
    assert twin_shapes == backbone_shapes
    # Every block of the DiDiRN has its injection; the embedding is 256 -> 128 -> 128 plus a K x 128 table.
    blocks = [block for stage in didirn.stages for block in stage]
    assert all(block.cond is not None for block in blocks)
    conditioning = _params(didirn) - _params(twin)
    per_block = sum(129 * block.out_norm.num_channels for block in blocks)  # Linear(128, C) weight + bias
    assert conditioning == per_block + (256 * 128 + 128) + (128 * 128 + 128) + K * 128


# ---- forward shapes, masking, conditioning -------------------------------------------------------------------
@pytest.mark.parametrize("name, stem", [("didirn18", "small"), ("didirn18", "imagenet"), ("didirn50", "small")])
@pytest.mark.parametrize("parametrization", ["score", "mean"])
def test_didirn_shapes_and_reference_entry_is_zero(name, stem, parametrization):
    model = timm.create_model(name, num_classes=K, stem=stem, parametrization=parametrization).eval()
    _randomize_head(model)
    x, c, sigma = _batch()
    with torch.no_grad():
        log_score = model(x, c, sigma)
    assert log_score.shape == (4, K) and log_score.dtype == torch.float32
    assert torch.equal(log_score.gather(1, c.reshape(-1, 1)), torch.zeros(4, 1))
    if parametrization == "score":  # 'mean' values are checked against matrix_exp below
        others = log_score.scatter(1, c.reshape(-1, 1), float("nan"))
        assert (others[~others.isnan()].abs() > 1e-6).all()  # only the reference entry is pinned


def test_fresh_didirn_predicts_the_uniform_posterior():
    """Zero-initialised head: every log-ratio is 0, the exact score of the uniform distribution."""
    model = timm.create_model("didirn18", num_classes=K, stem="small").eval()
    x, c, sigma = _batch()
    with torch.no_grad():
        assert torch.equal(model(x, c, sigma), torch.zeros(4, K))
    assert not timm.create_model("didirn18", num_classes=K, zero_init_head=False).fc.weight.eq(0).all()


@pytest.mark.parametrize("conditioning", ["add", "film"])
def test_output_depends_on_label_and_sigma(conditioning):
    model = timm.create_model("didirn18", num_classes=K, stem="small", conditioning=conditioning).eval()
    _randomize_head(model)  # also gives 'film' (zero-initialised) projections non-zero weights
    x, c, sigma = _batch()
    with torch.no_grad():
        base = model(x, c, sigma)
        other_sigma = model(x, c, sigma + 1.0)
        # Compare raw outputs at a new label: undo the mask by comparing entries that neither label pins.
        other_label = model(x, (c + 1) % K, sigma)
        scalar_sigma = model(x, c, 0.7)
        vector_sigma = model(x, c, torch.full((4,), 0.7))
    assert (base - other_sigma).abs().max() > 1e-3
    free = torch.ones(4, K, dtype=torch.bool).scatter(1, c.reshape(-1, 1), False)
    free = free.scatter(1, ((c + 1) % K).reshape(-1, 1), False)
    # Log-ratios to different references differ by a per-row constant unless the label input matters.
    diff = (base - other_label)[free].reshape(4, K - 2)
    assert (diff.max(dim=1).values - diff.min(dim=1).values).max() > 1e-3
    assert torch.allclose(scalar_sigma, vector_sigma)


def test_twin_returns_logits():
    twin = timm.create_model("didirn18_twin", num_classes=K, in_chans=1, stem="small").eval()
    _randomize_head(twin)
    with torch.no_grad():
        logits = twin(torch.randn(3, 1, 16, 16))
    assert logits.shape == (3, K) and (logits.abs() > 0).all()
    twin.reset_classifier(4)
    assert twin(torch.randn(2, 1, 16, 16)).shape == (2, 4)


# ---- 'mean' parametrization ----------------------------------------------------------------------------------
def _matrix_exp_log_ratios(clean_logits: torch.Tensor, c: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Independent slow reference: p_t = expm(sigma Q) p0 with the full K x K uniform rate matrix, float64."""
    num_classes = clean_logits.shape[1]
    rate = (torch.ones(num_classes, num_classes, dtype=torch.float64)
            - num_classes * torch.eye(num_classes, dtype=torch.float64)) / num_classes
    p0 = torch.softmax(clean_logits.double(), dim=1)
    rows = []
    for p, s in zip(p0, sigma.double(), strict=True):
        rows.append(torch.linalg.matrix_exp(s * rate) @ p)
    log_pt = torch.log(torch.stack(rows))
    return log_pt - log_pt.gather(1, c.reshape(-1, 1))


@pytest.mark.parametrize("condition_inputs", [True, False])
def test_mean_parametrization_matches_matrix_exp(condition_inputs):
    model = timm.create_model("didirn18", num_classes=K, stem="small", parametrization="mean",
                              condition_inputs=condition_inputs).eval()
    _randomize_head(model)
    x, c, sigma = _batch()
    with torch.no_grad():
        log_score = model(x, c, sigma)
        logits = model.clean_logits(x, c, sigma)
    expected = _matrix_exp_log_ratios(logits, c, sigma)
    assert torch.allclose(log_score.double(), expected, atol=1e-5, rtol=1e-5)
    assert log_score.gather(1, c.reshape(-1, 1)).eq(0).all()


def test_mean_log_score_is_stable_at_the_extremes():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 100, generator=gen, dtype=torch.float64) * 30  # very sharp posteriors
    c = torch.randint(0, 100, (5,), generator=gen)
    sigma = torch.tensor([1e-7, 1e-3, 0.5, 5.0, 30.0], dtype=torch.float64)
    got = models.mean_log_score(logits, c, sigma)
    assert got.dtype == torch.float64 and torch.isfinite(got).all()
    assert torch.allclose(got, _matrix_exp_log_ratios(logits, c, sigma), atol=1e-8, rtol=1e-8)
    # sigma = 0: p_t = p0, so the ratios are those of the clean softmax.
    at_zero = models.mean_log_score(logits, c, torch.zeros(5, dtype=torch.float64))
    log_p0 = torch.log_softmax(logits, dim=1)
    assert torch.allclose(at_zero, log_p0 - log_p0.gather(1, c.reshape(-1, 1)))


def test_clean_logits_needs_mean_parametrization():
    with pytest.raises(ConfigError, match="mean"):
        timm.create_model("didirn18", num_classes=K).clean_logits(torch.randn(1, 3, 16, 16))


def test_unconditioned_mean_didirn_runs_the_network_once_per_cp_run():
    model = timm.create_model("didirn18", num_classes=K, stem="small", parametrization="mean",
                              condition_inputs=False).eval()
    _randomize_head(model)
    calls = []
    model.conv1.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(3, 3, 8, 8)
    sampler = CPSampler(UniformDiffusion(K, LogLinearSchedule()), steps=4)
    z = model.encode(x)
    probs = sampler.run(model.score, z)
    assert len(calls) == 1
    assert torch.allclose(probs, sampler.run(model, x), atol=1e-6)  # same answer as calling the net each step
    assert not any(".cond." in key or key.startswith("embed.") for key in model.state_dict())


# ---- BackboneDiDiCM ------------------------------------------------------------------------------------------
def test_backbone_wrapper_encodes_once_per_cp_run_and_forward_is_score_of_encode():
    model = models.BackboneDiDiCM("test_resnet", K, head_width=32).eval()
    _randomize_head(model)
    backbone_calls, head_calls = [], []
    model.backbone.register_forward_hook(lambda *args: backbone_calls.append(1))
    model.head.register_forward_hook(lambda *args: head_calls.append(1))
    x, c, sigma = _batch(size=16)
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (4, model.num_features)
        assert torch.equal(model(x, c, sigma), model.score(z, c, sigma))
        assert model.score(z, c, sigma).gather(1, c.reshape(-1, 1)).eq(0).all()
    backbone_calls.clear(), head_calls.clear()
    sampler = CPSampler(UniformDiffusion(K, LogLinearSchedule()), steps=5)
    probs = sampler.run(model.score, model.encode(x))
    assert len(backbone_calls) == 1 and len(head_calls) == 5
    assert probs.shape == (4, K) and torch.allclose(probs.sum(dim=1), torch.ones(4))
    assert torch.allclose(probs, sampler.run(model, x), atol=1e-6)
    assert len(backbone_calls) == 1 + 5  # calling the whole model instead costs a backbone pass per step


def test_backbone_wrapper_mean_and_options():
    model = models.BackboneDiDiCM("test_resnet", K, in_chans=1, parametrization="mean", head_width=32).eval()
    _randomize_head(model)
    x, c, sigma = _batch(chans=1, size=16)
    with torch.no_grad():
        got = model(x, c, sigma)
        logits = model.clean_logits(x, c, sigma)
    assert torch.allclose(got.double(), _matrix_exp_log_ratios(logits, c, sigma), atol=1e-5)
    assert model.pretrained_cfg["num_classes"] == K
    with pytest.raises(ConfigError, match="timm backbone"):
        models.BackboneDiDiCM("no_such_net", K)
    with pytest.raises(InputError, match="encode"):
        model.score(torch.randn(4, 3), c, sigma)


# ---- factory -------------------------------------------------------------------------------------------------
def test_factory_builds_every_kind():
    didirn = models.create("didirn18", K, in_chans=1, stem="small")
    assert isinstance(didirn, models.DiDiRN) and models.is_diffusion_model(didirn)
    twin = models.create("didirn34_twin", K, in_chans=1)
    assert isinstance(twin, models.DiDiRNTwin) and not models.is_diffusion_model(twin)
    wrapper = models.create("didicm:test_resnet", K, in_chans=1, head_width=16)
    assert isinstance(wrapper, models.BackboneDiDiCM) and wrapper.backbone_name == "test_resnet"
    assert models.is_diffusion_model(wrapper)
    baseline = models.create("resnet10t", K, in_chans=1)
    assert baseline.num_classes == K and not models.is_diffusion_model(baseline)
    assert baseline(torch.randn(2, 1, 32, 32)).shape == (2, K)
    with pytest.raises(ConfigError, match="didicm:<timm name>"):
        models.create("resnet9000", K)
    with pytest.raises(ConfigError, match="timm backbone"):
        models.create("didicm:resnet9000", K)
    with pytest.raises(ConfigError, match="pretrained"):
        models.create("resnet18", K, pretrained=True)


def test_is_diffusion_model_sees_through_wrappers():
    model = models.create("didirn18", K)
    assert models.is_diffusion_model(nn.DataParallel(model))
    assert not models.is_diffusion_model(nn.Linear(2, 2))


# ---- training: the loss falls for every model kind -----------------------------------------------------------
def _diffusion_loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Score entropy on a fixed draw of (t, c_t), so that the objective is a fixed function of the weights."""
    diffusion = UniformDiffusion(K, LogLinearSchedule())
    gen = torch.Generator().manual_seed(5)
    t = torch.rand(x.shape[0], generator=gen) * 0.9 + 0.05
    sigma, dsigma = diffusion.schedule(t)
    c_t = diffusion.sample_labels(y, sigma, generator=gen)
    return lambda: score_entropy(model(x, c_t, sigma), c_t, sigma, dsigma, labels=y).mean()


@pytest.mark.parametrize("kind", ["didirn18_small", "didirn18_film", "didirn18_mean", "didirn18_twin",
                                  "backbone", "backbone_mean"])
def test_a_few_steps_lower_the_loss(kind):
    torch.manual_seed(0)
    lr = 1e-3
    if kind == "backbone":
        model = models.create("didicm:test_resnet", K, head_width=32)
        lr = 3e-3
    elif kind == "backbone_mean":
        model = models.create("didicm:test_resnet", K, head_width=32, parametrization="mean",
                              condition_inputs=False)
        lr = 3e-3
    elif kind == "didirn18_twin":
        model = models.create("didirn18_twin", K, stem="small")
    else:
        options = dict(didirn18_small={}, didirn18_film=dict(conditioning="film"),
                       didirn18_mean=dict(parametrization="mean"))[kind]
        model = models.create("didirn18", K, stem="small", **options)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 3, 8, 8, generator=gen)  # tiny inputs: the small stem keeps 8 x 8 maps in stage 1
    y = torch.randint(0, K, (8,), generator=gen)
    if models.is_diffusion_model(model):
        loss_fn = _diffusion_loss_fn(model, x, y)
    else:
        loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    first = loss_fn().item()
    for _ in range(6):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    last = loss_fn().item()
    assert math.isfinite(first) and first > 0
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("name", ["didirn18", "didirn18_twin", "didirn50"])
def test_width_option_builds_narrow_variants(name):
    narrow = timm.create_model(name, num_classes=10, in_chans=1, width=16)
    full = timm.create_model(name, num_classes=10, in_chans=1)
    assert narrow.conv1.out_channels == 16 and full.conv1.out_channels == 64
    # every width halves per stage back from the last: 16 -> 128 (basic) or 512 (bottleneck) features
    assert narrow.num_features == full.num_features // 4
    # GroupNorm groups never exceed the channel count (16 channels -> 16 groups, official 32 otherwise)
    for module in narrow.modules():
        if isinstance(module, torch.nn.GroupNorm):
            assert module.num_groups == min(32, module.num_channels)
    x = torch.randn(2, 1, 28, 28)
    out = narrow(x) if name.endswith("_twin") else narrow(x, torch.tensor([1, 2]), torch.tensor([0.5, 1.0]))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="width"):
        timm.create_model(name, num_classes=10, width=0)
