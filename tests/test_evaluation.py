"""Sampler specs and the test-time-augmentation control."""

import pytest
import torch

from didicm.errors import ConfigError
from didicm.evaluation import evaluate, parse_sampler, predict


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("text,name,evals", [("cp:8", "cp:8", 8), ("cp:2:max", "cp:2:max", 2),
                                             ("cp:8:min:official", "cp:8:min:official", 8),
                                             ("cp:8:exponential", "cp:8:exponential", 8),
                                             ("cp:4:exponential:official:max", "cp:4:max:official:exponential", 4),
                                             ("cl:8x10", "cl:8x10", 80), ("tta:4", "tta:4", 4),
                                             ("classifier", "classifier", 1), ("mean", "mean", 1)])
def test_sampler_specs_round_trip_and_count_network_passes(text, name, evals):
    spec = parse_sampler(text)
    assert spec.name == name and spec.evaluations_per_image == evals
    assert parse_sampler(spec.name) == spec  # the canonical name reads back as the same sampler


@pytest.mark.parametrize("bad", ["cp", "cp:0", "cl:8x0", "tta", "cp:8:middle", "nonsense", "cp:8:max:min",
                                 "cp:8:exponential:euler", "cl:8x10:exponential"])
def test_bad_sampler_specs_are_refused(bad):
    with pytest.raises(ConfigError):
        parse_sampler(bad)


def test_tta_averages_the_softmax_over_the_image_and_its_views():
    model, x = _Linear(), torch.randn(5, 4)
    shift = torch.tensor([0.5, -1.0, 0.0, 2.0])
    probs = predict(model, x, parse_sampler("tta:3"), augment=lambda images, generator: images + shift)
    expected = (torch.softmax(model(x), 1) + 2 * torch.softmax(model(x + shift), 1)) / 3
    torch.testing.assert_close(probs, expected.detach())
    # identity views give back the plain classifier
    same = predict(model, x, parse_sampler("tta:4"), augment=lambda images, generator: images)
    torch.testing.assert_close(same, predict(model, x, parse_sampler("classifier")))
    with pytest.raises(ConfigError, match="augmentation"):
        predict(model, x, parse_sampler("tta:2"))


def test_evaluate_reports_each_sampler_on_the_same_images():
    model = _Linear()
    batches = [(torch.randn(6, 4), torch.randint(0, 3, (6,))) for _ in range(2)]
    results = evaluate(model, batches, [parse_sampler("classifier"), parse_sampler("tta:2")],
                       augment=lambda images, generator: images.flip(1))
    assert results["classifier"]["count"] == results["tta:2"]["count"] == 12
    assert results["tta:2"]["evaluations_per_image"] == 2
