"""The training loop: it learns, resumes bit-for-bit, skips non-finite steps, and stops on too many."""

import pytest
import torch

import didicm.training as training
from didicm.checkpoint import latest_checkpoint, load_checkpoint
from didicm.config import config_from_dict
from didicm.errors import ConfigError, DidicmError
from didicm.training import one_step

TINY = {
    "data": {"dataset": "digits", "val_size": 0.1},
    "model": {"name": "didicm:test_resnet"},
    "optim": {"opt": "adamw", "lr": 3e-3, "weight_decay": 0.0, "batch_size": 32, "steps": 12, "warmup_steps": 2},
    "eval": {"sampler": "cp", "steps": 2},
    "checkpoint_every": 4,
}


def _config(tmp_path, name="run", **sections):
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    values["output"] = str(tmp_path / name)
    return config_from_dict(values)


def _weights(path):
    return load_checkpoint(path).section("model")


def test_diffusion_model_learns_digits(tmp_path):
    cfg = _config(tmp_path, optim={"steps": 150, "lr": 5e-3}, eval={"steps": 4})
    result = training.train(cfg, progress=False, log=lambda *_: None)
    val = result.metrics["val"]["cp:4"]
    assert val["top1"] > 40.0  # chance is 10%
    assert len(val["step_top1"]) == 5
    assert (tmp_path / "run" / "model.safetensors").exists() and (tmp_path / "run" / "log.csv").exists()
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 1 + 15


def test_classifier_arm_learns_digits(tmp_path):
    cfg = _config(tmp_path, model={"name": "test_resnet"}, optim={"steps": 60, "lr": 5e-3})
    result = training.train(cfg, progress=False, log=lambda *_: None)
    assert result.diffusion is None
    assert result.metrics["val"]["classifier"]["top1"] > 40.0


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path):
    reference = training.train(_config(tmp_path, "straight"), progress=False, log=lambda *_: None)
    interrupted = _config(tmp_path, "interrupted")
    with pytest.raises(KeyboardInterrupt):
        training.train(interrupted, progress=False, log=lambda *_: None, fault_after_steps=6)
    assert latest_checkpoint(tmp_path / "interrupted").name == "step_00000004.safetensors"
    before = load_checkpoint(tmp_path / "interrupted" / "checkpoints" / "step_00000004.safetensors").meta
    resumed = training.train(interrupted, resume=True, progress=False, log=lambda *_: None)
    assert resumed.steps_done == 12
    # the training time counts the interrupted session too
    assert resumed.metrics["train_seconds"] > before["train_seconds"] > 0
    a = _weights(tmp_path / "straight" / "model.safetensors")
    b = _weights(tmp_path / "interrupted" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert reference.metrics["val"]["cp:2"]["top1"] == resumed.metrics["val"]["cp:2"]["top1"]


def test_resume_with_ema_and_mixup_is_exact(tmp_path):
    extra = {"optim": {"ema_decay": 0.9, "mixup": 0.2, "cutmix": 1.0, "steps": 8}}
    training.train(_config(tmp_path, "a", **extra), progress=False, log=lambda *_: None)
    cfg = _config(tmp_path, "b", **extra)
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, progress=False, log=lambda *_: None, fault_after_steps=5)
    training.train(cfg, resume=True, progress=False, log=lambda *_: None)
    a, b = _weights(tmp_path / "a" / "model.safetensors"), _weights(tmp_path / "b" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _nan_losses_at(monkeypatch, at_calls) -> dict:
    """DiDiCM's loss turns NaN on the given (1-based) calls; returns the call counter (set ["n"] = 0 to restart)."""
    real = one_step.diffusion_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in at_calls else loss

    monkeypatch.setattr(one_step, "diffusion_loss", sometimes_nan)
    return calls


def test_non_finite_losses_are_skipped_and_counted(tmp_path, monkeypatch):
    _nan_losses_at(monkeypatch, (3, 4, 7))
    result = training.train(_config(tmp_path), progress=False, log=lambda *_: None)
    assert result.bad_steps == 3
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values() if v.is_floating_point())


