"""The study on tiny data: every arm trained by one rule, predictions saved, every metric recomputable from
them, the report generated from the numbers, finished arms cached, and worker processes equal to a serial run."""

import json
import math
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from didicm.cli import main
from didicm.study import trajectory_scores

MODEL = {"kwargs": {}}
STUDY = {
    "dataset": "digits", "native_resolution": 8, "protocol": "resize", "resolutions": [8, 4],
    "data_ratios": [0.5], "seeds": [0, 1], "epochs": {0.5: 3}, "cl_limit": 40, "trajectories": 3,
    "ood": {"count": 50, "noise": 0.5},
    "base": {"data": {"val_size": 0.1},
             "optim": {"opt": "adamw", "lr": 5e-3, "batch_size": 64, "warmup_steps": 2, "sched": "plateau",
                       "lr_patience": 1, "patience": 2},
             "eval": {"select": "nll_ts", "steps": 2, "batch_size": 256},
             "checkpoint_every": 1000},
    "arms": {
        "twin": {"model": {"name": "test_resnet"}, "predict": {"twin": "classifier"}},
        "twin_aug": {"where": "hard", "model": {"name": "test_resnet"}, "data": {"augment": True},
                     "predict": {"twin_aug": "classifier", "twin_aug_tta2": "tta:2"}},
        "ensemble2": {"where": "extremes", "ensemble": {"of": "twin", "members": 2}},
        "didicm": {"model": {"name": "didicm:test_resnet"}, "trajectory": "didicm",
                   "predict": {"didicm": "cp:2", "didicm_cp1": "cp:1", "didicm_cl2x3": "cl:2x3"}},
    },
}


def _run(tmp_path, spec, *extra):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert main(["study", str(config), "--no-progress", *extra]) == 0
    return config


def _reference_temperature(probs, labels):
    """Grid search over T of the NLL of softmax(log p / T): slow and obviously correct."""
    log_p = np.log(np.clip(probs, 1e-12, None))
    best = None
    for t in np.exp(np.linspace(math.log(0.05), math.log(20), 4001)):
        z = log_p / t
        z = z - z.max(axis=1, keepdims=True)
        nll = float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(labels)), labels]))
        if best is None or nll < best[0]:
            best = (nll, t)
    return best[1]


