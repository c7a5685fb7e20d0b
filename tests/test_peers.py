"""The generative peers: the Diffusion Classifier and the diffusion-feature probe on a class-conditional UNet."""

import json

import pytest
import torch

import didicm.training as training
from didicm import create_dataset, peers
from didicm.cli import main
from didicm.config import config_from_dict
from didicm.errors import ConfigError, InputError
from didicm.evaluation import evaluate, parse_sampler
from didicm.models import ConditionalUNet, create, is_generative_model
from didicm.objectives import epsilon_loss

SMALL = {"channels": (16, 32), "norm_groups": 8, "timesteps": 200}


def _two_patterns(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: the top half bright; class 1: the bottom half bright; plus pixel noise. 8x8, one channel."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (count,), generator=generator)
    images = torch.full((count, 1, 8, 8), -1.0)
    images[labels == 0, :, :4] = 1.0
    images[labels == 1, :, 4:] = 1.0
    return images + 0.3 * torch.randn(images.shape, generator=generator), labels


@pytest.fixture(scope="module")
def trained():
    """A UNet trained for 300 steps on the two patterns (a few seconds on a CPU)."""
    torch.manual_seed(0)
    model = ConditionalUNet(2, in_chans=1, **SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, labels = _two_patterns(512, seed=1)
    for _ in range(300):
        index = torch.randint(0, 512, (64,))
        loss = epsilon_loss(model, images[index], labels[index]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_diffusion_classifier_separates_two_patterns(trained):
    images, labels = _two_patterns(64, seed=2)
    errors, evaluations = peers.classify(trained, images, draws=8, generator=torch.Generator().manual_seed(0))
    assert errors.shape == (64, 2) and evaluations == 16.0
    accuracy = (errors.argmin(1) == labels).float().mean().item()
    assert accuracy > 0.9  # chance is 0.5


def test_feature_probe_separates_two_patterns(trained):
    train_images, train_labels = _two_patterns(256, seed=3)
    val_images, val_labels = _two_patterns(64, seed=4)
    probe, rows = peers.fit_feature_probe(trained, lambda: [(train_images, train_labels)],
                                          lambda: [(val_images, val_labels)], times=[10, 100])
    assert len(rows) == 2 * len(trained.feature_modules())
    assert max(r["val_top1"] for r in rows) == pytest.approx(
        next(r["val_top1"] for r in rows if (r["block"], r["t"]) == (probe.block, probe.t)))
    test_images, test_labels = _two_patterns(64, seed=5)
    accuracy = (probe(test_images).argmax(1) == test_labels).float().mean().item()
    assert accuracy > 0.9
    assert torch.equal(probe(test_images), probe(test_images))  # fixed noise draw: deterministic


class _Recorder(torch.nn.Module):
    """Wraps a UNet's forward and keeps every (x_t, t, label) it was called with."""

    def __init__(self, model):
        super().__init__()
        self.calls = []
        self.original = model.forward
        model.forward = self.record

    def record(self, noisy, t, labels):
        self.calls.append((noisy.clone(), t.clone(), labels.clone()))
        return self.original(noisy, t, labels)


def test_every_class_is_scored_on_the_same_draws():
    torch.manual_seed(0)
    model = ConditionalUNet(3, in_chans=1, **SMALL).eval()
    recorder = _Recorder(model)
    images = torch.randn(2, 1, 8, 8)
    peers.classify(model, images, draws=4, generator=torch.Generator().manual_seed(0), chunk=5)
    noisy = torch.cat([c[0] for c in recorder.calls])
    t = torch.cat([c[1] for c in recorder.calls])
    labels = torch.cat([c[2] for c in recorder.calls])
    assert noisy.shape[0] == 2 * 3 * 4  # B x K x N inputs, in chunks of 5 (no loop over images)
    noisy, t, labels = noisy.view(2, 3, 4, 1, 8, 8), t.view(2, 3, 4), labels.view(2, 3, 4)
    for c in range(3):
        assert (labels[:, c] == c).all()
        assert torch.equal(noisy[:, c], noisy[:, 0]) and torch.equal(t[:, c], t[:, 0])
    assert not torch.equal(noisy[0, 0, 0], noisy[0, 0, 1])  # but the draws differ from each other


def test_denoising_errors_match_a_loop_over_images_classes_and_draws():
    torch.manual_seed(0)
    model = ConditionalUNet(3, in_chans=1, **SMALL).eval()
    images = torch.randn(2, 1, 8, 8)
    t, noise = peers.draw_shared(images, 3, model.timesteps, torch.Generator().manual_seed(1))
    candidates = torch.tensor([[0, 1, 2], [2, 0, 1]])
    fast = peers.denoising_errors(model, images, candidates, t, noise, chunk=4)
    with torch.no_grad():
        for b in range(2):
            for m in range(3):
                for n in range(3):
                    abar = model.alphas_cumprod[t[b, n]]
                    x_t = abar.sqrt() * images[b] + (1 - abar).sqrt() * noise[b, n]
                    eps = model(x_t[None], t[b, n][None], candidates[b, m][None])[0]
                    assert fast[b, m, n].item() == pytest.approx(((eps - noise[b, n]) ** 2).mean().item(),
                                                                 rel=1e-4, abs=1e-6)


def test_draws_are_stratified_over_the_chain():
    images = torch.zeros(5, 1, 8, 8)
    t, noise = peers.draw_shared(images, 4, 1000, torch.Generator().manual_seed(0))
    assert noise.shape == (5, 4, 1, 8, 8)
    for n in range(4):  # draw n lies in the n-th quarter of the chain
        assert ((t[:, n] >= 250 * n) & (t[:, n] < 250 * (n + 1))).all()


def test_adaptive_elimination_spends_fewer_evaluations_and_counts_them():
    torch.manual_seed(0)
    model = ConditionalUNet(10, in_chans=1, **SMALL).eval()
    recorder = _Recorder(model)
    images = torch.randn(3, 1, 8, 8)
    errors, evaluations = peers.classify(model, images, draws=8, generator=torch.Generator().manual_seed(0),
                                         adaptive=True)
    assert evaluations == 10 * 2 + 2 * 6  # 2 draws on all 10 classes, 6 more on the 2 kept
    assert sum(c[0].shape[0] for c in recorder.calls) == 3 * evaluations
    assert errors.shape == (3, 10) and torch.isfinite(errors).all()
    assert peers.evaluations_per_image(10, 8, adaptive=True) == evaluations


def test_adaptive_screening_spans_all_noise_levels_and_predicts_the_best_survivor():
    torch.manual_seed(0)
    model = ConditionalUNet(10, in_chans=1, **SMALL).eval()
    recorder = _Recorder(model)
    images = torch.randn(4, 1, 8, 8)
    errors, _ = peers.classify(model, images, draws=12, generator=torch.Generator().manual_seed(3), adaptive=True,
                               chunk=10_000)
    screen_t = recorder.calls[0][1].view(4, 10, 3)[:, 0]  # the first stage: 3 draws per image, every class
    for column, n in enumerate((0, 4, 8)):  # draws 0, 4 and 8 of 12: early, middle and late in the chain
        low, high = n * 200 / 12, (n + 1) * 200 / 12
        assert ((screen_t[:, column] >= int(low)) & (screen_t[:, column] < high)).all()
    kept = recorder.calls[1][2].view(4, 2, 9)[:, :, 0]  # the classes that got the other 9 draws
    worst_survivor = errors.gather(1, kept).max(1).values
    for b in range(4):
        eliminated = [c for c in range(10) if c not in kept[b].tolist()]
        assert (errors[b, eliminated] >= worst_survivor[b]).all()
        assert errors[b].argmin().item() in kept[b].tolist()


def test_error_scale_fit_recovers_the_true_temperature():
    generator = torch.Generator().manual_seed(0)
    errors = torch.rand(20000, 5, generator=generator)
    labels = torch.multinomial(torch.softmax(-4.0 * errors, dim=1), 1, generator=generator)[:, 0]
    assert peers.fit_error_scale(errors, labels) == pytest.approx(4.0, rel=0.1)
    probs = peers.probabilities(errors, 4.0)
    assert torch.allclose(probs.sum(1), torch.ones(20000)) and (probs > 0).all()


def test_bad_inputs_get_clear_errors(trained):
    with pytest.raises(ConfigError, match="num_classes >= 2"):
        ConditionalUNet(1, in_chans=1, **SMALL)
    with pytest.raises(ConfigError, match="divisible by norm_groups"):
        ConditionalUNet(3, channels=(12, 24), norm_groups=8)
    with pytest.raises(InputError, match="labels must lie in 0..2"):
        trained(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), torch.tensor([0, 5]))
    with pytest.raises(InputError, match=r"expected images \[B, 1, H, W\]"):
        peers.classify(trained, torch.zeros(2, 3, 8, 8), draws=2)
    with pytest.raises(ConfigError, match="unknown feature blocks"):
        peers.extract_features(trained, torch.zeros(2, 1, 8, 8), 10, ["nope"])
    classifier = create("test_resnet", 2, in_chans=1)
    with pytest.raises(ConfigError, match="class-conditional image diffusion model"):
        peers.classify(classifier, torch.zeros(2, 1, 8, 8), draws=2)
    with pytest.raises(ConfigError, match="generative 'unet' model"):
        evaluate(classifier, [(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))], [parse_sampler("dc:2")])
    with pytest.raises(ConfigError, match="use --sampler dc:N"):
        evaluate(trained, [(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))], [parse_sampler("cp:2")])
    with pytest.raises(ConfigError, match="cannot read sampler"):
        parse_sampler("dc:4:sometimes")
    assert is_generative_model(trained) and not is_generative_model(classifier)


