"""timm's model conventions on the models didicm registers (issue 14).

Two layers:
- our own checks, always run: device/dtype keywords, default_cfg/pretrained_cfg, feature_info with
  features_only=True, forward_intermediates, FX tracing (twins and DiDiRN), headless/pool-less twins;
- timm's own tests/test_models.py (from the source distribution of the installed timm), run on our model
  names when that file is available: set TIMM_TESTS_DIR to the sdist's tests/ folder, or run
  scripts/timm_model_tests.sh, which downloads the sdist (`pip download --no-binary :all: timm==<version>`)
  and runs this file. TorchScript is out of scope (the models use Python control flow on module options).

Small inputs (the tests' own size rules) and the 18-layer models keep this under a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import timm
import torch

import didicm.models  # noqa: F401  (registers didirn*)
from didicm.errors import ConfigError

# timm's tests on the basic-block twin by default; DIDICM_TIMM_TESTS_FULL=1 adds the bottleneck one (minutes)
TWINS = ["didirn18_twin"] + (["didirn50_twin"] if os.environ.get("DIDICM_TIMM_TESTS_FULL") else [])
SMALL = dict(width=8)


# ---- our checks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["didirn18", "didirn18_twin"])
def test_device_and_dtype_keywords(name):
    model = timm.create_model(name, num_classes=7, device="meta", dtype=torch.float64)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert {t.device.type for t in tensors.values()} == {"meta"}
    assert {t.dtype for n, t in tensors.items() if t.is_floating_point()} == {torch.float64}
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) and model.default_cfg is model.pretrained_cfg
    with pytest.raises(TypeError):
        timm.create_model(name, not_a_model_arg=1)


def test_features_only_and_forward_intermediates_of_the_twin():
    model = timm.create_model("didirn18_twin", features_only=True, **SMALL).eval()
    assert model.feature_info.channels() == [8, 8, 16, 32, 64]
    assert model.feature_info.reduction() == [1, 2, 4, 8, 16]
    maps = model(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape[-2:]) for m in maps] == [(64 // r, 64 // r) for r in model.feature_info.reduction()]
    full = timm.create_model("didirn18_twin", num_classes=3, **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    final, taps = full.forward_intermediates(x)
    torch.testing.assert_close(final, full.forward_features(x))
    late = full.forward_intermediates(x, indices=[2], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(late[0], taps[2])


def test_small_stem_feature_info_matches_the_maps():
    model = timm.create_model("didirn18_twin", features_only=True, stem="small", **SMALL).eval()
    maps = model(torch.randn(1, 3, 32, 32))
    assert [m.shape[-1] for m in maps] == [32 // r for r in model.feature_info.reduction()] == [32, 32, 16, 8, 4]


def test_didirn_features_need_the_condition():
    with pytest.raises(ConfigError, match="_twin"):
        timm.create_model("didirn18", features_only=True)
    model = timm.create_model("didirn18", num_classes=4, zero_init_head=False, **SMALL).eval()
    x, c = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    final, taps = model.forward_intermediates(x, c, 0.5)
    assert len(taps) == 5 and taps[-1] is final
    _, other = model.forward_intermediates(x, torch.tensor([1, 2]), 0.5)
    assert torch.equal(taps[0], other[0]) and not torch.allclose(taps[4], other[4])  # the stem ignores c


@pytest.mark.parametrize("kwargs", [{}, {"parametrization": "mean"}, {"conditioned_stages": 2}])
def test_didirn_forward_is_fx_traceable(kwargs):
    model = timm.create_model("didirn18", num_classes=4, zero_init_head=False, **SMALL, **kwargs).eval()
    traced = torch.fx.symbolic_trace(model)
    x, c, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0, 3]), torch.tensor([0.1, 2.0])
    torch.testing.assert_close(traced(x, c, sigma), model(x, c, sigma))


def test_twin_fx_feature_extraction_and_headless_variants():
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = timm.create_model("didirn18_twin", num_classes=5, zero_init_head=False, **SMALL).eval()
    _, nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, return_nodes={nodes[-1]: "out"})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(extractor(x)["out"], model(x))
    assert timm.create_model("didirn18_twin", num_classes=0, **SMALL)(x).shape == (2, 64)
    assert timm.create_model("didirn18_twin", num_classes=0, global_pool="", **SMALL)(x).shape == (2, 64, 2, 2)
    with pytest.raises(ConfigError, match="num_classes=0"):
        timm.create_model("didirn18_twin", global_pool="", **SMALL)(x)
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), extractor(x)["out"])


# ---- timm's own tests ------------------------------------------------------------------------------------------


def _timm_tests_dir() -> Path | None:
    candidates = [os.environ.get("TIMM_TESTS_DIR"), f"/tmp/timm_sdist/timm-{timm.__version__}/tests"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "test_models.py").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def timm_tests():
    folder = _timm_tests_dir()
    if folder is None:
        pytest.skip(f"timm {timm.__version__}'s tests/test_models.py not found: set TIMM_TESTS_DIR or run "
                    "scripts/timm_model_tests.sh")
    spec = importlib.util.spec_from_file_location("timm_test_models", folder / "test_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # collects nothing: the parametrized functions are called directly below
    return module


# The tests of test_models.py that apply to a plain image classifier (TorchScript aside), with their arguments.
TIMM_TESTS = [
    ("test_model_forward", dict(batch_size=1)),
    ("test_model_backward", dict(batch_size=2)),
    ("test_model_default_cfgs", dict(batch_size=1, cfg_device="meta")),
    ("test_model_forward_features", dict(batch_size=1)),
    ("test_model_forward_intermediates_features", dict(batch_size=1)),
    ("test_model_forward_intermediates", dict(batch_size=1)),
    ("test_model_forward_fx", dict(batch_size=1)),
    ("test_model_backward_fx", dict(batch_size=2)),
    ("test_prune_intermediate_layers_contract", dict()),
]


@pytest.mark.parametrize("name", TWINS)
@pytest.mark.parametrize("test", [t for t, _ in TIMM_TESTS])
def test_timm_model_tests_pass_on_twins(timm_tests, test, name):
    getattr(timm_tests, test)(model_name=name, **dict(TIMM_TESTS)[test])
