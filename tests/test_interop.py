"""Official checkpoints in and out: didicm.load_model, didicm export, safe loading, the CLI on official files."""

from __future__ import annotations

import argparse
import math
import os
import pickle

import pytest
import torch
from torch import nn

import didicm
from didicm import interop
from didicm.checkpoint import safe_torch_load, save_checkpoint
from didicm.errors import CheckpointError, DidicmError

# ---- an independent reference of the official DiDiRN (omerb01/didicm, didicm/models/didirn.py) -----------------
# Written from the official source's structure: only the attribute names and the computation matter here, so
# that its state_dict keys are the official ones and its outputs are the official network's.


class _RefEmbedder(nn.Module):  # official TimestepEmbedder: .mlp = Linear, SiLU, Linear
    def __init__(self, dim, freq=256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, sigma):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        angles = sigma[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))


class _RefBlock(nn.Module):  # official BasicBlock / Bottleneck attribute names
    def __init__(self, cin, width, cond, stride, bottleneck):
        super().__init__()
        self.bottleneck = bottleneck
        cout = width * (4 if bottleneck else 1)
        if bottleneck:
            self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)
        else:
            self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
        self.skip_connection = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip_connection = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(cond, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, cout), nn.SiLU())

    def forward(self, x, emb):
        out = torch.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            out = torch.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
        else:
            out = self.bn2(self.conv2(out))
        out = self.out_layers(out + self.emb_layers(emb)[..., None, None])
        return torch.relu(out + self.skip_connection(x))


class RefOfficialDiDiRN(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), bottleneck=False, num_classes=10, cond=128):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.ff_emb = _RefEmbedder(cond)
        self.label_embedder = nn.Embedding(num_classes, cond)
        cin = 64
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks = nn.ModuleList()
            for j in range(depth):
                blocks.append(_RefBlock(cin, width, cond, 2 if i > 0 and j == 0 else 1, bottleneck))
                cin = width * (4 if bottleneck else 1)
            setattr(self, f"layer{i + 1}", blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x, c, t):
        out = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        emb = self.ff_emb(t) + self.label_embedder(c)
        for i in range(4):
            for block in getattr(self, f"layer{i + 1}"):
                out = block(out, emb)
        return self.fc(self.avgpool(out).flatten(1))


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and weights, so that a misplaced tensor changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1 + (1.0 if "running_var" in name else 0.0))
                if "running_var" in name:
                    t.abs_()
    return model.eval()


def _official_file(path, net, *, ema_model=None, **arg_overrides):
    args = argparse.Namespace(model="didirn18", num_classes=10, input_size=None, img_size=32, mean=None, std=None,
                              model_kwargs={}, diffusion_enabled=True, diffusion_noise="loglinear",
                              diffusion_eps=1e-5, diffusion_steps=4, diffusion_sampler="cp",
                              diffusion_sampler_kwargs={}, data_ratio=None, device="cuda:0", epochs=600)
    for key, value in arg_overrides.items():
        setattr(args, key, value)
    payload = {"epoch": 7, "arch": args.model, "state_dict": net.state_dict(), "version": 2, "args": args,
               "metric": 12.5, "optimizer": torch.optim.SGD(net.parameters(), lr=0.1).state_dict()}
    if ema_model is not None:
        payload["state_dict_ema"] = ema_model.state_dict()
    torch.save(payload, path)
    return path


def _masked(out, c):
    return out.scatter(1, c[:, None], 0.0)


@pytest.fixture(scope="module")
def reference():
    return _randomize(RefOfficialDiDiRN(), seed=1)


def test_reference_has_the_official_tensor_names_and_count(reference):
    keys = set(reference.state_dict())
    assert {"ff_emb.mlp.0.weight", "ff_emb.mlp.2.bias", "label_embedder.weight", "layer1.0.emb_layers.1.weight",
            "layer1.0.out_layers.0.weight", "layer2.0.skip_connection.0.weight", "fc.weight"} <= keys
    # method.md: DiDiRN-18 at K = 10 has 11,476,170 parameters in both codes, and the renaming is a bijection
    ours = didicm.models.create("didirn18", num_classes=10).state_dict()
    assert set(interop.didicm_to_official(ours)) == keys
    assert set(interop.official_to_didicm(reference.state_dict())) == set(ours)
    assert sum(p.numel() for p in reference.parameters()) == 11_476_170