TRAIN_UNET = {
    "data": {"dataset": "digits", "val_size": 0.1},
    "model": {"name": "unet", "kwargs": {"channels": [16, 32], "timesteps": 200}},
    "optim": {"opt": "adamw", "lr": 3e-3, "weight_decay": 0.0, "batch_size": 32, "steps": 12, "warmup_steps": 2},
    "checkpoint_every": 4,
}


def test_unet_training_resumes_bit_for_bit_and_refuses_mixup(tmp_path):
    straight = config_from_dict({**TRAIN_UNET, "output": str(tmp_path / "a")})
    reference = training.train(straight, progress=False, log=lambda *_: None)
    assert reference.diffusion is None and "dc:10" in reference.metrics["val"]
    interrupted = config_from_dict({**TRAIN_UNET, "output": str(tmp_path / "b")})
    with pytest.raises(KeyboardInterrupt):
        training.train(interrupted, progress=False, log=lambda *_: None, fault_after_steps=6)
    training.train(interrupted, resume=True, progress=False, log=lambda *_: None)
    a = training.load_trained_model(tmp_path / "a")[0].state_dict()
    b = training.load_trained_model(tmp_path / "b")[0].state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["error_scale"].item() != 1.0 and a["error_scale_fitted"]  # fit on validation, saved
    mid_run = training.load_trained_model(tmp_path / "a" / "checkpoints" / "step_00000008.safetensors")[0]
    with pytest.warns(UserWarning, match="error scale was never fit"):
        evaluate(mid_run, [(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))], [parse_sampler("dc:2")])
    mixed = config_from_dict({**TRAIN_UNET, "optim": {**TRAIN_UNET["optim"], "mixup": 0.2},
                              "output": str(tmp_path / "c")})
    with pytest.raises(ConfigError, match="hard labels"):
        training.train(mixed, progress=False, log=lambda *_: None)


