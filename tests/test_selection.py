"""Model selection on validation: the rule (patience, plateau decay), and training that keeps the best
validation's weights, stops by patience and resumes to the same decisions."""

import json

import pytest
import torch

import didicm.training as training
from didicm.checkpoint import load_checkpoint
from didicm.config import config_from_dict
from didicm.errors import ConfigError
from didicm.selection import Selection, selection_scores

SELECTED = {
    "data": {"dataset": "digits", "val_size": 0.1, "data_ratio": 0.2},
    "model": {"name": "test_resnet"},
    "optim": {"opt": "adamw", "lr": 2e-2, "weight_decay": 0.0, "batch_size": 32, "epochs": 6, "warmup_steps": 2,
              "sched": "plateau", "patience": 2, "lr_patience": 1},
    "eval": {"select": "nll_ts"},
    "checkpoint_every": 1000,
}


def _config(tmp_path, name, **optim):
    values = json.loads(json.dumps(SELECTED))
    values["optim"].update(optim)
    values["output"] = str(tmp_path / name)
    return config_from_dict(values)


def test_patience_and_plateau_decay_count_validations_since_the_best():
    rule = Selection("nll", patience=3, lr_patience=2, lr_decay=0.5)
    values = [1.0, 0.8, 0.9, 0.85, 0.7, 0.75, 0.72, 0.71]
    improved = [rule.update(step, step / 10, {"nll": v}) for step, v in enumerate(values)]
    assert improved == [True, True, False, False, True, False, False, False]
    assert rule.best_step == 4 and rule.best_value == 0.7
    # two misses after 0.8 halve the rate once; two more after 0.7 halve it again
    assert rule.lr_scale == 0.25
    assert rule.should_stop
    again = Selection.from_state(json.loads(json.dumps(rule.state_dict())))
    assert again == rule


def test_min_delta_keeps_better_weights_but_only_a_real_improvement_restarts_the_counts():
    # nll creeping down by 0.002 a validation: noise-sized gains that, without a margin, never let patience end
    values = [1.0, 0.7, 0.698, 0.696, 0.694, 0.692, 0.690, 0.688]
    plain = Selection("nll", patience=3, lr_patience=2, lr_decay=0.5)
    for step, v in enumerate(values):
        plain.update(step, step, {"nll": v})
    assert not plain.should_stop and plain.lr_scale == 1.0

    rule = Selection("nll", patience=3, lr_patience=2, lr_decay=0.5, min_delta=0.01)
    improved = [rule.update(step, step, {"nll": v}) for step, v in enumerate(values[:5])]
    assert improved == [True] * 5  # every gain still replaces the kept weights ...
    assert rule.best_step == 4 and rule.best_value == 0.694
    assert rule.should_stop and rule.lr_scale == 0.5  # ... but none beyond 0.01 of 0.7 restarted the counts
    # a gain beyond the margin from the reference (0.7) does restart them
    again = Selection("nll", patience=3, min_delta=0.01)
    for step, v in enumerate([1.0, 0.7, 0.695, 0.689, 0.688]):
        again.update(step, step, {"nll": v})
    assert again.reference == 0.689 and again.since_best == 1
    # higher-is-better metrics use the margin the other way
    top1 = Selection("top1", patience=1, min_delta=0.5)
    top1.update(0, 0, {"top1": 80.0})
    assert top1.update(1, 1, {"top1": 80.3}) and top1.should_stop
    # a checkpoint from before min_delta existed resumes with its best value as the reference
    state = rule.state_dict()
    state.pop("min_delta"), state.pop("reference")
    old = Selection.from_state(state)
    assert old.min_delta == 0.0 and old.reference is None
    assert not old.update(9, 9, {"nll": 0.694}) and old.since_best == rule.since_best + 1
    assert old.update(10, 10, {"nll": 0.6939}) and old.since_best == 0 and old.reference == 0.6939
    with pytest.raises(ConfigError, match="min_delta"):
        Selection("nll", min_delta=-0.1)


def test_a_resumed_run_keeps_its_counts_but_follows_the_configs_rule_and_says_what_changed():
    saved = Selection("nll", patience=3, lr_patience=2)
    for step, v in enumerate([1.0, 0.8, 0.9, 0.85]):
        saved.update(step, step, {"nll": v})
    state = json.loads(json.dumps(saved.state_dict()))
    same, changed = Selection.from_state(state).resumed_with(Selection("nll", patience=3, lr_patience=2))
    assert changed == [] and same == saved
    longer, changed = Selection.from_state(state).resumed_with(Selection("nll", patience=6, lr_patience=2,
                                                                         min_delta=0.01))
    assert changed == ["patience 6 (the checkpoint had 3)", "min_delta 0.01 (the checkpoint had 0.0)"]
    assert (longer.best_value, longer.since_best, longer.lr_scale) == (0.8, 2, saved.lr_scale)
    longer.update(4, 4, {"nll": 0.9})
    assert not longer.should_stop  # 3 misses: enough to stop under the old patience, not under the new one
    with pytest.raises(ConfigError, match="selected by 'nll'"):
        Selection.from_state(state).resumed_with(Selection("top1"))


