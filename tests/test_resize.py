"""The paper's resolution protocol: resize=R shows the network R x R images (area means of the original)."""

import pytest
import torch

from didicm.data import create_dataset
from didicm.data.degradations import parse_degradation
from didicm.errors import ConfigError


@pytest.mark.parametrize("size", [14, 7, 4])
def test_resize_is_the_mean_over_each_output_pixels_block(size):
    images = torch.rand(3, 1, 28, 28)
    out = parse_degradation(f"resize={size}")(images)
    block = 28 // size
    reference = images.reshape(3, 1, size, block, size, block).mean(dim=(3, 5))
    assert out.shape == (3, 1, size, size)
    torch.testing.assert_close(out, reference)


def test_resize_changes_the_reported_size_and_composes_with_noise():
    pipeline = parse_degradation("resize=7,noise=0.1")
    assert pipeline.output_size(28) == 7 and parse_degradation("resolution=7").output_size(28) == 28
    assert parse_degradation("resize=64").output_size(28) == 28  # never upsamples
    a = pipeline(torch.full((2, 1, 28, 28), 0.5), index=[0, 1])
    assert a.shape == (2, 1, 7, 7) and not torch.equal(a[0], a[1])


def test_an_in_memory_data_set_with_resize_holds_small_images():
    ds = create_dataset("digits", "val", degradation="resize=4")
    images, _ = ds.tensors()
    assert ds.image_size == 4 and images.shape[1:] == (1, 4, 4) and ds[0][0].shape == (1, 4, 4)


def test_resize_on_a_folder_names_the_option_to_use(tmp_path):
    from PIL import Image
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "train" / name / "x.png")
    with pytest.raises(ConfigError, match="image_size"):
        create_dataset(f"folder:{tmp_path}", "train", degradation="resize=4", val_size=0)
