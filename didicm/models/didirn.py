"""DiDiRN: the ResNets of the DiDiCM paper, conditioned on (c_t, sigma) in every block, and their twins.

A DiDiRN is a ResNet-18/34/50/101/152 (basic or bottleneck blocks) with a 3x3 stride-1 stem and, in every
block after the last conv + BN, the (sigma, label) embedding added per channel, then GroupNorm(32) + SiLU,
then the skip connection and ReLU (method.md, "DiDiRN"). The twin ``didirn*_twin`` is the same network with
the embedding and its per-block projections removed: it keeps the GroupNorm + SiLU and returns class logits,
so comparing a DiDiRN with its twin changes the method and nothing else.

Both are registered with timm: ``timm.create_model('didirn50', num_classes=1000)`` after ``import didicm``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import GroupNorm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, InputError
from .layers import (
    ChannelConditioning,
    ConditionedMLPHead,
    DiffusionClassifier,
    SigmaLabelEmbedding,
    check_condition,
    check_options,
    mask_reference,
    mean_log_score,
)

__all__ = ["BasicBlock", "Bottleneck", "DiDiRN", "DiDiRNTwin", "DIDIRN_NAMES", "TWIN_NAMES", "STEMS"]

# FX tracing treats the closed form as one call: its dtype branch would otherwise stop the tracer
torch.fx.wrap("mean_log_score")

STEMS = ("imagenet", "small")
STAGE_WIDTHS = (64, 128, 256, 512)
GROUPS = 32  # GroupNorm groups after the injection (official)


def _groups(channels: int) -> int:
    # 32 groups as the official net; narrow variants (width < 32) fall back to one channel per group.
    return min(GROUPS, channels)


def _device_dtype_kwargs(init):
    """Give a model constructor timm's ``device``/``dtype`` keywords (timm.create_model passes them).

    Every parameter and buffer is created on ``device`` (torch's device context, so 'meta' allocates nothing);
    ``dtype`` then applies to the floating-point ones, as ``Module.to`` does.
    """
    @functools.wraps(init)
    def wrapped(self, *args, device=None, dtype=None, **kwargs):
        with torch.device(device) if device is not None else contextlib.nullcontext():
            init(self, *args, **kwargs)
        if dtype is not None:
            self.to(dtype=dtype)
    return wrapped


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, [+ embedding], GroupNorm-SiLU, + skip, ReLU.

    Args:
        in_channels: channels of the input. channels: width of the block (its output, expansion 1).
        stride: stride of the first conv (and of the projection skip).
        embed_dim: width of the embedding to inject; None builds the twin's block (no injection).
        conditioning: 'add' or 'film'.
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, embed_dim: int | None = None,
                 conditioning: str = "add"):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.cond = ChannelConditioning(embed_dim, out_channels, conditioning) if embed_dim else None
        self.out_norm = GroupNorm(out_channels, num_groups=_groups(out_channels))
        self.act = nn.ReLU(inplace=True)
        self.downsample = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C_in, H, W] float, emb: [B, E] float or None -> [B, C_out, H / stride, W / stride]."""
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return _finish_block(self, out, x, emb)


class Bottleneck(nn.Module):
    """1x1 conv-BN-ReLU, 3x3 conv-BN-ReLU (stride here), 1x1 conv-BN, [+ embedding], GroupNorm-SiLU, + skip, ReLU.

    Same arguments as ``BasicBlock``; the output has ``4 * channels`` channels.
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, embed_dim: int | None = None,
                 conditioning: str = "add"):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.cond = ChannelConditioning(embed_dim, out_channels, conditioning) if embed_dim else None
        self.out_norm = GroupNorm(out_channels, num_groups=_groups(out_channels))
        self.act = nn.ReLU(inplace=True)
        self.downsample = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C_in, H, W] float, emb: [B, E] float or None -> [B, 4 C, H / stride, W / stride]."""
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return _finish_block(self, out, x, emb)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN on the skip path where the shape changes, else None (identity skip)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


def _finish_block(block: BasicBlock | Bottleneck, out: torch.Tensor, x: torch.Tensor,
                  emb: torch.Tensor | None) -> torch.Tensor:
    """The tail both block kinds share: inject, GroupNorm + SiLU, add the skip, ReLU."""
    if block.cond is not None:
        if emb is None:
            raise InputError("this block is conditioned and needs the (sigma, label) embedding")
        out = block.cond(out, emb)
    out = F.silu(block.out_norm(out))
    skip = x if block.downsample is None else block.downsample(x)
    return block.act(out + skip)


class _DiDiRNTrunk(nn.Module):
    """Stem, four stages, average pool and linear head; the part a DiDiRN and its twin share.

    Args:
        block: BasicBlock or Bottleneck. layers: blocks per stage, e.g. (3, 4, 6, 3).
        num_classes: K. in_chans: input channels (1 for grey images).
        stem: 'imagenet' (3x3 stride-1 conv, BN, ReLU, 3x3 stride-2 max-pool: official) or 'small' (no
            max-pool, for 28-64 px inputs).
        drop_rate: dropout before the linear head.
        zero_init_head: start the linear head at zero (see ``DiDiRN``).
        embed_dim: width of the injected embedding; None for the twin.
        conditioning: 'add' or 'film'.
        conditioned_stages: how many of the final stages get the embedding (4: all of them).
    """

    _headless_ok = False  # num_classes=0 (features out, timm's convention): the twin only

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], num_classes: int = 1000,
                 in_chans: int = 3, stem: str = "imagenet", drop_rate: float = 0.0, zero_init_head: bool = True,
                 embed_dim: int | None = None, conditioning: str = "add", width: int = STAGE_WIDTHS[0],
                 conditioned_stages: int = len(STAGE_WIDTHS)):
        super().__init__()
        if int(width) != width or width < 1:
            raise ConfigError(f"width must be a positive integer (64 is the official ResNet), got {width!r}")
        widths = tuple(int(width) * 2**i for i in range(len(STAGE_WIDTHS)))
        if stem not in STEMS:
            raise ConfigError(f"unknown stem {stem!r}; choose one of {STEMS} ('small' drops the max-pool)")
        if int(num_classes) != num_classes or num_classes < 2 and not (self._headless_ok and num_classes == 0):
            raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if int(in_chans) != in_chans or in_chans < 1:
            raise ConfigError(f"in_chans must be a positive integer, got {in_chans!r}")
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.stem_type = stem
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()

        if len(layers) != len(STAGE_WIDTHS):
            raise ConfigError(f"layers must give the number of blocks of each of the 4 stages, got {layers!r}")
        stages, in_channels = [], widths[0]
        first_conditioned = len(STAGE_WIDTHS) - conditioned_stages
        for index, (stage_width, depth) in enumerate(zip(widths, layers, strict=True)):
            blocks = []
            stage_embed_dim = embed_dim if index >= first_conditioned else None
            for block_index in range(depth):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(block(in_channels, stage_width, stride, stage_embed_dim, conditioning))
                in_channels = stage_width * block.expansion
            stages.append(nn.ModuleList(blocks))
        self.stages = nn.ModuleList(stages)
        self.num_features = self.head_hidden_size = in_channels
        self.global_pool = "avg"
        self.grad_checkpointing = False
        # timm's feature metadata: the stem's activation, then each stage's output (reduction = input / map side)
        reduction = 2 if stem == "imagenet" else 1
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="act1")]
        for index, stage_width in enumerate(widths):
            reduction *= 2 if index else 1
            self.feature_info.append(dict(num_chs=stage_width * block.expansion, reduction=reduction,
                                          module=f"stages.{index}"))
        self.fc = nn.Linear(in_channels, self.num_classes) if self.num_classes else nn.Identity()
        self._init_weights(zero_init_head)

    def _init_weights(self, zero_init_head: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_head and isinstance(self.fc, nn.Linear):
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def run_trunk(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, in_chans, H, W] float -> feature map [B, num_features, H', W'] float."""
        return self.forward_stages(self.forward_stem(x), emb)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_chans, H, W] float -> [B, width, H', W'] float, the input of the first stage."""
        return self.maxpool(self._stem_act(x))

    def _stem_act(self, x: torch.Tensor) -> torch.Tensor:
        # Proxies (FX tracing) are not tensors and skip the check
        if isinstance(x, torch.Tensor) and (x.ndim != 4 or x.shape[1] != self.in_chans):
            raise InputError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}; "
                             f"set in_chans to the number of image channels")
        return self.act1(self.bn1(self.conv1(x)))

    def forward_stages(self, out: torch.Tensor, emb: torch.Tensor | None = None, start: int = 0,
                       stop: int | None = None) -> torch.Tensor:
        """Run stages [start, stop) on a feature map; blocks without conditioning ignore ``emb``."""
        for stage in self.stages[start:stop]:
            for block in stage:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    out = checkpoint(block, out, emb, use_reentrant=False)
                else:
                    out = block(out, emb)
        return out

    def _intermediates(self, x: torch.Tensor, emb: torch.Tensor | None, indices, stop_early: bool,
                       output_fmt: str, intermediates_only: bool):
        """timm's forward_intermediates on the trunk: taps 0 (stem activation) .. 4 (last stage)."""
        if output_fmt != "NCHW":
            raise ConfigError(f"DiDiRN feature maps are NCHW; output_fmt={output_fmt!r} is not supported")
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        intermediates = []
        out = self._stem_act(x)
        if 0 in take_indices:
            intermediates.append(out)
        out = self.maxpool(out)
        last = max_index if stop_early else len(self.stages)
        for index in range(last):
            out = self.forward_stages(out, emb, index, index + 1)
            if index + 1 in take_indices:
                intermediates.append(out)
        return intermediates if intermediates_only else (out, intermediates)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations (timm API)."""
        self.grad_checkpointing = enable

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """[B, C, H', W'] feature map -> [B, K] outputs (or the pooled [B, C] features with ``pre_logits``)."""
        pooled = features.mean(dim=(2, 3)) if self.global_pool == "avg" else features
        if self.global_pool != "avg" and not isinstance(self.fc, nn.Identity) and not pre_logits:
            raise ConfigError("global_pool='' gives feature maps, which a linear head cannot take: use "
                              "num_classes=0 with it, or global_pool='avg'")
        if self.drop_rate:
            pooled = F.dropout(pooled, p=float(self.drop_rate), training=self.training)
        return pooled if pre_logits else self.fc(pooled)

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> str | nn.Module:
        return "fc" if name_only else self.fc

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise lr decay: stem (+ embedding), then stages or blocks."""
        return dict(stem=r"^conv1|^bn1|^embed", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")


class DiDiRN(DiffusionClassifier, _DiDiRNTrunk):
    """The DiDiCM ResNet: forward(x, c, sigma) -> log-ratios [B, K] with the entry at c fixed to 0.

    The output layer starts at zero (``zero_init_head``): a fresh network then predicts every ratio to be 1,
    which is the exact score of the uniform posterior, so the first loss is finite and moderate and the early
    gradients do not chase a random initial score. The official code keeps PyTorch's default init; pass
    ``zero_init_head=False`` for it.

    Args:
        block, layers: the ResNet variant (see ``_DiDiRNTrunk``).
        num_classes: K. in_chans: image channels. stem: 'imagenet' or 'small'. drop_rate: dropout before fc.
        parametrization: 'score' (the network outputs log-ratios, official) or 'mean' (it outputs clean
            logits and the log-ratios follow from the closed form; see ``mean_log_score``).
        conditioning: 'add' (official per-channel bias) or 'film' (per-channel scale and shift).
        condition_inputs: False removes the (sigma, label) inputs ('mean' only); the network is then the twin's
            backbone and ``encode`` returns its clean logits, so a CP run costs one forward pass.
        embed_dim: embedding width (128 official).
        clean_sigma: the noise level at which ``clean_logits`` queries a conditioned 'mean' network.
        zero_init_head: see above.
        width: channels of the stem and first stage (doubling per stage); 64 is the official network, smaller
            values give the narrow variants that CPU-sized studies need.
        conditioned_stages: how many of the final stages receive the embedding: 4 (every block, the official
            network), 3, 2, 1, or 0 (no block: a ``ConditionedMLPHead`` on the pooled features replaces fc).
            Everything before the first conditioned block runs once per image in ``encode``, so an S-step CP
            prediction costs one pass of that part plus S passes of the rest.
        head_width, head_depth: hidden width and residual blocks of that head (conditioned_stages=0 only;
            default 256 and 2, as ``BackboneDiDiCM``).
    """

    @_device_dtype_kwargs
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], num_classes: int = 1000,
                 in_chans: int = 3, stem: str = "imagenet", parametrization: str = "score",
                 conditioning: str = "add", condition_inputs: bool = True, embed_dim: int = 128,
                 drop_rate: float = 0.0, clean_sigma: float = 1.0, zero_init_head: bool = True,
                 width: int = STAGE_WIDTHS[0], conditioned_stages: int = len(STAGE_WIDTHS),
                 head_width: int | None = None, head_depth: int | None = None):
        check_options(parametrization, conditioning, condition_inputs)
        num_stages = len(STAGE_WIDTHS)
        if isinstance(conditioned_stages, bool) or conditioned_stages not in range(num_stages + 1):
            raise ConfigError(f"conditioned_stages must be an integer from 0 to {num_stages} (the final stages that "
                              f"receive the embedding; {num_stages} is the official network), got "
                              f"{conditioned_stages!r}")
        if not condition_inputs and conditioned_stages != num_stages:
            raise ConfigError("condition_inputs=False conditions no stage; leave conditioned_stages at its default")
        if conditioned_stages and (head_width is not None or head_depth is not None):
            raise ConfigError("head_width and head_depth shape the conditioned head of conditioned_stages=0 only")
        super().__init__(block, layers, num_classes=num_classes, in_chans=in_chans, stem=stem, drop_rate=drop_rate,
                         zero_init_head=zero_init_head, embed_dim=embed_dim if condition_inputs else None,
                         conditioning=conditioning, width=width, conditioned_stages=int(conditioned_stages))
        self.parametrization = parametrization
        self.conditioning = conditioning
        self.condition_inputs = condition_inputs
        self.clean_sigma = float(clean_sigma)
        self.conditioned_stages = int(conditioned_stages)
        self.first_conditioned_stage = num_stages - self.conditioned_stages
        # Created after the trunk so that conditioned_stages=4 draws the same initial weights as before it existed.
        if condition_inputs and self.conditioned_stages == 0:
            self.embed = None  # the head has its own
            self.fc = nn.Identity()  # the head's output layer replaces it; no unused parameters
            self.head = ConditionedMLPHead(self.num_features, self.num_classes,
                                           width=256 if head_width is None else head_width,
                                           depth=2 if head_depth is None else head_depth, embed_dim=embed_dim,
                                           conditioning=conditioning, drop_rate=drop_rate)
        else:
            self.embed = SigmaLabelEmbedding(self.num_classes, embed_dim) if condition_inputs else None
            self.head = None
        # What ``encode`` returns: the input of the first conditioned stage, or the pooled features for a head.
        first = self.first_conditioned_stage
        self.encoded_channels = self.num_features if self.head is not None or first == num_stages else \
            int(width) * (2 ** (first - 1) * block.expansion if first else 1)

    @property
    def _encodes_logits(self) -> bool:
        # A network that never sees (c, sigma) gives the same clean logits at every step: compute them once.
        return self.parametrization == "mean" and not self.condition_inputs

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the network that does not see (c, sigma), run once per image.

        x: [B, in_chans, H, W] float -> the stem and unconditioned stages' feature map [B, encoded_channels,
        H', W'] (the stem only for conditioned_stages=4), the pooled features [B, num_features] for
        conditioned_stages=0, or, for a 'mean' network without the (c, sigma) inputs, its clean logits [B, K].
        """
        if self._encodes_logits:
            return self.clean_logits(x)
        out = self.forward_stages(self.forward_stem(x), None, 0, self.first_conditioned_stage)
        return out.mean(dim=(2, 3)) if self.head is not None else out

    def score(self, z: torch.Tensor, c: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """z: the output of ``encode``; c: [B] long; sigma: [B] float or scalar -> log_score [B, K] float,
        exactly 0 at c. Costs one pass of the conditioned stages (or head)."""
        c, sigma = check_condition(c, sigma, z.shape[0], self.num_classes)
        out = z if self._encodes_logits else self._conditioned_outputs(z, c, sigma)
        if self.parametrization == "mean":
            return mean_log_score(out, c, sigma)
        return mask_reference(out, c)

    def _conditioned_outputs(self, z: torch.Tensor, c: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Raw outputs [B, K] (log-ratios or clean logits) of the conditioned part on encoded ``z``."""
        # Proxies (FX tracing) are not tensors and skip the check; concrete and fake tensors get it.
        expected_ndim = 2 if self.head is not None else 4
        if isinstance(z, torch.Tensor) and (z.ndim != expected_ndim or z.shape[1] != self.encoded_channels):
            raise InputError(f"score expects the output of encode ({expected_ndim}-d with {self.encoded_channels} "
                             f"channels), got shape {tuple(z.shape)}; call model.score(model.encode(x), c, sigma)")
        if self.head is not None:
            return self.head(z, c, sigma)
        emb = self.embed(c, sigma)
        return self.forward_head(self.forward_stages(z, emb, self.first_conditioned_stage))

    def clean_logits(self, x: torch.Tensor, c: torch.Tensor | None = None,
                     sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        """Logits of p0(. | x) [B, K] from one forward pass ('mean' parametrization only).

        A network with the (c, sigma) inputs is queried at ``c`` (default: label 0) and ``sigma`` (default:
        ``clean_sigma``): for an ideal network every (c, sigma) gives the same posterior, because the exact
        log-ratios depend on x only through p0(. | x).
        """
        if self.parametrization != "mean":
            raise ConfigError("clean_logits needs parametrization='mean'; a 'score' network gives the posterior "
                              "through a sampler (didicm.CPSampler)")
        if not self.condition_inputs:
            return self.forward_head(self.run_trunk(x))
        batch = x.shape[0]
        c = torch.zeros(batch, dtype=torch.long, device=x.device) if c is None else c
        c, sigma = check_condition(c, self.clean_sigma if sigma is None else sigma, batch, self.num_classes)
        return self._conditioned_outputs(self.encode(x), c, sigma)


    def forward_intermediates(self, x: torch.Tensor, c: torch.Tensor, sigma: torch.Tensor | float,
                              indices: int | list[int] | None = None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API with the condition: feature maps at ``indices`` (0: stem activation, 1-4: stages) of
        the network at (c, sigma), and the final map unless ``intermediates_only``."""
        c, sigma = check_condition(c, sigma, x.shape[0], self.num_classes)
        emb = self.embed(c, sigma) if getattr(self, "embed", None) is not None else None
        return self._intermediates(x, emb, indices, stop_early, output_fmt, intermediates_only)

class DiDiRNTwin(_DiDiRNTrunk):
    """The DiDiRN backbone without conditioning, trained as a classifier: forward(x) -> logits [B, K].

    Same arguments as ``DiDiRN`` without the diffusion options; the head starts at zero too, so both start
    from the uniform prediction. As every timm classifier: num_classes=0 returns pooled features, global_pool=''
    (with num_classes=0) the feature map; ``features_only=True`` in timm.create_model gives the five feature maps
    of ``forward_intermediates``.
    """

    _headless_ok = True

    @_device_dtype_kwargs
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], num_classes: int = 1000,
                 in_chans: int = 3, stem: str = "imagenet", drop_rate: float = 0.0, zero_init_head: bool = True,
                 width: int = STAGE_WIDTHS[0], global_pool: str = "avg"):
        super().__init__(block, layers, num_classes=num_classes, in_chans=in_chans, stem=stem, drop_rate=drop_rate,
                         zero_init_head=zero_init_head, embed_dim=None, width=width)
        self.global_pool = self._check_pool(global_pool)

    @staticmethod
    def _check_pool(global_pool: str) -> str:
        if global_pool not in ("avg", ""):
            raise ConfigError(f"DiDiRN twins pool by averaging ('avg') or not at all (''), got {global_pool!r}")
        return global_pool

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> feature map [B, num_features, H', W']."""
        return self.run_trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_chans, H, W] float -> class logits [B, K] float."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API: the final feature map and the maps at ``indices`` (0: stem activation, 1-4:
        stages; an int n takes the last n), or the maps only. ``norm`` is accepted for timm (nothing to apply)."""
        return self._intermediates(x, None, indices, stop_early, output_fmt, intermediates_only)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last feature map in ``indices`` (timm API); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        for index in range(max_index, len(self.stages)):
            self.stages[index] = nn.ModuleList()
        if max_index == 0:
            self.maxpool = nn.Identity()
        if max_index < len(self.stages):
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True  # the head was sized for the last stage
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the linear head (timm API, for fine-tuning), on the model's device and dtype; global_pool: None
        keeps the pooling, 'avg' or '' (feature maps, with num_classes=0)."""
        self.global_pool = self._check_pool(self.global_pool if global_pool is None else global_pool)
        self.num_classes = num_classes
        ref = next(self.parameters())
        self.fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0 \
            else nn.Identity()
        self.fc.train(self.training)