def test_study_trains_every_arm_by_one_rule_and_every_number_follows_from_the_saved_predictions(tmp_path, capsys):
    spec = dict(STUDY, seeds=[0], output=str(tmp_path / "results"), runs=str(tmp_path / "runs"))
    _run(tmp_path, spec)
    out = tmp_path / "results"
    study = json.loads((out / "study.json").read_text())
    assert len(study["cells"]) == 2 and study["protocol"] == "resize"
    for cell in study["cells"]:
        name = f"res{cell['resolution']}_ratio{cell['data_ratio']:g}_seed{cell['seed']}"
        arrays = np.load(out / "predictions" / f"{name}.npz")
        hard = cell["resolution"] == 4  # every cell but the easiest; both cells are extremes here
        extreme = True
        expected = {"twin", "didicm", "didicm_cp1", "didicm_cl2x3"} \
            | ({"twin_aug", "twin_aug_tta2"} if hard else set()) | ({"ensemble2"} if extreme else set())
        assert set(cell["rows"]) == expected
        # every arm trained past its best validation, or says it did not
        for arm, info in cell["arms"].items():
            if arm.startswith("ensemble"):
                assert len(info["members"]) == 2 and len(info["epochs_run"]) == 2
                continue
            assert info["epochs_run"] >= info["best_epoch"] > 0
            assert info["converged"] == (info["best_step"] < info["steps_run"])
        assert cell["arms"]["twin"]["select"] == "nll_ts"
        assert cell["arms"]["twin"]["train_images_per_second"] > 0
        assert 0 < cell["arms"]["twin"]["validation_seconds"] < cell["arms"]["twin"]["train_seconds"]
        assert cell["cost"]["devices"] == [cell["arms"]["twin"]["device"]]
        assert cell["cost"]["train_seconds"] >= cell["arms"]["twin"]["train_seconds"]
        assert set(cell["cost"]["eval_images_per_second"]) == set(cell["rows"]) - {"ensemble2"}
        test_labels, val_labels = arrays["test_labels"].astype(np.int64), arrays["val_labels"].astype(np.int64)
        assert len(test_labels) == 360 and 140 <= len(val_labels) <= 146  # 20% of 1,797 held out; 10% of the rest
        for row, info in cell["rows"].items():
            test, val = arrays[f"test_{row}"], arrays[f"val_{row}"]
            assert test.dtype == np.float16 and val.dtype == np.float16
            n = 40 if row == "didicm_cl2x3" else 360
            assert test.shape == (n, 10) and info["count"] == n, row
            p = test.astype(np.float64)
            p /= p.sum(axis=1, keepdims=True)
            labels = test_labels[:n]
            # top-1 and NLL from the arrays, by hand; float16 rounding can tie two classes, and a tie shares the
            # credit (didicm.metrics' convention)
            p_true = p[np.arange(n), labels][:, None]
            credit = np.clip((1 - (p > p_true).sum(1)) / (p == p_true).sum(1), 0, 1)
            assert info["top1"] == pytest.approx(100 * credit.mean(), abs=1e-9)
            assert info["nll"] == pytest.approx(np.mean(-np.log(np.clip(p[np.arange(n), labels], 1e-12, None))),
                                                rel=1e-6)
            at_floor = (p[np.arange(n), labels] < 1e-12).mean()
            assert info["at_floor"] == pytest.approx(100 * at_floor) and \
                info["nll_at_floor"] == pytest.approx(at_floor * -math.log(1e-12))
            v = val.astype(np.float64)
            v /= v.sum(axis=1, keepdims=True)
            assert info["T"] == pytest.approx(_reference_temperature(v, val_labels[:v.shape[0]]), rel=2e-3)
            for shift in ("digits", "noise"):
                assert arrays[f"{shift}_{row}"].shape[0] == (40 if row == "didicm_cl2x3" else 50)
                assert 0 <= info[f"auroc_{shift}_maxprob"] <= 1
        assert {"aurc_settle", "aurc_path_entropy", "auroc_noise_settle"} <= set(cell["rows"]["didicm"])
        # the ensemble is the mean of its members' probabilities: its NLL is at most the members' mean NLL
    report = (out / "report.md").read_text()
    assert "## Findings (generated from study.json)" in report and "DiDiCM CP-2 minus twin" in report
    for figure in ("gap_twin.png", "steps.png", "reliability_hardest.png", "trajectories.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"
    # every number in the findings appears in study.json's summaries, rounded as printed
    findings = report.split("## Findings (generated from study.json)")[1].split("\n\n")[1]
    values = {"27.63"}  # the NLL floor's cost, -log(1e-12)
    for summary in study["summary"]:
        values.add(f"{summary['data_ratio']:g}")
        for gap in summary["gaps"].values():
            for stat in gap.values():
                for digits in (2, 3):
                    values |= {f"{stat['mean']:+.{digits}f}", f"{stat['std']:.{digits}f}"}
        for row in summary["rows"].values():  # the floor sentence quotes the headline row's own statistics
            for metric in ("at_floor", "nll_at_floor"):
                for digits in (2, 3):
                    values |= {f"{row[metric][k]:.{digits}f}" for k in ("mean", "std") if metric in row}
    quoted = re.findall(r"[+-]?\d+\.\d+", findings)
    assert quoted and all(q in values for q in quoted)
    secondary = report.split("## DiDiCM's other rows against the controls (generated from study.json)")[1] \
        .split("\n## ")[0]
    values = set()
    for summary in study["summary"]:
        values.add(f"{summary['data_ratio']:g}")
        for versus in summary["secondary"].values():
            for gap in versus.values():
                for stat in gap.values():
                    for digits in (2, 3):
                        values |= {f"{stat['mean']:+.{digits}f}", f"{stat['std']:.{digits}f}"}
    quoted = re.findall(r"[+-]?\d+\.\d+", secondary)
    assert "`didicm_cp1` minus twin" in secondary and quoted and all(q in values for q in quoted)

    # a second run reads every arm back, also with runtime settings (speed, not recipe); a changed arm recipe
    # recomputes that arm only
    capsys.readouterr()
    spec["runtime"] = {"channels_last": True}
    _run(tmp_path, spec)
    printed = capsys.readouterr().out
    assert printed.count(": cached") == sum(len(c["arms"]) for c in study["cells"])
    spec["arms"]["twin_aug"]["optim"] = {"label_smoothing": 0.1}
    _run(tmp_path, spec, "--only", "res4_ratio0.5_seed0")
    printed = capsys.readouterr().out
    assert "twin_aug: cached" not in printed and "twin: cached" in printed and "didicm: cached" in printed
    arms = json.loads((out / "cells" / "res4_ratio0.5_seed0.json").read_text())["arms"]
    assert arms["twin_aug"]["channels_last"] is True and arms["twin"]["channels_last"] is False


def test_study_runtime_takes_only_settings_that_change_speed(tmp_path, capsys):
    spec = dict(STUDY, output=str(tmp_path / "results"), runtime={"channels_last": True, "lr": 0.1})
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert main(["study", str(config), "--no-progress"]) == 2
    assert "study runtime takes" in capsys.readouterr().err and not (tmp_path / "results").exists()


def test_runtime_settings_reach_training_but_not_the_recipe_or_the_run_folder(tmp_path, monkeypatch):
    import didicm.training
    from didicm.study import load_study
    from didicm.study.cells import _train_arm
    from didicm.study.spec import _arm_recipe

    seen = []

    def fake_train(config, **_):
        seen.append(config)
        return SimpleNamespace(metrics={"train_seconds": 1.0, "epochs_run": 1.0, "steps_run": 1, "selection": {}})

    monkeypatch.setattr(didicm.training, "train", fake_train)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(dict(STUDY, output=str(tmp_path / "results"), runs=str(tmp_path / "runs"))))
    spec = load_study(config)
    recipes = [_arm_recipe(spec, "twin", 8, 0.5, 0)]
    _, plain = _train_arm(spec, "twin", 8, 0.5, 0, 0, False, lambda *_: None)
    spec["runtime"] = {"channels_last": True}
    recipes.append(_arm_recipe(spec, "twin", 8, 0.5, 0))
    _, fast = _train_arm(spec, "twin", 8, 0.5, 0, 0, False, lambda *_: None)
    assert recipes[0] == recipes[1] and seen[0].output == seen[1].output  # a finished or half-trained arm is found
    assert (seen[0].channels_last, seen[1].channels_last) == (False, True)
    assert (plain["channels_last"], fast["channels_last"]) == (False, True)


