"""The Diffusion Classifier as an arm of the study (issue 12, item 8): its UNet at any input size, selected on the
held-out denoising loss, EMA with warm-up, its error scale fit on validation with the draws it predicts with, and a
study whose dc row has the full test set's probabilities like every other row."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import didicm.training as training
from didicm import peers
from didicm.checkpoint import load_checkpoint
from didicm.cli import main
from didicm.config import config_from_dict
from didicm.errors import ConfigError
from didicm.models import ConditionalUNet
from didicm.objectives import heldout_epsilon_loss

THREE_LEVELS = {"channels": (16, 32, 32), "norm_groups": 8, "timesteps": 200}


@pytest.mark.parametrize("side", [7, 14, 6, 8])
def test_the_unet_takes_sides_its_levels_cannot_halve_by_padding_and_cropping(side):
    torch.manual_seed(0)
    model = ConditionalUNet(3, in_chans=1, **THREE_LEVELS).eval()
    x = torch.randn(2, 1, side, side)
    t, labels = torch.tensor([5, 150]), torch.tensor([0, 3])
    out = model(x, t, labels)
    assert out.shape == x.shape
    # the same as running the UNet on the zero-padded image (sides up to a multiple of 4) and cropping
    pad = -side % 4
    top = pad // 2
    padded = F.pad(x, (top, pad - top, top, pad - top))
    with torch.no_grad():
        reference = model.unet(padded, t, class_labels=labels).sample[..., top:top + side, top:top + side]
    assert torch.allclose(out, reference, atol=1e-6)
    errors, _ = peers.classify(model, x, draws=2, generator=torch.Generator().manual_seed(0))
    assert errors.shape == (2, 3) and torch.isfinite(errors).all()


def test_heldout_loss_scores_fixed_stratified_draws_with_the_true_label():
    torch.manual_seed(0)
    model = ConditionalUNet(3, in_chans=1, **THREE_LEVELS).eval()
    images, labels = torch.randn(8, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    calls = []
    original = model.forward
    model.forward = lambda noisy, t, c: calls.append((t.clone(), c.clone())) or original(noisy, t, c)
    first = heldout_epsilon_loss(model, images, labels, torch.Generator().manual_seed(3))
    again = heldout_epsilon_loss(model, images, labels, torch.Generator().manual_seed(3))
    assert first.shape == (8,) and torch.equal(first, again)  # the same draws every validation
    t, seen = calls[0]
    assert torch.equal(seen, labels)  # conditional, no label dropout
    assert sorted((t * 8 // 200).tolist()) == list(range(8))  # one t in each eighth of the chain
    with torch.no_grad():
        model.unet.conv_out.bias.add_(0.5)  # other weights, other loss on the same draws
    assert not torch.equal(heldout_epsilon_loss(model, images, labels, torch.Generator().manual_seed(3)), first)


UNET = {
    "data": {"dataset": "digits", "val_size": 0.1, "data_ratio": 0.3},
    "model": {"name": "unet", "kwargs": {"channels": [16, 32], "timesteps": 200}},
    "optim": {"opt": "adamw", "lr": 3e-3, "weight_decay": 0.0, "batch_size": 32, "epochs": 5, "warmup_steps": 2,
              "sched": "plateau", "lr_patience": 1, "patience": 2, "ema_decay": 0.99, "ema_warmup": True},
    "eval": {"select": "loss", "sampler": "dc", "steps": 3, "batch_size": 64},
    "checkpoint_every": 1000,
}


def _config(tmp_path, name, **sections):
    values = json.loads(json.dumps(UNET))
    for key, value in sections.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    values["output"] = str(tmp_path / name)
    return config_from_dict(values)


def test_unet_selected_on_the_heldout_loss_keeps_the_best_and_resumes_to_the_same_decisions(tmp_path):
    quiet = dict(progress=False, log=lambda *_: None)
    straight = training.train(_config(tmp_path, "straight"), **quiet)
    chosen = straight.metrics["selection"]
    history = chosen["history"]
    assert chosen["metric"] == "loss" and len(history) >= 2
    assert all(set(h) == {"step", "epoch", "lr_scale", "loss"} for h in history)
    best = min(history, key=lambda h: h["loss"])
    assert chosen["best_step"] == best["step"]
    # the final check and the error scale use the draws of eval.sampler dc / eval.steps
    assert set(straight.metrics["val"]) == {"dc:3"} and straight.metrics["val"]["dc:3"]["evaluations_per_image"] == 30
    kept = load_checkpoint(tmp_path / "straight" / "model.safetensors").section("model")
    assert kept["error_scale_fitted"] and kept["error_scale"].item() != 1.0
    best_file = load_checkpoint(tmp_path / "straight" / "best.safetensors")
    assert best_file.meta["step"] == best["step"]
    for key, value in best_file.section("model").items():
        if not key.startswith("error_scale"):  # fit after training, on the kept weights
            assert torch.equal(kept[key], value), key

    cfg = _config(tmp_path, "interrupted")
    per_epoch = straight.metrics["steps_per_epoch"]
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, fault_after_steps=per_epoch + 2, **quiet)
    resumed = training.train(cfg, resume=True, **quiet)
    assert resumed.metrics["selection"]["history"] == history
    again = load_checkpoint(tmp_path / "interrupted" / "model.safetensors").section("model")
    for key in kept:
        assert torch.equal(kept[key], again[key]), key


def test_ema_warmup_lets_the_average_follow_the_weights_early(tmp_path):
    runs = {}
    for warmup in (False, True):
        cfg = _config(tmp_path, f"warmup{warmup}", optim={"ema_decay": 0.999, "ema_warmup": warmup, "epochs": None,
                                                        "steps": 12, "sched": "cosine", "patience": 0,
                                                        "lr_patience": 0},
                      eval={"select": None, "steps": 1})
        training.train(cfg, progress=False, log=lambda *_: None)
        state = load_checkpoint(sorted((tmp_path / f"warmup{warmup}" / "checkpoints").glob("step_*.safetensors"))[-1])
        runs[warmup] = state.section("model"), state.section("ema")
    (model_a, ema_a), (model_b, ema_b) = runs[False], runs[True]
    key = "unet.conv_in.weight"
    assert torch.equal(model_a[key], model_b[key])  # EMA never changes training itself

    def lag(model, ema):
        return (model[key] - ema[key]).norm().item()

    # 0.999 without warm-up: after 12 steps the average is still ~99% the second step's weights; the warm-up's
    # decay 1 - (1 + step)^-3/4 (0.41 to 0.83 over these steps) lets it follow the weights
    assert lag(model_b, ema_b) < 0.5 * lag(model_a, ema_a)


@pytest.mark.parametrize("changes, message", [
    ({"model": {"name": "test_resnet", "kwargs": {}}}, "eval.select 'loss'.*generative 'unet'"),
    ({"model": {"name": "test_resnet", "kwargs": {}}, "eval": {"select": "nll"}}, "eval.sampler 'dc'"),
    ({"optim": {"ema_decay": None}}, "ema_warmup needs optim.ema_decay"),
])
def test_generative_only_options_are_refused_elsewhere(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        training.train(_config(tmp_path, "refused", **changes), progress=False, log=lambda *_: None)


STUDY = {
    "dataset": "digits", "native_resolution": 8, "protocol": "resize", "resolutions": [8, 6],
    "data_ratios": [1.0, 0.5], "seeds": [0], "epochs": {1.0: 2, 0.5: 3}, "cl_limit": 40,
    "ood": {"count": 30, "noise": 0.5},
    "base": {"data": {"val_size": 0.1},
             "optim": {"opt": "adamw", "lr": 5e-3, "batch_size": 64, "warmup_steps": 2, "sched": "plateau",
                       "lr_patience": 1, "patience": 2},
             "eval": {"select": "nll_ts", "steps": 2, "batch_size": 256},
             "checkpoint_every": 1000},
    "arms": {
        "twin": {"where": "extremes", "model": {"name": "test_resnet"}, "predict": {"twin": "classifier"}},
        "didicm": {"where": "extremes", "model": {"name": "didicm:test_resnet"}, "predict": {"didicm": "cp:2"}},
        "dc": {"where": "extremes",
               "model": {"name": "unet", "kwargs": {"channels": [16, 32, 32], "timesteps": 100}},
               "optim": {"lr": 3e-3, "weight_decay": 0.0, "ema_decay": 0.99, "ema_warmup": True},
               "eval": {"select": "loss", "sampler": "dc", "steps": 3},
               "predict": {"dc": "dc:3", "dc_adaptive": "dc:4:adaptive"}},
    },
}


@pytest.fixture(scope="module")
def dc_study(tmp_path_factory):
    """The tiny study above run once (about a minute on a CPU core), without aggregation."""
    root = tmp_path_factory.mktemp("dc_study")
    spec = dict(STUDY, output=str(root / "results"), runs=str(root / "runs"))
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert main(["study", str(config), "--no-progress", "--no-aggregate"]) == 0
    return config, root / "results"


def test_a_study_with_a_diffusion_classifier_arm_saves_its_full_test_probabilities_like_every_row(dc_study):
    _, out = dc_study
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    assert sorted((c["resolution"], c["data_ratio"]) for c in cells) == [(6, 0.5), (8, 1.0)]  # where: extremes
    for cell in cells:
        name = f"res{cell['resolution']}_ratio{cell['data_ratio']:g}_seed0"
        arrays = np.load(out / "predictions" / f"{name}.npz")
        arm = cell["arms"]["dc"]
        assert arm["model"] == "unet" and arm["select"] == "loss" and arm["epochs_run"] >= arm["best_epoch"] > 0
        test_labels = arrays["test_labels"].astype(np.int64)
        for row in ("dc", "dc_adaptive"):
            test, val = arrays[f"test_{row}"], arrays[f"val_{row}"]
            assert test.dtype == np.float16 and test.shape == (len(test_labels), 10)  # the whole test split
            assert val.shape == (len(arrays["val_labels"]), 10) and arrays[f"digits_{row}"].shape == (30, 10)
            info = cell["rows"][row]
            assert info["count"] == len(test_labels) == cell["rows"]["twin"]["count"]
            # the same numbers as every row: from the saved arrays, temperature fitted on validation
            top1 = 100.0 * np.mean(test.astype(np.float32).argmax(1) == test_labels)
            assert info["top1"] == pytest.approx(top1, abs=1e-6)
            assert {"T", "nll_ts", "ece_ts", "brier_ts", "auroc_digits_maxprob"} <= set(info)
        # the error scale was fit on validation images: the probabilities are not near-uniform
        assert arrays["test_dc"].astype(np.float32).max(1).mean() > 0.15


def test_the_study_aggregates_a_dc_arm(dc_study):
    from didicm.study import aggregate, load_study

    config, _ = dc_study
    study = aggregate(load_study(config), command="didicm study test")
    rows = {row for summary in study["summary"] for row in summary["rows"]}
    assert {"dc", "dc_adaptive", "twin", "didicm"} <= rows
    for cell in study["cells"]:
        assert cell["rows"]["dc"]["evaluations_per_image"] > cell["rows"]["dc_adaptive"]["evaluations_per_image"] > 1