# ---- timm registration ------------------------------------------------------------------------------------
_VARIANTS = {
    "didirn18": (BasicBlock, (2, 2, 2, 2)),
    "didirn34": (BasicBlock, (3, 4, 6, 3)),
    "didirn50": (Bottleneck, (3, 4, 6, 3)),
    "didirn101": (Bottleneck, (3, 4, 23, 3)),
    "didirn152": (Bottleneck, (3, 8, 36, 3)),
}
DIDIRN_NAMES = tuple(_VARIANTS)
TWIN_NAMES = tuple(f"{name}_twin" for name in _VARIANTS)


def _cfg(**kwargs) -> dict[str, Any]:
    # No weights are published in a timm-loadable form: the configs carry the data settings only.
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (14, 14), "crop_pct": 0.875,
        "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "mit", **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in DIDIRN_NAMES + TWIN_NAMES})


def _create(variant: str, pretrained: bool, **kwargs) -> DiDiRN | DiDiRNTwin:
    if pretrained:
        raise ConfigError(f"no pretrained weights exist for {variant}; create it with pretrained=False and load "
                          f"a didicm checkpoint instead")
    is_twin = variant.endswith("_twin")
    block, layers = _VARIANTS[variant.removesuffix("_twin")]
    if kwargs.get("features_only") and not is_twin:
        raise ConfigError(f"features_only needs an image-only network and {variant} also takes (c, sigma): use "
                          f"{variant}_twin, or call model.forward_intermediates(x, c, sigma)")
    model_cls = DiDiRNTwin if is_twin else DiDiRN
    # features_only goes through forward_intermediates (timm's FeatureGetterNet)
    feature_cfg = dict(feature_cls="getter") if is_twin else None
    return build_model_with_cfg(model_cls, variant, pretrained, block=block, layers=layers, feature_cfg=feature_cfg,
                                **kwargs)