def _gap(top1, nll, n=2):
    from didicm.study.summary import _verdict
    return {m: {"mean": mean, "std": std, "n": n, "verdict": _verdict(mean if m == "top1" else -mean, std, n)}
            for m, (mean, std) in (("top1", top1), ("nll_ts", nll))}


def test_the_recommended_default_is_the_cheapest_row_not_worse_than_the_headline():
    from didicm.study.summary import _recommendation
    summary = {"seeds": [0, 1], "rows": {"didicm": {}}, "gaps": {
        "didicm_cp1": _gap((50.0, 0.5), (-1.0, 0.01)),     # cheapest, far worse: skipped
        "didicm_s1": _gap((0.4, 0.5), (-0.02, 0.001)),     # ties on top-1, worse on NLL: skipped
        "didicm_cp2": _gap((0.3, 0.4), (0.01, 0.02)),      # ties on both: the pick
        "didicm_cp4": _gap((0.0, 0.1), (0.0, 0.01)),       # also matches, but costs more
        "twin": _gap((-1.0, 0.1), (0.0, 0.01)),            # not a DiDiCM row
        "didicm_cp16": _gap((0.0, 0.1), (0.0, 0.01)),      # dearer than the headline
    }}
    costs = {"didicm": 8.0, "didicm_cp1": 1.0, "didicm_s1": 1.5, "didicm_cp2": 2.0, "didicm_cp4": 4.0,
             "twin": 1.0, "didicm_cp16": 16.0}
    lines = _recommendation(summary, costs, "setting")
    assert summary["recommendation"] == {"row": "didicm_cp2", "cost": 2.0, "headline_cost": 8.0, "seeds": 2,
                                         "not_run": []}
    assert "`didicm_cp2`" in lines[0] and "+0.30 ± 0.40 (tie)" in lines[0]
    table = lines[2]
    assert "didicm_cp16" not in table and "| twin " not in table
    assert [row in table for row in ("didicm_cp1", "didicm_s1", "didicm_cp4")] == [True, True, True]

    # one seed: nothing counts as a match
    single = {"seeds": [0], "rows": {"didicm": {}}, "gaps": {"didicm_cp2": _gap((0.3, 0.0), (0.0, 0.0), n=1)}}
    lines = _recommendation(single, costs, "setting")
    assert single["recommendation"]["row"] is None and lines[0].startswith("No cheaper DiDiCM row matches")

    # options the config places here but that have not run with every seed are named, not read as failures
    lines = _recommendation(single, costs, "setting", not_run=["didicm_s0", "didicm_hybrid_mean"])
    assert single["recommendation"]["not_run"] == ["didicm_s0", "didicm_hybrid_mean"]
    assert lines[0].startswith("No cheaper DiDiCM row run so far matches")
    assert "Not run here with two seeds yet, so not considered: `didicm_s0`, `didicm_hybrid_mean`." in lines[0]


def test_a_spread_that_would_print_as_zero_gets_more_decimals():
    from didicm.study.summary import plus_minus
    assert plus_minus({"mean": 0.0341, "std": 0.0035}, 2, signed=True) == "+0.034 ± 0.004"
    assert plus_minus({"mean": 0.0241, "std": 0.0001}, 3, signed=True) == "+0.0241 ± 0.0001"
    assert plus_minus({"mean": 1.5, "std": 0.25}, 2) == "1.50 ± 0.25"  # a visible spread keeps its digits
    assert plus_minus({"mean": 2.0, "std": 0.0}, 2) == "2.00 ± 0.00"  # one seed: no spread to show
    assert plus_minus({"mean": 2.0, "std": 1e-9}, 2) == "2.00000 ± 0.00000"  # at most three more decimals


