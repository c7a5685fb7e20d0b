"""The study command on tiny data: the JSON schema, the report, the figures, and cached cells."""

import json

import yaml

from didicm.cli import main

STUDY = {
    "dataset": "digits", "native_resolution": 8, "resolutions": [8, 4], "data_ratios": [1.0, 0.5], "seeds": [0],
    "samplers": ["cp:1", "cp:2", "cl:2x3"], "cl_limit": 40, "val_limit": 60, "trajectories": 3,
    "base": {"data": {"val_size": 0.1},
             "optim": {"opt": "adamw", "lr": 5e-3, "batch_size": 32, "steps": 15, "warmup_steps": 2},
             "checkpoint_every": 100},
    "arms": {"twin": {"model": {"name": "test_resnet"}}, "didicm": {"model": {"name": "didicm:test_resnet"}}},
}


def test_study_writes_cells_json_report_and_figures_then_skips_finished_cells(tmp_path, capsys):
    spec = dict(STUDY, output=str(tmp_path / "results"), runs=str(tmp_path / "runs"))
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert main(["study", str(config), "--no-progress"]) == 0
    study = json.loads((tmp_path / "results" / "study.json").read_text())
    assert len(study["cells"]) == 4
    for cell in study["cells"]:
        assert cell["resolution"] in (8, 4) and cell["data_ratio"] in (1.0, 0.5) and cell["seed"] == 0
        for arm in ("twin", "didicm"):
            assert set(("top1", "nll", "ece", "brier", "sampler", "train_seconds")) <= set(cell[arm])
            assert 0 <= cell[arm]["top1"] <= 100
        assert cell["twin"]["sampler"] == "classifier" and cell["didicm"]["sampler"] in ("cp:1", "cp:2")
        assert cell["didicm_samplers"]["test"]["cl:2x3"]["count"] == 40
        assert cell["didicm_samplers"]["test"]["cp:2"]["count"] == 360
        assert cell["didicm_samplers"]["val"]["cp:2"]["count"] == 60
    report = (tmp_path / "results" / "report.md").read_text()
    assert "| resolution |" in report and "gap (points)" in report and "4 px" in report
    for name in ("gap.png", "steps.png", "reliability_hardest.png", "trajectories.png"):
        assert (tmp_path / "results" / name).read_bytes()[:4] == b"\x89PNG"

    cells = sorted((tmp_path / "results" / "cells").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in cells]
    capsys.readouterr()
    assert main(["study", str(config), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("cached") == 4
    assert [p.stat().st_mtime_ns for p in cells] == stamps

    # a changed recipe invalidates the cached cells
    spec["base"]["optim"]["steps"] = 16
    config.write_text(yaml.safe_dump(spec))
    assert main(["study", str(config), "--no-progress", "--only", "res4_ratio0.5_seed0"]) == 0
    assert "recipe changed" in capsys.readouterr().out


def test_study_jobs_runs_cells_in_worker_processes_and_matches_a_serial_run(tmp_path, capsys):
    spec = dict(STUDY, resolutions=[8, 4], data_ratios=[1.0], samplers=["cp:2"], trajectories=0)
    serial = dict(spec, output=str(tmp_path / "serial"), runs=str(tmp_path / "runs_serial"))
    parallel = dict(spec, output=str(tmp_path / "parallel"), runs=str(tmp_path / "runs_parallel"))
    for name, values in (("serial", serial), ("parallel", parallel)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(values))
    assert main(["study", str(tmp_path / "serial.yaml"), "--no-progress"]) == 0
    assert main(["study", str(tmp_path / "parallel.yaml"), "--no-progress", "--jobs", "2"]) == 0
    assert "worker 1: res4_ratio1_seed0" in capsys.readouterr().out
    one = json.loads((tmp_path / "serial" / "study.json").read_text())["cells"]
    two = json.loads((tmp_path / "parallel" / "study.json").read_text())["cells"]
    assert len(two) == 2
    for a, b in zip(one, two, strict=True):  # same seeds, same data: the workers reproduce the serial cells
        assert a["recipe"] == b["recipe"]
        for arm in ("twin", "didicm"):
            assert abs(a[arm]["top1"] - b[arm]["top1"]) <= 1.0


def test_study_rejects_unknown_cells_and_bad_job_counts(tmp_path, capsys):
    spec = dict(STUDY, output=str(tmp_path / "results"), runs=str(tmp_path / "runs"))
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert main(["study", str(config), "--only", "res3_ratio1_seed0"]) == 2
    assert "unknown cells ['res3_ratio1_seed0']" in capsys.readouterr().err
    assert main(["study", str(config), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_report_shows_the_fixed_sampler_the_generative_peers_and_the_findings(tmp_path):
    spec = dict(STUDY, resolutions=[8], data_ratios=[1.0], samplers=["cp:2", "cp:8"], trajectories=0,
                output=str(tmp_path / "results"), runs=str(tmp_path / "runs"))
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert main(["study", str(config), "--no-progress"]) == 0
    scores = {"top1": 90.0, "nll": 0.3, "ece": 0.05, "brier": 0.15, "evaluations_per_image": 40.0, "count": 50,
              "images_per_second": 10.0, "seconds": 5.0}
    peers = {"res8_ratio1/seed0": {"resolution": 8, "data_ratio": 1.0, "seed": 0, "train_seconds": 12.0,
                                   "dc:4": scores, "probe": dict(scores, top1=70.0, evaluations_per_image=1.0)}}
    (tmp_path / "results" / "peers.json").write_text(json.dumps(peers))
    (tmp_path / "results" / "findings.md").write_text("## Findings\nDiDiCM and the twin tie here.\n")
    assert main(["study", str(config), "--no-progress"]) == 0
    report = (tmp_path / "results" / "report.md").read_text()
    assert "DiDiCM with cp:8 fixed in advance" in report
    peer_rows = [line for line in report.splitlines() if line.startswith("| 8 px, ratio 1 |")]
    assert [row.split("|")[2].strip() for row in peer_rows] == [
        "twin (cross-entropy)", "DiDiCM, best sampler", "DiDiCM, cp:8", "Diffusion Classifier dc:4",
        "diffusion features + linear probe"]
    assert "| 70.00 |" in peer_rows[-1] and "| 90.00 |" in peer_rows[-2]
    assert report.rstrip().endswith("DiDiCM and the twin tie here.")


def test_load_results_merges_parts_and_writes_them_back(tmp_path):
    from didicm.report import load_results

    out = tmp_path / "all.json"
    assert load_results(out) == {} and not out.exists()
    out.write_text(json.dumps({"a": 1}))
    (tmp_path / "p1.json").write_text(json.dumps({"b": 2}))
    (tmp_path / "p2.json").write_text(json.dumps({"a": 3, "c": 4}))
    merged = load_results(out, [tmp_path / "p1.json", tmp_path / "p2.json"])
    assert merged == {"a": 3, "b": 2, "c": 4} == json.loads(out.read_text())