def test_cli_trains_evaluates_and_probes_the_generative_peer(tmp_path, capsys):
    run = tmp_path / "unet"
    args = ["train", "--model", "unet", "--dataset", "digits", "--output", str(run), "--no-progress",
            "--set", "optim.steps=40", "--set", "data.data_ratio=0.5", "--set", "optim.batch_size=32",
            "--set", "optim.opt=adamw",
            "--set", "model.kwargs={channels: [16, 32], timesteps: 200}"]
    assert main(args) == 0
    assert main(["eval", str(run), "--sampler", "dc:4", "--sampler", "dc:4:adaptive", "--limit", "24"]) == 0
    results = json.loads((run / "eval_test.json").read_text())["results"]
    assert results["dc:4"]["count"] == 24 and results["dc:4"]["evaluations_per_image"] == 40
    assert results["dc:4:adaptive"]["evaluations_per_image"] == 10 * 1 + 2 * 3
    capsys.readouterr()
    assert main(["probe", str(run), "--times", "20", "--blocks", "mid", "up1"]) == 0
    probe = json.loads((run / "probe.json").read_text())
    assert probe["block"] in ("mid", "up1") and probe["t"] == 20 and len(probe["candidates"]) == 2
    # the probe learns from the labels the UNet was trained with: its data ratio's subset, not the whole split
    data = training.load_trained_model(run)[2]["config"]["data"]
    whole = create_dataset("digits", "train", val_size=data["val_size"], seed=data["split_seed"])
    subset = create_dataset("digits", "train", val_size=data["val_size"], seed=data["split_seed"], data_ratio=0.5)
    assert probe["train_images"] == len(subset) < 0.6 * len(whole)
    assert probe["test"]["top1"] > 30.0  # 40 steps on digits; chance is 10%

    twin = tmp_path / "twin"
    assert main(["train", "--model", "test_resnet", "--dataset", "digits", "--output", str(twin), "--no-progress",
                 "--set", "optim.steps=2"]) == 0
    capsys.readouterr()
    assert main(["probe", str(twin)]) == 2
    assert "needs a generative model" in capsys.readouterr().err