def test_a_network_that_outputs_nan_costs_a_skipped_step_not_the_run(tmp_path, monkeypatch):
    real_create = training.model_zoo.create
    calls = {"n": 0}

    def create_flaky(*args, **kwargs):
        model = real_create(*args, **kwargs)
        real_score = model.score

        def score(z, c, sigma):
            out = real_score(z, c, sigma)
            if model.training:
                calls["n"] += 1
                if calls["n"] in (2, 5):
                    return out * float("nan")
            return out

        model.score = score
        return model

    monkeypatch.setattr(training.model_zoo, "create", create_flaky)
    result = training.train(_config(tmp_path), progress=False, log=lambda *_: None)
    assert result.bad_steps == 2 and result.steps_done == 12


def test_training_stops_after_too_many_consecutive_bad_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(one_step, "diffusion_loss",
                        lambda *a, **k: torch.full((32,), float("inf"), requires_grad=True))
    cfg = _config(tmp_path, optim={"max_bad_steps": 3})
    with pytest.raises(training.TrainingError, match="3 consecutive non-finite losses"):
        training.train(cfg, progress=False, log=lambda *_: None)


def test_resume_refuses_a_different_model(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, progress=False, log=lambda *_: None, fault_after_steps=5)
    other = _config(tmp_path, model={"name": "didicm:test_convnext"})
    with pytest.raises(DidicmError, match="cannot resume"):
        training.train(other, resume=True, progress=False, log=lambda *_: None)


@pytest.mark.parametrize("section,key,value", [
    ("optim", "steps", 0), ("data", "data_ratio", 1.5), ("data", "data_ratio", 0.0), ("eval", "eps", 1.0),
    ("eval", "steps", -1), ("diffusion", "t_min", 0.0),
])
def test_invalid_options_are_refused_by_name(tmp_path, section, key, value):
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        _config(tmp_path, **{section: {key: value}})


def test_unknown_config_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrate'"):
        _config(tmp_path, optim={"lrate": 1.0})


@pytest.mark.parametrize("key,value", [("dist_bn", "mean"), ("channels_last", "yes")])
def test_invalid_runtime_options_are_refused_by_name(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key):
        _config(tmp_path, **{key: value})


def test_a_second_process_cannot_train_into_a_run_folder_in_use_and_a_dead_ones_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    cfg = _config(tmp_path, "locked")
    lock = tmp_path / "locked" / "train.lock"
    lock.parent.mkdir(parents=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(str(alive.pid))
        with pytest.raises(ConfigError, match=f"being trained by process {alive.pid}"):
            training.train(cfg, progress=False, log=lambda *_: None)
        assert lock.read_text() == str(alive.pid)  # the owner's lock is left alone
        assert latest_checkpoint(tmp_path / "locked") is None  # nothing was trained or written
        started = training.train_loop._process_start(alive.pid)
        if started is not None:  # Linux: the lock names its owner by PID and start time
            lock.write_text(f"{alive.pid} {started}")
            with pytest.raises(ConfigError, match=f"being trained by process {alive.pid}"):
                training.train(cfg, progress=False, log=lambda *_: None)
            # the same PID with another start time is a reused PID (say, after a restart): the lock is stale
            reused_lock = tmp_path / "reused" / "train.lock"
            reused_lock.parent.mkdir()
            reused_lock.write_text(f"{alive.pid} {int(started) + 1}")
            reused = training.train(_config(tmp_path, "reused"), progress=False, log=lambda *_: None)
            assert reused.steps_done > 0 and not reused_lock.exists()
    finally:
        alive.kill()
        alive.wait()
    # the owner is gone (killed): its lock is stale, training takes it over and removes it at the end
    result = training.train(cfg, progress=False, log=lambda *_: None)
    assert result.steps_done > 0 and not lock.exists()
    # a run that fails also releases the lock
    with pytest.raises(KeyboardInterrupt):
        training.train(_config(tmp_path, "faulty"), progress=False, log=lambda *_: None, fault_after_steps=1)
    assert not (tmp_path / "faulty" / "train.lock").exists()