def test_official_file_loads_with_the_official_outputs(tmp_path, reference):
    path = _official_file(tmp_path / "model_best.pth.tar", reference)
    model, diffusion, meta = didicm.load_model(path)
    assert not model.training and meta["format"] == "official"
    assert meta["model_name"] == "didirn18" and meta["num_classes"] == 10 and meta["image_size"] == 32
    assert meta["mean"] == list(interop.OFFICIAL_MEAN) and meta["classes"][3] == "3"
    assert meta["config"]["eval"]["steps"] == 4 and meta["epoch"] == 7
    assert diffusion is not None and diffusion.num_classes == 10
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=gen)
    c = torch.tensor([0, 4, 9])
    sigma = torch.tensor([0.01, 0.7, 6.0])
    with torch.no_grad():
        expected = _masked(reference(x, c, sigma), c)
        got = model(x, c, sigma)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert expected.abs().max() > 0.1  # a real comparison, not two zero outputs


def test_ema_weights_are_taken_when_asked(tmp_path, reference):
    other = _randomize(RefOfficialDiDiRN(), seed=2)
    path = _official_file(tmp_path / "last.pth.tar", reference, ema_model=other)
    x, c, sigma = torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), torch.tensor([0.5, 0.5])
    raw, _, _ = didicm.load_model(path)
    ema, _, meta = didicm.load_model(path, ema=True)
    with torch.no_grad():
        torch.testing.assert_close(ema(x, c, sigma), _masked(other(x, c, sigma), c), rtol=0, atol=1e-5)
        assert not torch.allclose(raw(x, c, sigma), ema(x, c, sigma))
    assert meta["ema"] is True
    no_ema = _official_file(tmp_path / "plain.pth.tar", reference)
    with pytest.raises(CheckpointError, match="state_dict_ema"):
        didicm.load_model(no_ema, ema=True)


def test_plain_official_state_dict_loads_by_its_tensors(tmp_path, reference):
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, tmp_path / "w.pth")
    # timm's CheckpointSaver without args: arch is the class name
    torch.save({"state_dict": reference.state_dict(), "arch": "didirn"}, tmp_path / "saver.pth.tar")
    assert didicm.load_model(tmp_path / "saver.pth.tar")[2]["model_name"] == "didirn18"
    model, _, meta = didicm.load_model(tmp_path / "w.pth")
    assert meta["model_name"] == "didirn18" and meta["image_size"] == interop.OFFICIAL_IMAGE_SIZE
    x, c = torch.randn(1, 3, 32, 32), torch.tensor([5])
    with torch.no_grad():
        torch.testing.assert_close(model(x, c, 1.0), _masked(reference(x, c, torch.tensor([1.0])), c), rtol=0,
                                   atol=1e-5)


def test_bottleneck_variant_and_input_size(tmp_path):
    ref = _randomize(RefOfficialDiDiRN(layers=(3, 4, 6, 3), bottleneck=True, num_classes=5), seed=3)
    path = _official_file(tmp_path / "m.pth.tar", ref, model="didirn50", num_classes=None, input_size=[3, 40, 40],
                          diffusion_sampler="cl", diffusion_sampler_kwargs={"N": 3})
    model, _, meta = didicm.load_model(path)
    assert meta["model_name"] == "didirn50" and meta["num_classes"] == 5 and meta["image_size"] == 40
    assert meta["config"]["eval"]["sampler"] == "cl" and meta["config"]["eval"]["chains"] == 3
    # the official validate.py's timm transform, its defaults (no --crop-pct, no --interpolation)
    assert meta["preprocess"] == {"geometry": "center_crop", "crop_pct": 0.875, "interpolation": "bilinear"}
    x, c = torch.randn(1, 3, 40, 40), torch.tensor([2])
    with torch.no_grad():
        torch.testing.assert_close(model(x, c, 0.3), _masked(ref(x, c, torch.tensor([0.3])), c), rtol=0, atol=1e-5)


def test_inconsistent_files_are_refused(tmp_path, reference):
    with pytest.raises(CheckpointError, match="didirn34"):
        didicm.load_model(_official_file(tmp_path / "a.pth.tar", reference, model="didirn34"))
    with pytest.raises(CheckpointError, match="num_classes is 7"):
        didicm.load_model(_official_file(tmp_path / "b.pth.tar", reference, num_classes=7))
    with pytest.raises(CheckpointError, match="sampler"):
        didicm.load_model(_official_file(tmp_path / "c.pth.tar", reference, diffusion_sampler="ddim"))
    torch.save([1, 2, 3], tmp_path / "d.pth")
    with pytest.raises(CheckpointError, match="neither"):
        didicm.load_model(tmp_path / "d.pth")