def test_secondary_didicm_rows_are_compared_with_the_twin_and_the_best_control_seed_by_seed():
    from didicm.study.summary import _summaries
    from didicm.study.writeup import _secondary

    def cell(seed, values):
        rows = {row: {"arm": row.split("_")[0], "sampler": "x", "top1": top1, "nll_ts": nll, "ece_ts": 0.01,
                      "brier_ts": 0.1, "aurc": 0.02} for row, (top1, nll) in values.items()}
        return {"resolution": 7, "data_ratio": 0.02, "seed": seed, "rows": rows}

    cells = [cell(0, {"didicm": (80.0, 0.6), "didicm_hybrid": (83.0, 0.50), "twin": (81.0, 0.55),
                      "ensemble4": (85.0, 0.45)}),
             cell(1, {"didicm": (79.0, 0.6), "didicm_hybrid": (82.5, 0.52), "twin": (80.0, 0.58),
                      "ensemble4": (84.0, 0.44)}),
             cell(2, {"didicm": (79.5, 0.6), "twin": (80.5, 0.56)})]  # a seed without the hybrid: not paired
    summary = _summaries({}, cells)[0]
    versus = summary["secondary"]["didicm_hybrid"]
    assert set(versus) == {"twin", "ensemble4"}  # the best control by mean top-1
    twin = versus["twin"]["top1"]
    assert twin["n"] == 2 and twin["mean"] == pytest.approx(2.25) and twin["std"] == pytest.approx(0.25 * 2 ** 0.5)
    assert twin["verdict"] == "win" and versus["twin"]["nll_ts"]["mean"] == pytest.approx(-0.055)
    assert versus["ensemble4"]["top1"]["mean"] == pytest.approx(-1.75) and \
        versus["ensemble4"]["top1"]["verdict"] == "loss"
    assert "didicm" not in summary["secondary"]  # the headline's gaps are the main table's
    text = "\n".join(_secondary({"summary": [summary]}, "DiDiCM CP-8"))
    assert "- `didicm_hybrid` minus twin, over 1 setting: top-1 wins in 1, ties in 0, loses in 0" in text
    assert "+2.25 ± 0.35 (win)" in text and "-1.75 ± 0.35 (loss)" in text
    assert "best control `ensemble4`" in text


def test_secondary_rows_with_the_twin_as_best_control_one_seed_or_fewer_paired_seeds():
    from didicm.study.summary import _summaries
    from didicm.study.writeup import _secondary

    def cell(seed, values):
        return {"resolution": 7, "data_ratio": 0.02, "seed": seed,
                "rows": {row: {"arm": row, "sampler": "x", "top1": top1, "nll_ts": 0.5, "ece_ts": 0.0,
                               "brier_ts": 0.0, "aurc": 0.0} for row, top1 in values.items()}}

    # the twin is the best control: compared once; a row in one seed: 'one seed', counted apart
    summary = _summaries({}, [cell(0, {"didicm": 70.0, "didicm_cp2": 71.0, "didicm_once": 75.0, "twin": 72.0,
                                       "twin_ls": 60.0}),
                              cell(1, {"didicm": 70.0, "didicm_cp2": 69.0, "twin": 71.0, "twin_ls": 61.0})])[0]
    assert set(summary["secondary"]["didicm_cp2"]) == {"twin"}
    once = summary["secondary"]["didicm_once"]["twin"]["top1"]
    assert once["n"] == 1 and once["verdict"] == "one seed" and once["mean"] == pytest.approx(3.0)
    text = "\n".join(_secondary({"summary": [summary]}, "DiDiCM CP-8"))
    assert "- `didicm_once` minus twin, over 1 setting: top-1 wins in 0, ties in 0, loses in 0 (1 with one seed)" \
        in text
    # the best control on fewer seeds than the twin: its cells say on how many
    summary = _summaries({}, [cell(0, {"didicm": 70.0, "didicm_cp2": 71.0, "twin": 72.0, "ens": 80.0}),
                              cell(1, {"didicm": 70.0, "didicm_cp2": 69.0, "twin": 71.0})])[0]
    text = "\n".join(_secondary({"summary": [summary]}, "DiDiCM CP-8"))
    row = next(line for line in text.splitlines() if line.startswith("| didicm_cp2 "))
    assert "| 2 |" in row and "-9.00 ± 0.00 (one seed) [1 seed]" in row


def test_ablation_arms_are_never_the_recommended_default_and_unknown_roles_are_named(tmp_path):
    from didicm.errors import ConfigError
    from didicm.study import load_study
    from didicm.study.summary import _recommendation
    summary = {"seeds": [0, 1], "rows": {"didicm": {}}, "gaps": {
        "didicm_ablation": _gap((0.0, 0.1), (0.0, 0.01)), "didicm_cp4": _gap((0.0, 0.1), (0.0, 0.01))}}
    costs = {"didicm": 8.0, "didicm_ablation": 1.0, "didicm_cp4": 4.0}
    lines = _recommendation(summary, costs, "setting", exclude=frozenset({"didicm_ablation"}))
    assert summary["recommendation"]["row"] == "didicm_cp4" and "didicm_ablation" not in "".join(lines)
    config = tmp_path / "study.yaml"
    spec = json.loads(json.dumps(STUDY))
    spec["arms"]["twin"]["role"] = "baseline"
    config.write_text(yaml.safe_dump(dict(spec, output=str(tmp_path / "out"))))
    with pytest.raises(ConfigError, match="role must be one of"):
        load_study(config)


