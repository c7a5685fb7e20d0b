"""The device-resident training path: batches gathered on the device from per-epoch orders, and sync-free steps
(a fused optimizer skips non-finite steps on the device; the loop reads the device only when it logs)."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# the training tests' tiny DiDiCM run on digits (12 steps of 32 images, checkpoints every 4)
from test_training import _config, _nan_losses_at, _weights  # noqa: E402

import didicm.training as training
from didicm.errors import ConfigError
from didicm.loader import TrainStream
from didicm.training import one_step


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 40), batch=st.integers(1, 24), world=st.integers(1, 4), repeats=st.integers(0, 3),
       step=st.integers(0, 30), data=st.data())
def test_device_indices_equal_the_per_item_stream(size, batch, world, repeats, step, data):
    rank = data.draw(st.integers(0, world - 1))
    stream = TrainStream(torch.zeros(size), batch, seed=7, rank=rank, world=world, repeats=repeats)
    expected = [index for index, _ in stream.indices(step)]
    assert stream.device_indices(step).tolist() == expected


def test_in_memory_batches_are_gathered_from_the_resident_set():
    from didicm.data import create_dataset
    data = create_dataset("digits", "train", val_size=0.1, augment=True)
    stream = TrainStream(data, 50, seed=3)
    images, labels = data.tensors()
    for step, (batch, target) in zip(range(30, 33), stream.batches(30, 33), strict=True):
        index = torch.tensor([i for i, _ in stream.indices(step)])  # the per-item definition of the stream
        assert torch.equal(target, labels[index])
        augment = data.batch_augment()
        from didicm.loader import mix_seed
        expected = augment(images[index], torch.Generator().manual_seed(mix_seed(3, 3, step, 0)))
        assert torch.equal(batch, expected)


@contextmanager
def _count_host_reads():
    """Count every read of a tensor's value by Python (item, tolist, bool, int, float, numpy) in the block."""
    counts = {"n": 0}
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(original):
        def wrapper(self, *args, **kwargs):
            counts["n"] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("model,sync_free", [("didicm:test_resnet", True), ("didicm:test_resnet", False),
                                             ("unet", True)])
def test_a_sync_free_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch, model, sync_free):
    reads = []
    real_call = one_step.Updater.__call__

    def counted_call(self, *args, **kwargs):
        with _count_host_reads() as counts:
            out = real_call(self, *args, **kwargs)
        reads.append(counts["n"])
        return out

    monkeypatch.setattr(one_step.Updater, "__call__", counted_call)
    real_batches = TrainStream.batches

    def counted_batches(self, start, stop):
        iterator = real_batches(self, start, stop)
        while True:
            with _count_host_reads() as counts:
                item = next(iterator, None)
            reads.append(counts["n"])
            if item is None:
                return
            yield item

    monkeypatch.setattr(TrainStream, "batches", counted_batches)
    # with augmentation: the batch gather, the augmentation and the model's loss (DiDiCM's noisy labels and score
    # entropy, or the generative UNet's epsilon loss) all run
    kwargs = {"channels": [16, 32], "timesteps": 200} if model == "unet" else {}
    cfg = _config(tmp_path, optim={"sync_free": sync_free}, data={"augment": True},
                  model={"name": model, "kwargs": kwargs})
    training.train(cfg, progress=False, log=lambda *_: None)
    assert len(reads) == 2 * 12 + 1  # [fetch 0, step 0, fetch 1, step 1, ..., the end of the stream]
    if sync_free:  # the first fetch draws epoch 0's order on the host (once per epoch); nothing else reads
        assert reads[0] >= 1 and sum(reads[1:]) == 0
    else:  # the checked step reads the loss (and the loss's input checks read their inputs)
        assert min(reads[1::2]) >= 1


def _checked_path_with_a_fused_optimizer(monkeypatch):
    """From now on train() builds the fused optimizer for the checked path too, so that the two paths can be
    compared bit for bit."""
    from didicm.training import train_loop
    real_create = train_loop.create_optimizer_v2
    monkeypatch.setattr(train_loop, "create_optimizer_v2", lambda *a, **k: real_create(*a, **{**k, "fused": True}))


def test_sync_free_skips_the_same_steps_as_the_checked_path(tmp_path, monkeypatch):
    calls = _nan_losses_at(monkeypatch, (3, 4, 7, 15, 16, 19))
    logs = []
    options = {"sync_free": True, "ema_decay": 0.9}  # the EMA must skip the same steps
    free = training.train(_config(tmp_path, "free", optim=options), progress=False, log=logs.append)
    _checked_path_with_a_fused_optimizer(monkeypatch)
    calls["n"] = 0
    checked = training.train(_config(tmp_path, "checked", optim={**options, "sync_free": False}), progress=False,
                             log=lambda *_: None)
    assert free.bad_steps == checked.bad_steps == 3
    assert free.metrics["bad_steps"] == 3
    assert any("3 steps with non-finite losses or gradients skipped" in line for line in logs)
    a, b = _weights(tmp_path / "free" / "model.safetensors"), _weights(tmp_path / "checked" / "model.safetensors")
    for key in a:  # a skipped step taken, or a good one dropped, would change the weights
        assert torch.equal(a[key], b[key]), key