def test_an_official_squash_file_is_prepared_alike_by_predict_and_eval(tmp_path):
    from types import SimpleNamespace

    from test_recipes import make_jpegs

    from didicm.cli import _dataset_of

    ref = _randomize(RefOfficialDiDiRN(), seed=5)
    path = _official_file(tmp_path / "m.pth.tar", ref, input_size=[3, 32, 32], crop_mode="squash", crop_pct=0.9,
                          interpolation="bicubic")
    _, _, meta = didicm.load_model(path)
    assert meta["preprocess"] == {"geometry": "squash", "crop_pct": 0.9, "interpolation": "bicubic"}
    root = make_jpegs(tmp_path / "jpegs", classes=10, train=1, val=1)
    options = SimpleNamespace(dataset=f"folder:{root}", root=None, degradation=None, on_bad_image=None)
    assert _dataset_of(meta, "test", options).preprocess == meta["preprocess"]


def test_timm_baseline_from_the_official_train_py_loads_unchanged(tmp_path):
    import timm

    net = timm.create_model("resnet18", num_classes=4).eval()
    path = _official_file(tmp_path / "r.pth.tar", net, model="resnet18", num_classes=4, diffusion_enabled=False)
    model, diffusion, meta = didicm.load_model(path)
    assert diffusion is None and meta["method"] == "classifier"
    # validate.py's resolve_data_config takes a timm classifier's own defaults, not the DiDiRN's
    assert meta["preprocess"] == {"geometry": "center_crop", "crop_pct": 0.95, "interpolation": "bicubic"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x))