def test_the_report_says_which_rows_are_scored_on_fewer_test_images():
    from didicm.study.writeup import _subset_note
    cells = [{"rows": {"twin": {"count": 10000}, "didicm": {"count": 10000}, "didicm_cl8x10": {"count": 1000}}},
             {"rows": {"twin": {"count": 10000}, "didicm_cl8x10": {"count": 1000}}}]
    assert _subset_note(cells) == (" Some rows are scored on the first test images only: `didicm_cl8x10` (1,000 "
                                   "images); every other row on the whole test split, so gaps with these rows "
                                   "compare different image sets.")
    assert _subset_note([{"rows": {"twin": {"count": 5}, "didicm": {"count": 5}}}]) == ""


def test_ood_gaps_favour_the_higher_auroc_and_are_counted_over_settings():
    from didicm.study.summary import _summaries
    from didicm.study.writeup import _ood_counts

    def cell(resolution, seed, didicm_auroc, twin_auroc):
        rows = {}
        for row, auroc in (("didicm", didicm_auroc), ("twin", twin_auroc)):
            rows[row] = {"arm": row, "sampler": "x", "top1": 80.0, "nll_ts": 0.5, "ece_ts": 0.0, "brier_ts": 0.0,
                         "aurc": 0.0, "auroc_digits_maxprob": auroc, "auroc_noise_maxprob": 1 - auroc}
        return {"resolution": resolution, "data_ratio": 1.0, "seed": seed, "rows": rows}

    cells = [cell(7, 0, 0.90, 0.80), cell(7, 1, 0.91, 0.80),      # digits: DiDiCM higher, a win
             cell(14, 0, 0.70, 0.80), cell(14, 1, 0.71, 0.80),    # digits: lower, a loss
             cell(28, 0, 0.80, 0.80)]                              # one seed
    summaries = _summaries({}, cells)
    by_res = {s["resolution"]: s["gaps"]["twin"] for s in summaries}
    assert by_res[7]["auroc_digits_maxprob"]["verdict"] == "win" and \
        by_res[7]["auroc_digits_maxprob"]["mean"] == pytest.approx(0.105)
    assert by_res[7]["auroc_noise_maxprob"]["verdict"] == "loss"
    assert by_res[14]["auroc_digits_maxprob"]["verdict"] == "loss"
    spec = {"arms": {"twin": {"predict": {"twin": "classifier"}}, "didicm": {"predict": {"didicm": "cp:8"}}}}
    lines = _ood_counts(spec, {"summary": summaries}, "DiDiCM CP-8")
    assert "network passes an image in brackets, DiDiCM CP-8: 8" in lines[0]
    assert "- against `twin` (1): digits: wins in 1, ties in 0, loses in 1 (1 with one seed); noisy images: wins in " \
           "1, ties in 0, loses in 1 (1 with one seed)." in lines


def test_network_passes_are_read_from_each_rows_sampler():
    from didicm.study.writeup import _network_passes
    spec = {"arms": {"twin_aug": {"predict": {"twin_aug": "classifier", "twin_aug_tta8": "tta:8"}},
                     "ensemble4": {"ensemble": {"of": "twin", "members": 4}},
                     "didicm": {"predict": {"didicm": "cp:8", "didicm_cl8x10": "cl:8x10", "didicm_mean": "mean"}},
                     "dc": {"predict": {"dc": "dc:100"}}}}
    assert [_network_passes(spec, row) for row in ("twin_aug", "twin_aug_tta8", "ensemble4", "didicm",
                                                   "didicm_cl8x10", "didicm_mean", "dc", "unknown")] == \
        [1, 8, 4, 8, 80, 1, None, None]


def test_where_places_an_arm_in_the_settings_it_names():
    from didicm.study.spec import _in_cell
    spec = {"resolutions": [28, 14, 7], "data_ratios": [1.0, 0.1, 0.02]}
    settings = [(r, q) for r in spec["resolutions"] for q in spec["data_ratios"]]
    placed = {where: [s for s in settings if _in_cell(spec, {"where": where}, *s)]
              for where in ("all", "hard", "extremes", "hardest")}
    assert placed["all"] == settings
    assert placed["hard"] == settings[1:]  # all but 28 px / all data
    assert placed["extremes"] == [(28, 1.0), (7, 0.02)]
    assert placed["hardest"] == [(7, 0.02)]