def _nan_only_in_gradients(monkeypatch, at_calls):
    """A head that outputs NaN at the reference label c_t on some training calls: the model then masks that entry
    to exactly 0, so the loss is finite, while the backward pass carries the NaN into the weights' gradients."""
    real_create = training.model_zoo.create
    calls = {"n": 0}

    def create(*args, **kwargs):
        model = real_create(*args, **kwargs)
        real_forward = model.head.forward

        def forward(z, c, sigma):
            out = real_forward(z, c, sigma)
            if model.training:
                calls["n"] += 1
                if calls["n"] in at_calls:
                    return out * torch.ones_like(out).scatter(1, c.view(-1, 1), float("nan"))
            return out

        model.head.forward = forward
        return model

    monkeypatch.setattr(training.model_zoo, "create", create)


def test_sync_free_skips_a_step_whose_nan_reaches_only_the_gradients(tmp_path, monkeypatch):
    _nan_only_in_gradients(monkeypatch, at_calls=(2, 5))
    result = training.train(_config(tmp_path, optim={"sync_free": True}), progress=False, log=lambda *_: None)
    assert result.bad_steps == 2 and result.steps_done == 12
    for value in result.model.state_dict().values():
        assert torch.isfinite(value).all() if value.is_floating_point() else True
    # the checked path reads the gradients' norm too, and skips the same steps, bit for bit (same fused AdamW)
    _nan_only_in_gradients(monkeypatch, at_calls=(2, 5))
    _checked_path_with_a_fused_optimizer(monkeypatch)
    checked = training.train(_config(tmp_path, "checked", optim={"sync_free": False}), progress=False,
                             log=lambda *_: None)
    assert checked.bad_steps == 2
    a, b = _weights(tmp_path / "run" / "model.safetensors"), _weights(tmp_path / "checked" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_checkpoint_of_an_unfused_run_resumes_sync_free(tmp_path):
    # the optimizer's saved param groups say fused=None; the resumed run must still step the fused way
    cfg = _config(tmp_path, optim={"sync_free": False})
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, progress=False, log=lambda *_: None, fault_after_steps=5)
    resumed = _config(tmp_path, optim={"sync_free": True})
    result = training.train(resumed, resume=True, progress=False, log=lambda *_: None)
    assert result.steps_done == 12 and result.bad_steps == 0


def test_sync_free_stops_after_too_many_consecutive_bad_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(one_step, "diffusion_loss",
                        lambda *a, **k: torch.full((32,), float("inf"), requires_grad=True))
    cfg = _config(tmp_path, optim={"max_bad_steps": 3, "sync_free": True})
    with pytest.raises(training.TrainingError, match="10 consecutive non-finite losses or gradients at step 10"):
        training.train(cfg, progress=False, log=lambda *_: None)


def test_sync_free_resume_reproduces_the_uninterrupted_run(tmp_path):
    options = {"optim": {"sync_free": True, "ema_decay": 0.9}, "data": {"augment": True}}
    training.train(_config(tmp_path, "straight", **options), progress=False, log=lambda *_: None)
    cfg = _config(tmp_path, "interrupted", **options)
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, progress=False, log=lambda *_: None, fault_after_steps=6)
    training.train(cfg, resume=True, progress=False, log=lambda *_: None)
    a = _weights(tmp_path / "straight" / "model.safetensors")
    b = _weights(tmp_path / "interrupted" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a = (tmp_path / "straight" / "log.csv").read_text().splitlines()
    rows_b = (tmp_path / "interrupted" / "log.csv").read_text().splitlines()
    # the same log, row for row, across the resume: step, epoch, the smoothed loss (kept in the checkpoint), lr
    assert [r.split(",")[:4] for r in rows_a] == [r.split(",")[:4] for r in rows_b]


def test_sync_free_with_an_unfused_optimizer_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="optim.sync_free needs optim.opt"):
        training.train(_config(tmp_path, optim={"sync_free": True, "opt": "lamb"}), progress=False,
                       log=lambda *_: None)


def test_loss_meter_ignores_skipped_steps():
    meter = one_step.LossMeter()
    assert meter.value() is None
    for value in [float("nan"), 2.0, float("inf"), 4.0]:
        meter.update(torch.tensor(value))
    assert meter.value() == pytest.approx(0.95 * 2.0 + 0.05 * 4.0)
    assert np.isfinite(meter.value())