# ---- safe loading -------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_file_is_refused_naming_the_global_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_best.pth.tar"
    payload = {"state_dict": {"w": torch.ones(1)}, "args": argparse.Namespace(model="x"), "evil": _Payload(marker)}
    if zip_format:
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=4)
    for load in (safe_torch_load, didicm.load_model, didicm.load_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(path)
        message = str(info.value)
        assert "posix.system" in message or "os.system" in message, message
        assert "\x1b" not in message
    assert not marker.exists()


def test_namespace_is_the_only_class_allowed(tmp_path):
    path = tmp_path / "ok.pth.tar"
    torch.save({"state_dict": {}, "args": argparse.Namespace(model="didirn18", lr=0.1)}, path)
    assert safe_torch_load(path)["args"].lr == 0.1
    torch.save({"state_dict": {}, "when": __import__("datetime").date(2020, 1, 1)}, tmp_path / "date.pth")
    with pytest.raises(CheckpointError, match="datetime.date"):
        safe_torch_load(tmp_path / "date.pth")


def test_truncated_file_gives_a_clean_message(tmp_path, reference):
    path = _official_file(tmp_path / "t.pth.tar", reference)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as info:
        didicm.load_model(path)
    assert "\x1b" not in str(info.value)


# ---- export ---------------------------------------------------------------------------------------------------


def _didicm_run(tmp_path, model_name="didirn18", kwargs=None, in_chans=3, ema_decay=None):
    from didicm.config import TrainConfig

    kwargs = kwargs or {}
    model = _randomize(didicm.models.create(model_name, num_classes=10, in_chans=in_chans, **kwargs), seed=4)
    cfg = TrainConfig().to_dict()
    cfg["model"].update(name=model_name, kwargs=kwargs)
    cfg["eval"].update(steps=6)
    cfg["optim"]["ema_decay"] = ema_decay
    meta = dict(config=cfg, classes=[f"c{i}" for i in range(10)], num_classes=10, in_chans=in_chans, image_size=32,
                mean=[0.5] * in_chans, std=[0.25] * in_chans, model_name=model_name, model_kwargs=kwargs,
                method="didicm", kind="model", step=10)
    run = tmp_path / "run"
    save_checkpoint(run / "model.safetensors", {f"model/{k}": v for k, v in model.state_dict().items()}, meta)
    return run, model


def test_export_round_trips_and_matches_the_official_network(tmp_path):
    run, model = _didicm_run(tmp_path)
    out = interop.export_official(run, tmp_path / "out" / "model_best.pth.tar")
    saved = safe_torch_load(out)
    assert saved["arch"] == "didirn18" and saved["args"].diffusion_enabled and saved["args"].diffusion_steps == 6
    assert saved["args"].input_size == [3, 32, 32] and saved["args"].num_classes == 10
    # what the official validate.py does: create the official model, then timm's load_checkpoint (strict)
    import timm.models

    ref = RefOfficialDiDiRN()
    timm.models.load_checkpoint(ref, str(out), use_ema=False, strict=True)
    ref.eval()
    x, c, sigma = torch.randn(2, 3, 32, 32), torch.tensor([3, 8]), torch.tensor([0.2, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(_masked(ref(x, c, sigma), c), model.eval()(x, c, sigma), rtol=0, atol=1e-5)
    assert saved["args"].crop_mode == "squash" and saved["args"].crop_pct == 1.0  # timm's words for a plain resize
    back, _, meta = didicm.load_model(out)
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["config"]["eval"]["steps"] == 6
    assert meta["preprocess"] == {"geometry": "resize", "interpolation": "bilinear"}  # and back
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_export_refuses_what_the_official_network_lacks(tmp_path):
    run, _ = _didicm_run(tmp_path, kwargs={"stem": "small"})
    with pytest.raises(CheckpointError, match="stem"):
        interop.export_official(run, tmp_path / "a.pth.tar")
    run, _ = _didicm_run(tmp_path / "t", "didirn18_twin")
    with pytest.raises(CheckpointError, match="twin"):
        interop.export_official(run, tmp_path / "b.pth.tar")
    with pytest.raises(DidicmError, match="pth.tar"):
        interop.export_official(run, tmp_path / "c.safetensors")


def test_didicm_run_through_load_model(tmp_path):
    run, model = _didicm_run(tmp_path)
    loaded, diffusion, meta = didicm.load_model(run)
    assert meta["format"] == "didicm" and diffusion is not None and not loaded.training
    with pytest.raises(CheckpointError, match="without EMA"):
        didicm.load_model(run, ema=True)


# ---- CLI ------------------------------------------------------------------------------------------------------


def test_cli_predict_and_export_on_official_files(tmp_path, reference, capsys):
    from PIL import Image

    from didicm.cli import main

    path = _official_file(tmp_path / "model_best.pth.tar", reference)
    image = tmp_path / "img.png"
    Image.new("RGB", (20, 20), (200, 30, 40)).save(image)
    assert main(["predict", str(path), str(image), "--device", "cpu", "--sampler", "cp:2", "--topk", "2",
                 "--class-names", ",".join(f"n{i}" for i in range(10))]) == 0
    line = capsys.readouterr().out
    assert "img.png: n" in line and "cp:2" in line
    assert main(["predict", str(path), str(image), "--device", "cpu", "--ema"]) == 2
    assert "state_dict_ema" in capsys.readouterr().err
    run, _ = _didicm_run(tmp_path)
    assert main(["export", str(run), str(tmp_path / "e.pth.tar")]) == 0
    assert safe_torch_load(tmp_path / "e.pth.tar")["arch"] == "didirn18"


def test_cli_eval_on_an_official_file_needs_a_data_set_and_uses_imagenet_normalization(tmp_path, reference, capsys):
    import json

    from PIL import Image

    from didicm.cli import main

    root = tmp_path / "data"
    for split in ("train", "val"):
        for k in range(10):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            Image.new("RGB", (12, 12), (20 * k, 100, 250 - 20 * k)).save(folder / "a.png")
    path = _official_file(tmp_path / "model_best.pth.tar", reference)
    assert main(["eval", str(path), "--device", "cpu", "--no-progress"]) == 2
    assert "--dataset" in capsys.readouterr().err
    out = tmp_path / "eval.json"
    assert main(["eval", str(path), "--dataset", f"folder:{root}", "--sampler", "cp:2", "--device", "cpu",
                 "--no-progress", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]["cp:2"]
    assert results["count"] == 10 and 0 <= results["top1"] <= 100


def test_match_normalization_maps_one_statistic_to_another():
    pixels = torch.rand(2, 3, 4, 4)
    mean_a, std_a, mean_b, std_b = [0.5, 0.4, 0.3], [0.2, 0.3, 0.4], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    a = (pixels - torch.tensor(mean_a).view(1, 3, 1, 1)) / torch.tensor(std_a).view(1, 3, 1, 1)
    b = (pixels - torch.tensor(mean_b).view(1, 3, 1, 1)) / torch.tensor(std_b).view(1, 3, 1, 1)
    (got, labels), = interop.match_normalization([(a, torch.zeros(2))], mean_a, std_a, mean_b, std_b)
    torch.testing.assert_close(got, b)
    (same, _), = interop.match_normalization([(a, torch.zeros(2))], mean_a, std_a, mean_a, std_a)
    assert same is a