def test_extra_seeds_add_cells_to_the_settings_they_name_only_and_bad_entries_are_named(tmp_path):
    from didicm.errors import ConfigError
    from didicm.study import load_study
    from didicm.study.spec import grid_cells
    config = tmp_path / "study.yaml"
    spec = json.loads(json.dumps(dict(STUDY, data_ratios=[0.5, 0.25], epochs={0.5: 3, 0.25: 3},
                                      output=str(tmp_path / "out"))))
    config.write_text(yaml.safe_dump(spec))
    plain = grid_cells(load_study(config))
    config.write_text(yaml.safe_dump(dict(spec, extra_seeds=[{"resolution": 4, "data_ratio": 0.25, "seeds": [2, 3]}])))
    cells = grid_cells(load_study(config))
    assert sorted(set(cells) - set(plain)) == [(4, 0.25, 2), (4, 0.25, 3)] and set(plain) <= set(cells)
    assert len(cells) == len(plain) + 2
    # a setting's seeds run together, cheapest setting first
    assert cells[:4] == [(4, 0.25, 0), (4, 0.25, 1), (4, 0.25, 2), (4, 0.25, 3)]
    for entry, message in [({"resolution": 5, "data_ratio": 0.25, "seeds": [2]}, "outside the grid"),
                           ({"resolution": 4, "data_ratio": 0.3, "seeds": [2]}, "outside the grid"),
                           ({"resolution": 4, "data_ratio": "half", "seeds": [2]}, "outside the grid"),
                           ({"resolution": 4, "data_ratio": 0.25, "seeds": [1, 2]}, "repeats seeds"),
                           ({"resolution": 4, "data_ratio": 0.25, "seeds": "2"}, "list of integers"),
                           ({"resolution": 4, "seeds": [2]}, "exactly resolution, data_ratio and seeds")]:
        config.write_text(yaml.safe_dump(dict(spec, extra_seeds=[entry])))
        with pytest.raises(ConfigError, match=message):
            load_study(config)


def test_the_steps_figure_draws_only_the_headline_samplers_family(tmp_path, monkeypatch):
    import didicm.study.writeup as writeup
    drawn = {}

    def fake_plot(curves, baselines, path, title=None):
        drawn.update(curves=curves, baselines=baselines)
        return path

    monkeypatch.setattr(writeup, "plot_accuracy_vs_steps", fake_plot)
    rows = {"twin": {"arm": "twin", "sampler": "classifier", "top1": 80.0},
            "didicm": {"arm": "didicm", "sampler": "cp:8", "top1": 81.0},
            "didicm_cp2": {"arm": "didicm", "sampler": "cp:2", "top1": 79.0},
            "didicm_cp16": {"arm": "didicm", "sampler": "cp:16", "top1": 81.5},
            "didicm_cp8exp": {"arm": "didicm", "sampler": "cp:8:exponential", "top1": 70.0},  # another update
            "didicm_cp4max": {"arm": "didicm", "sampler": "cp:4:max", "top1": 60.0},          # another label mode
            "didicm_cl8x10": {"arm": "didicm", "sampler": "cl:8x10", "top1": 50.0},
            "didicm_hybrid": {"arm": "didicm_hybrid", "sampler": "cp:4", "top1": 40.0}}      # another network
    cells = [{"resolution": 7, "data_ratio": 0.02, "seed": 0, "rows": rows}]
    spec = {"native_resolution": 28, "data_ratios": [0.02], "resolutions": [7],
            "arms": {"twin": {"predict": {"twin": "classifier"}}, "didicm": {"predict": {"didicm": "cp:8"}}}}
    writeup._figures(spec, cells, [], tmp_path)
    assert drawn["curves"] == {"DiDiCM CP": ([2, 8, 16], [79.0, 81.0, 81.5])}
    assert drawn["baselines"] == {"twin": 80.0}


def test_trajectory_scores_read_when_the_top_class_settles_and_the_mean_entropy():
    uniform = torch.full((10,), 0.1)
    a, b = torch.eye(10)[3], torch.eye(10)[5]
    trajectory = torch.stack([torch.stack([uniform, a, a, a, a]),        # settled after step 1
                              torch.stack([uniform, a, b, a, b]),        # changed at the last step
                              torch.stack([uniform, a, b, b, b])])       # settled at step 2
    scores = trajectory_scores(trajectory)
    assert scores["settle"].tolist() == [0.0, 0.75, 0.25]
    assert scores["path_entropy"].tolist() == [0.0, 0.0, 0.0]
    smooth = torch.stack([uniform, uniform, a, a, a])[None]
    assert trajectory_scores(smooth)["path_entropy"].item() == pytest.approx(math.log(10) / 4)