def test_top1_selection_prefers_higher_values():
    rule = Selection("top1")
    assert rule.update(1, 0.1, {"top1": 50.0}) and rule.update(2, 0.2, {"top1": 60.0})
    assert not rule.update(3, 0.3, {"top1": 55.0}) and rule.best_step == 2 and not rule.should_stop


def test_selection_scores_include_the_temperature_scaled_nll():
    torch.manual_seed(0)
    logits = torch.randn(500, 5) * 4
    labels = torch.distributions.Categorical(logits=logits / 4).sample()  # overconfident by 4x
    scores = selection_scores(logits.softmax(1), labels)
    assert 3.0 < scores["T"] < 5.5
    assert scores["nll_ts"] < scores["nll"] and scores["ece_ts"] < scores["ece"]


def test_min_delta_reaches_the_rule_from_the_config_and_bad_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match="optim.min_delta"):
        _config(tmp_path, "bad", min_delta=-1.0)
    with pytest.raises(ConfigError, match="optim.min_delta"):
        _config(tmp_path, "nan", min_delta=float("nan"))
    # a margin no validation can beat: the counts run from the first validation, so training stops after
    # patience (2) validations, where without it the run goes on while nll_ts improves
    result = training.train(_config(tmp_path, "margin", min_delta=100.0), progress=False, log=lambda *_: None)
    history = result.metrics["selection"]["history"]
    selection = result.metrics["selection"]
    assert len(history) == 3 and selection["min_delta"] == 100.0
    assert selection["stopped_early"] and selection["converged"]  # stopped by patience, even after a small gain


@pytest.mark.parametrize("optim, message", [({"patience": 2}, "eval.select"), ({"sched": "plateau"}, "eval.select")])
def test_validation_rules_need_a_selection_metric(tmp_path, optim, message):
    values = json.loads(json.dumps(SELECTED))
    values["eval"] = {}
    values["optim"] = {"patience": 0, **optim}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_training_keeps_the_best_validation_and_resumes_to_the_same_decisions(tmp_path):
    straight = training.train(_config(tmp_path, "straight"), progress=False, log=lambda *_: None)
    chosen = straight.metrics["selection"]
    history = chosen["history"]
    per_epoch = straight.metrics["steps_per_epoch"]
    # validated once an epoch; the kept model is the best validation's
    assert [h["step"] for h in history] == [per_epoch * (i + 1) for i in range(len(history))]
    best = min(history, key=lambda h: h["nll_ts"])
    assert chosen["best_step"] == best["step"]
    assert chosen["converged"] == (best["step"] < straight.steps_done)
    assert chosen["stopped_early"] == (straight.steps_done < 6 * per_epoch)
    kept = load_checkpoint(tmp_path / "straight" / "model.safetensors").section("model")
    best_file = load_checkpoint(tmp_path / "straight" / "best.safetensors")
    assert best_file.meta["step"] == best["step"]
    for key, value in best_file.section("model").items():
        assert torch.equal(kept[key], value), key

    cfg = _config(tmp_path, "interrupted")
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, progress=False, log=lambda *_: None, fault_after_steps=per_epoch + 3)
    resumed = training.train(cfg, resume=True, progress=False, log=lambda *_: None)
    assert resumed.metrics["selection"]["history"] == history
    assert resumed.steps_done == straight.steps_done
    # validation time is counted over both sessions and is part of the training time
    for run in (straight, resumed):
        assert 0 < run.metrics["selection"]["validation_seconds"] < run.metrics["train_seconds"]
    again = load_checkpoint(tmp_path / "interrupted" / "model.safetensors").section("model")
    for key in kept:
        assert torch.equal(kept[key], again[key]), key


def test_validation_time_adds_up_and_is_unknown_after_resuming_a_run_that_did_not_count_it():
    selection = Selection("nll_ts")
    selection.add_time(1.5)
    selection.add_time(2.0)
    assert Selection.from_state(selection.state_dict()).validation_seconds == 3.5
    older = {k: v for k, v in selection.state_dict().items() if k != "validation_seconds"}
    unknown = Selection.from_state(older)
    unknown.add_time(1.0)
    assert unknown.validation_seconds is None  # not 1.0: the earlier sessions' time is missing