@register_model
def didirn18(pretrained: bool = False, **kwargs) -> DiDiRN:
    """DiDiRN-18: basic blocks (2, 2, 2, 2), conditioned on (c_t, sigma)."""
    return _create("didirn18", pretrained, **kwargs)


@register_model
def didirn34(pretrained: bool = False, **kwargs) -> DiDiRN:
    """DiDiRN-34: basic blocks (3, 4, 6, 3), conditioned on (c_t, sigma)."""
    return _create("didirn34", pretrained, **kwargs)


@register_model
def didirn50(pretrained: bool = False, **kwargs) -> DiDiRN:
    """DiDiRN-50: bottleneck blocks (3, 4, 6, 3), conditioned on (c_t, sigma)."""
    return _create("didirn50", pretrained, **kwargs)


@register_model
def didirn101(pretrained: bool = False, **kwargs) -> DiDiRN:
    """DiDiRN-101: bottleneck blocks (3, 4, 23, 3), conditioned on (c_t, sigma)."""
    return _create("didirn101", pretrained, **kwargs)


@register_model
def didirn152(pretrained: bool = False, **kwargs) -> DiDiRN:
    """DiDiRN-152: bottleneck blocks (3, 8, 36, 3), conditioned on (c_t, sigma)."""
    return _create("didirn152", pretrained, **kwargs)


@register_model
def didirn18_twin(pretrained: bool = False, **kwargs) -> DiDiRNTwin:
    """The classifier twin of DiDiRN-18: same backbone, no conditioning, logits out."""
    return _create("didirn18_twin", pretrained, **kwargs)


@register_model
def didirn34_twin(pretrained: bool = False, **kwargs) -> DiDiRNTwin:
    """The classifier twin of DiDiRN-34."""
    return _create("didirn34_twin", pretrained, **kwargs)


@register_model
def didirn50_twin(pretrained: bool = False, **kwargs) -> DiDiRNTwin:
    """The classifier twin of DiDiRN-50."""
    return _create("didirn50_twin", pretrained, **kwargs)


@register_model
def didirn101_twin(pretrained: bool = False, **kwargs) -> DiDiRNTwin:
    """The classifier twin of DiDiRN-101."""
    return _create("didirn101_twin", pretrained, **kwargs)


@register_model
def didirn152_twin(pretrained: bool = False, **kwargs) -> DiDiRNTwin:
    """The classifier twin of DiDiRN-152."""
    return _create("didirn152_twin", pretrained, **kwargs)