def test_changed_prediction_rows_of_a_trained_arm_come_from_its_saved_model_and_old_rows_are_rescored(
        tmp_path, capsys):
    spec = dict(STUDY, seeds=[0], resolutions=[4], output=str(tmp_path / "results"), runs=str(tmp_path / "runs"))
    spec["arms"] = json.loads(json.dumps({k: v for k, v in STUDY["arms"].items() if k in ("twin", "didicm")}))
    _run(tmp_path, spec, "--no-aggregate")
    cell_path = tmp_path / "results" / "cells" / "res4_ratio0.5_seed0.json"
    pred_path = tmp_path / "results" / "predictions" / "res4_ratio0.5_seed0.npz"
    before = json.loads(cell_path.read_text())
    arrays_before = dict(np.load(pred_path))
    # a row scored by an older arm_metrics (no at_floor, no version)
    old = json.loads(cell_path.read_text())
    for key in ("at_floor", "nll_at_floor", "metrics_version"):
        old["rows"]["twin"].pop(key)
    cell_path.write_text(json.dumps(old))

    # a row added, one with another sampler, one removed
    predict = spec["arms"]["didicm"]["predict"]
    predict.update(didicm_cp2exp="cp:2:exponential", didicm_cp1="cp:1:exponential")
    predict.pop("didicm_cl2x3")
    capsys.readouterr()
    _run(tmp_path, spec, "--no-aggregate")
    printed = capsys.readouterr().out
    assert "training" not in printed  # nothing retrained
    assert "predicting didicm_cp2exp (cp:2:exponential)" in printed
    assert "predicting didicm_cp1 (cp:1:exponential)" in printed
    assert "predicting didicm (" not in printed and "twin: cached, rescored" in printed
    after = json.loads(cell_path.read_text())
    arrays_after = dict(np.load(pred_path))
    # the training record is kept; the recipe now names the new rows, and what changed is recorded
    arm_before, arm_after = before["arms"]["didicm"], after["arms"]["didicm"]
    assert {k: v for k, v in arm_after.items() if k not in ("recipe", "rows_added")} == \
        {k: v for k, v in arm_before.items() if k != "recipe"}
    assert arm_after["recipe"] != arm_before["recipe"]
    assert arm_after["rows_added"][0]["rows"] == ["didicm_cp1", "didicm_cp2exp"]
    assert arm_after["rows_added"][0]["dropped"] == ["didicm_cl2x3"]
    assert "didicm_cl2x3" not in after["rows"] and not any("didicm_cl2x3" in k for k in arrays_after)
    # untouched rows and arrays are unchanged; the rescored row has the same numbers plus the new ones
    for key, value in arrays_before.items():
        if "didicm_cp1" not in key and "didicm_cl2x3" not in key:
            np.testing.assert_array_equal(arrays_after[key], value)
    for row in ("twin", "didicm"):
        assert after["rows"][row] == before["rows"][row], row
    assert after["rows"]["didicm_cp1"]["sampler"] == "cp:1:exponential"
    assert not np.array_equal(arrays_after["test_didicm_cp1"], arrays_before["test_didicm_cp1"])
    new = after["rows"]["didicm_cp2exp"]
    assert new["arm"] == "didicm" and new["evaluations_per_image"] == 2
    assert arrays_after["test_didicm_cp2exp"].shape == arrays_before["test_didicm"].shape

    # the report compares the headline with the same network's exponential update, found by its sampler
    capsys.readouterr()
    _run(tmp_path, spec)
    printed = capsys.readouterr().out
    assert printed.count(": cached") == 2 and "rescored" not in printed
    findings = (tmp_path / "results" / "report.md").read_text().split("## Findings")[1].split("\n\n")[1]
    assert "exponential update (`didicm_cp2exp`)" in findings

    # a saved model that does not match the saved predictions is refused; a missing one means training again
    from didicm.study import load_study
    from didicm.study.cells import _saved_arm_model, _splits
    loaded = load_study(tmp_path / "study.yaml")
    splits, _ = _splits(loaded, 4, 0.5, 0)
    arrays = dict(np.load(pred_path))
    model, reason = _saved_arm_model(loaded, "didicm", after["arms"]["didicm"], splits, arrays, after, 4, 0.5, 0, 512)
    assert reason is None
    arrays["val_didicm"] = arrays["val_didicm"][:, ::-1].copy()
    model, reason = _saved_arm_model(loaded, "didicm", after["arms"]["didicm"], splits, arrays, after, 4, 0.5, 0, 512)
    assert model is None and "does not reproduce the saved didicm predictions" in reason
    for run_dir in (tmp_path / "runs" / "res4_ratio0.5_seed0").glob("didicm-*"):
        run_dir.rename(run_dir.with_name("moved-" + run_dir.name))
    predict["didicm_cp4"] = "cp:4"
    capsys.readouterr()
    _run(tmp_path, spec, "--no-aggregate")
    printed = capsys.readouterr().out
    assert "model.safetensors is missing: training it again" in printed and "training didicm" in printed


