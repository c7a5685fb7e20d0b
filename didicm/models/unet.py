"""The generative peer: a class-conditional image diffusion model (diffusers' UNet2DModel + DDPM noise levels).

It is trained with the usual epsilon-prediction loss and label dropout, so one network gives both conditional
and unconditional noise predictions. ``didicm.peers`` turns it into a classifier two ways: the Diffusion
Classifier (the class with the lowest conditional denoising error) and a linear probe on its features.
diffusers is an optional dependency: ``pip install didicm[peers]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import value_checks_enabled
from ..errors import ConfigError, InputError
from .layers import unwrap_model

__all__ = ["ConditionalUNet", "is_generative_model"]


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ConfigError("the generative peers need diffusers: pip install 'didicm[peers]'") from None
    return diffusers


class ConditionalUNet(nn.Module):
    """eps_theta(x_t, t, c): a small UNet with a class embedding; class index K is the null (no-label) class.

    Args:
        num_classes: K (>= 2). in_chans: image channels.
        channels: output channels of each resolution level. Images whose sides are not multiples of
            2^(levels-1) are zero-padded to the next multiple inside ``forward`` and the prediction cropped back
            (the study's 14 and 7 px inputs under the paper's resize protocol: 14 -> 16, 7 -> 8 at 3 levels).
        layers_per_block: ResNet blocks per level. norm_groups: GroupNorm groups (must divide every width).
        timesteps: T of the DDPM chain. beta_schedule: diffusers' name ('linear', 'squaredcos_cap_v2', ...).
        label_dropout: probability of replacing the label by the null class in training.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, channels: tuple[int, ...] = (32, 64, 64),
                 layers_per_block: int = 1, norm_groups: int = 8, timesteps: int = 1000,
                 beta_schedule: str = "linear", label_dropout: float = 0.1):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"the generative model needs num_classes >= 2, got {num_classes!r}")
        if not 0.0 <= label_dropout < 1.0:
            raise ConfigError(f"label_dropout must be in [0, 1), got {label_dropout}")
        channels = tuple(int(c) for c in channels)
        if any(c % norm_groups for c in channels):
            raise ConfigError(f"every width in channels={channels} must be divisible by norm_groups={norm_groups}")
        diffusers = _import_diffusers()
        self.num_classes, self.in_chans, self.levels = num_classes, in_chans, len(channels)
        self.label_dropout, self.timesteps = float(label_dropout), int(timesteps)
        self.unet = diffusers.UNet2DModel(
            in_channels=in_chans, out_channels=in_chans, block_out_channels=channels,
            layers_per_block=layers_per_block, norm_num_groups=norm_groups, num_class_embeds=num_classes + 1,
            down_block_types=("DownBlock2D",) * len(channels), up_block_types=("UpBlock2D",) * len(channels),
            add_attention=False)
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=timesteps, beta_schedule=beta_schedule)
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)
        # softmax(-scale * error) turns Diffusion-Classifier errors into probabilities; fit on validation at the
        # end of training (for the draws of that check: other draw counts would be fit best by another scale)
        self.register_buffer("error_scale", torch.tensor(1.0))
        self.register_buffer("error_scale_fitted", torch.tensor(False))

    @property
    def null_class(self) -> int:
        return self.num_classes

    def check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise InputError(f"expected images [B, {self.in_chans}, H, W], got {tuple(images.shape)}")

    def add_noise(self, images: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with t [B] integer timesteps."""
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(images.dtype)
        return abar.sqrt() * images + (1 - abar).sqrt() * noise

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The predicted noise [B, C, H, W]; labels [B] in 0..K (K = unconditional)."""
        if value_checks_enabled() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise InputError(f"labels must lie in 0..{self.num_classes} (K = {self.num_classes} is the null "
                             f"class), got {labels.min().item()}..{labels.max().item()}")
        # diffusers' UNet halves the sides levels-1 times and concatenates skips of equal size, so other sizes
        # are padded with zeros (outside the image, in x_t space) and the prediction is cropped back: the loss and
        # the Diffusion Classifier's errors only ever see the image's own pixels
        side = 2 ** (self.levels - 1)
        height, width = noisy.shape[-2:]
        pad_h, pad_w = -height % side, -width % side
        if not pad_h and not pad_w:
            return self.unet(noisy, t, class_labels=labels).sample
        top, left = pad_h // 2, pad_w // 2
        padded = F.pad(noisy, (left, pad_w - left, top, pad_h - top))
        return self.unet(padded, t, class_labels=labels).sample[..., top:top + height, left:left + width]

    def feature_modules(self) -> dict[str, nn.Module]:
        """The blocks whose (pooled) activations the linear probe may use, from input to output."""
        blocks = {f"down{i}": block for i, block in enumerate(self.unet.down_blocks)}
        blocks["mid"] = self.unet.mid_block
        blocks.update({f"up{i}": block for i, block in enumerate(self.unet.up_blocks)})
        return blocks


def is_generative_model(model: nn.Module) -> bool:
    """True for the class-conditional image diffusion model (looks through DDP / torch.compile wrappers)."""
    return isinstance(unwrap_model(model), ConditionalUNet)
