"""channels_last (timm's --channels-last): the weights train in NHWC, files stay ordinary, resume stays exact."""

import pytest
import timm
import torch

import didicm
import didicm.training as training
from didicm.checkpoint import load_checkpoint
from didicm.config import config_from_dict
from didicm.training.checkpointing import _match_state_layout, restore

TINY = {
    "data": {"dataset": "digits", "val_size": 0.1},
    "model": {"name": "didirn18", "kwargs": {"width": 8, "stem": "small"}},
    "optim": {"opt": "adamw", "lr": 3e-3, "weight_decay": 0.0, "batch_size": 32, "steps": 10, "warmup_steps": 2},
    "eval": {"sampler": "cp", "steps": 2},
    "checkpoint_every": 4,
}


def _config(tmp_path, name, **top):
    return config_from_dict({**TINY, **top, "output": str(tmp_path / name)})


def _nhwc_only(tensor: torch.Tensor) -> bool:
    """Laid out NHWC and not NCHW (a 3x3 weight with several input channels tells the two apart)."""
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def _quiet(*_):
    pass


def test_channels_last_trains_nhwc_weights_and_writes_files_any_model_loads(tmp_path):
    result = training.train(_config(tmp_path, "nhwc", channels_last=True), progress=False, log=_quiet)
    weights = {name: p for name, p in result.model.named_parameters() if p.ndim == 4 and p.shape[1] > 1
               and p.shape[-1] > 1}
    assert weights and all(_nhwc_only(p) for p in weights.values())

    saved = load_checkpoint(tmp_path / "nhwc" / "model.safetensors").section("model")
    assert all(t.is_contiguous() for t in saved.values())
    plain = timm.create_model("didirn18", num_classes=10, in_chans=1, width=8, stem="small")
    plain.load_state_dict(saved)
    plain.eval()
    result.model.eval()
    images, labels, sigma = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,)), torch.rand(5)
    with torch.no_grad():
        torch.testing.assert_close(plain(images, labels, sigma), result.model(images, labels, sigma),
                                   rtol=1e-5, atol=1e-5)


def test_eval_and_predict_load_a_channels_last_run_in_nhwc_with_the_same_predictions(tmp_path):
    from didicm.runtime import load_trained_model

    training.train(_config(tmp_path, "nhwc", channels_last=True), progress=False, log=_quiet)
    training.train(_config(tmp_path, "nchw"), progress=False, log=_quiet)
    nhwc, diffusion, _ = load_trained_model(tmp_path / "nhwc" / "model.safetensors")
    nchw, _, _ = load_trained_model(tmp_path / "nchw" / "model.safetensors")
    assert all(_nhwc_only(p) for p in nhwc.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1)
    assert all(p.is_contiguous() for p in nchw.parameters())
    # the library's load_model gives ordinary NCHW tensors unless asked for the trained layout, as eval does
    from didicm.interop import load_model
    library, _, _ = load_model(tmp_path / "nhwc")
    as_trained, _, _ = load_model(tmp_path / "nhwc", channels_last=None)
    assert all(p.is_contiguous() for p in library.parameters())
    assert all(_nhwc_only(p) for p in as_trained.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1)
    # the same weights in NCHW give the same CP output
    plain = timm.create_model("didirn18", num_classes=10, in_chans=1, width=8, stem="small").eval()
    plain.load_state_dict(nhwc.state_dict())
    images = torch.randn(6, 1, 8, 8)
    sampler = didicm.CPSampler(diffusion, steps=2)
    torch.testing.assert_close(sampler.run(nhwc, images), sampler.run(plain, images), rtol=1e-5, atol=1e-6)


def _fused(tmp_path, name, **top):
    """Fused AdamW (sync-free steps, also on CPU): it steps wrongly, silently, when a parameter's optimizer state
    has other strides than the parameter, as a checkpoint's contiguous state under NHWC weights would."""
    values = {**TINY, **top, "output": str(tmp_path / name)}
    values["optim"] = {**TINY["optim"], "sync_free": True}
    return config_from_dict(values)


def test_channels_last_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = training.train(_fused(tmp_path, "straight", channels_last=True), progress=False, log=_quiet)
    interrupted = _fused(tmp_path, "interrupted", channels_last=True)
    with pytest.raises(KeyboardInterrupt):
        training.train(interrupted, progress=False, log=_quiet, fault_after_steps=6)
    resumed = training.train(interrupted, resume=True, progress=False, log=_quiet)
    assert resumed.steps_done == 10
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_an_nchw_run_resumes_in_nhwc(tmp_path):
    nchw = _fused(tmp_path, "switch")
    with pytest.raises(KeyboardInterrupt):
        training.train(nchw, progress=False, log=_quiet, fault_after_steps=6)
    path = tmp_path / "switch" / "checkpoints" / "step_00000004.safetensors"
    saved = load_checkpoint(path)

    # what train() builds under channels_last, then restored from the NCHW run's checkpoint
    model = timm.create_model("didirn18", num_classes=10, in_chans=1, width=8, stem="small")
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    step = restore(path, model, optimizer, None, _fused(tmp_path, "switch", channels_last=True))[0]
    assert step == 4
    names = dict(model.named_parameters())
    assert any(_nhwc_only(p) for p in names.values())
    for name, param in names.items():
        assert _nhwc_only(param) or param.ndim < 4 or param.is_contiguous()
        assert torch.equal(param.detach(), saved.section("model")[name])
        for key in ("exp_avg", "exp_avg_sq"):
            state = optimizer.state[param][key]
            assert state.stride() == param.stride(), (name, key)

    resumed = training.train(_fused(tmp_path, "switch", channels_last=True), resume=True, progress=False,
                             log=_quiet)
    assert resumed.steps_done == 10
    assert all(torch.isfinite(t).all() for t in resumed.model.state_dict().values() if t.is_floating_point())


def test_optimizer_state_takes_its_parameters_layout_with_the_same_values():
    conv = torch.nn.Conv2d(4, 6, 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(conv.parameters())
    conv(torch.randn(2, 4, 5, 5)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    state["state"] = {i: {k: v.contiguous() for k, v in s.items()} for i, s in state["state"].items()}
    loaded = torch.optim.AdamW(conv.parameters())
    loaded.load_state_dict(state)
    assert not _nhwc_only(loaded.state[conv.weight]["exp_avg"])  # as a checkpoint gives it
    _match_state_layout(loaded)
    for key in ("exp_avg", "exp_avg_sq"):
        moved = loaded.state[conv.weight][key]
        assert moved.stride() == conv.weight.stride() and _nhwc_only(moved)
        assert torch.equal(moved, optimizer.state[conv.weight][key])
    assert loaded.state[conv.weight]["step"].shape == ()  # not a per-parameter tensor: left alone