def test_an_arms_commit_is_dirty_for_code_changes_but_not_for_the_studys_own_results(tmp_path, monkeypatch):
    import subprocess

    from didicm.study.spec import _commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    monkeypatch.delenv("DIDICM_COMMIT", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "study.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "empty")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "files")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert _commit("results") == head

    (tmp_path / "results" / "study.json").write_text('{"cells": []}')  # the grid writing its results
    assert _commit("results") == head
    assert _commit() == head + "-dirty"  # without the exemption the same tree counts as changed

    (tmp_path / "code.py").write_text("x = 2\n")
    assert _commit("results") == head + "-dirty"
    git("checkout", "--", "code.py")
    # code moved into the output folder left the code: a rename counts by both its sides
    git("mv", "code.py", "results/code with spaces.py")
    assert _commit("results") == head + "-dirty"
    git("mv", "results/code with spaces.py", "code.py")
    assert _commit("results") == head
    monkeypatch.setenv("DIDICM_COMMIT", "abc123")
    assert _commit("results") == "abc123"


def test_sigterm_to_the_study_stops_its_workers_and_they_release_their_locks(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    base = dict(STUDY["base"], optim=dict(STUDY["base"]["optim"], patience=10**6, lr_patience=10**6))
    spec = dict(STUDY, base=base, epochs={0.5: 10**5}, output=str(tmp_path / "results"), runs=str(tmp_path / "runs"))
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "didicm.cli", "study", str(config), "--no-progress", "--jobs", "2"]
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while len(locks := list((tmp_path / "runs").glob("*/*/train.lock"))) < 2 and parent.poll() is None:
            assert time.monotonic() < deadline, "the two workers did not start training within 180 s"
            time.sleep(0.2)
        workers = {int(lock.read_text().split()[0]) for lock in locks}
        parent.send_signal(signal.SIGTERM)  # the parent alone, as `kill <pid>` or a scheduler would
        _, stderr = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 143, stderr
    assert len(workers) == 2 and parent.pid not in workers
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not list((tmp_path / "runs").glob("*/*/train.lock"))


def test_status_reads_done_training_stopped_and_pending_arms_from_the_files(tmp_path, capsys):
    from didicm.study.spec import _arm_run_dir, load_study
    from didicm.training.train_loop import _process_start

    arms = {"twin": STUDY["arms"]["twin"], "ensemble2": STUDY["arms"]["ensemble2"],
            "didicm": {"model": {"name": "didicm:test_resnet"}, "predict": {"didicm": "cp:2"}}}
    spec = dict(STUDY, arms=arms, resolutions=[8, 4], seeds=[0], output=str(tmp_path / "results"),
                runs=str(tmp_path / "runs"))
    _run(tmp_path, spec, "--only", "res4_ratio0.5_seed0", "--no-aggregate")
    config = tmp_path / "status.yaml"
    config.write_text(yaml.safe_dump(dict(spec, seeds=[0, 1])))  # seed 1 added: its cells have not run
    loaded = load_study(config)
    # the twin of res8 seed 1 is training now (this process holds its lock); rule: patience 2, lr_patience 1
    running = _arm_run_dir(loaded, "twin", 8, 0.5, 1)
    running.mkdir(parents=True)
    (running / "train.lock").write_text(f"{os.getpid()} {_process_start(os.getpid()) or ''}".strip())
    # step 20 twice (validated again after a crash before its checkpoint) and a half-written last line
    (running / "validation.csv").write_text("step,epoch,top1,nll_ts\n10,1.0,50,0.5\n20,2.0,60,0.4\n20,2.0,60,0.4\n"
                                            "30,3.0,55,0.45\n40,4.0,")
    # the DiDiCM arm of res8 seed 1 finished training; its predictions wait for the study to reach the cell
    trained = _arm_run_dir(loaded, "didicm", 8, 0.5, 1)
    trained.mkdir(parents=True)
    (trained / "metrics.json").write_text("{}")
    # the second ensemble member of res4 seed 1 stopped part-way: a checkpoint, no live lock
    stopped = _arm_run_dir(loaded, "twin", 4, 0.5, 1, member=1)
    (stopped / "checkpoints").mkdir(parents=True)
    (stopped / "checkpoints" / "step_00000010.json").write_text("{}")
    (stopped / "train.lock").write_text("999999999 1")  # a dead owner holds nothing

    capsys.readouterr()
    assert main(["study", str(config), "--status"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].endswith("1 of 4 cells complete, 3 of 12 arms done")
    assert "res4_ratio0.5_seed0" not in text  # complete cells are counted, not listed
    cells = re.split(r"\n(?=res)", text)
    res8_seed1 = next(c for c in cells if c.startswith("res8_ratio0.5_seed1"))
    assert f"twin: training (pid {os.getpid()}), epoch 3, best nll_ts 0.4 at epoch 2, lr x0.2, stops after 1 more" \
        in res8_seed1
    assert "ensemble2: training: member 0 training" in res8_seed1  # member 0 of the ensemble is the twin itself
    assert "didicm: trained, predictions pending" in res8_seed1
    res4_seed1 = next(c for c in cells if c.startswith("res4_ratio0.5_seed1"))
    assert "twin: pending" in res4_seed1
    assert "ensemble2: stopped: member 0 pending; member 1 stopped" in res4_seed1
    res8_seed0 = next(c for c in cells if c.startswith("res8_ratio0.5_seed0"))
    assert "0 of 3 arms done" in res8_seed0 and "twin: pending" in res8_seed0
