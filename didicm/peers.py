"""Classifying with a class-conditional image diffusion model: the two peers DiDiCM is compared with.

- Diffusion Classifier (Li et al. 2023): for each class c, a Monte Carlo estimate of the conditional denoising
  error E_{t,eps} ||eps - eps_theta(x_t, t, c)||^2, with the *same* (t, eps) draws for every class so that
  their noise cancels in the comparison; the class with the lowest error wins, and softmax(-scale * error)
  gives probabilities (scale fit on validation). Optional adaptive elimination: after a first share of the
  draws only the most likely classes get the rest.
- Diffusion features (Mukhopadhyay et al. 2023): the pooled activations of one block of the frozen network at
  one noise level, with a linear classifier on top; block and t are chosen on the validation split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, InputError
from .models.unet import ConditionalUNet, is_generative_model

__all__ = ["draw_shared", "denoising_errors", "classify", "evaluations_per_image", "probabilities",
           "fit_error_scale", "calibrate_error_scale", "extract_features", "LinearProbe", "fit_linear_probe",
           "FeatureProbe", "fit_feature_probe"]


def _check(model) -> ConditionalUNet:
    if not is_generative_model(model):
        raise ConfigError(f"this needs the class-conditional image diffusion model (model name 'unet'), "
                          f"got a {type(model).__name__}")
    return model


def draw_shared(images: torch.Tensor, draws: int, timesteps: int, generator: torch.Generator | None = None):
    """(t [B, N] long, noise [B, N, C, H, W]): N draws per image, stratified over (0, T) (one t per 1/N of the
    chain, as evenly spaced as the paper's, with a random offset per image), shared by all classes."""
    batch = images.shape[0]
    offset = torch.rand(batch, 1, generator=generator, device=images.device)
    t = ((torch.arange(draws, device=images.device) + offset) / draws * timesteps).long().clamp(0, timesteps - 1)
    noise = torch.randn((batch, draws, *images.shape[1:]), generator=generator, device=images.device,
                        dtype=images.dtype)
    return t, noise


@torch.no_grad()
def denoising_errors(model, images: torch.Tensor, candidates: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     chunk: int | None = None) -> torch.Tensor:
    """Per-draw errors [B, M, N]: mean squared error of eps_theta(x_t, t, c) for each image b, candidate class
    candidates[b, m] and draw n. Every (b, m, n) is one network input; they run in chunks of ``chunk``
    (default 4096 on a GPU, 64 on a CPU, where big chunks only thrash memory)."""
    model = _check(model)
    chunk = chunk or (4096 if images.is_cuda else 64)
    batch, count = candidates.shape
    draws = t.shape[1]
    noisy = model.add_noise(images.repeat_interleave(draws, 0), t.reshape(-1), noise.flatten(0, 1))
    noisy = noisy.view(batch, draws, *images.shape[1:])
    index = torch.arange(batch * count * draws, device=images.device)
    b, m, n = index // (count * draws), (index // draws) % count, index % draws
    errors = torch.empty(batch * count * draws, device=images.device)
    for start in range(0, index.numel(), chunk):
        sl = slice(start, start + chunk)
        pred = model(noisy[b[sl], n[sl]], t[b[sl], n[sl]], candidates[b[sl], m[sl]])
        errors[sl] = (pred.float() - noise[b[sl], n[sl]].float()).pow(2).flatten(1).mean(1)
    return errors.view(batch, count, draws)


@torch.no_grad()
def classify(model, images: torch.Tensor, draws: int, generator: torch.Generator | None = None,
             adaptive: bool = False, chunk: int | None = None) -> tuple[torch.Tensor, float]:
    """The Diffusion Classifier's mean errors [B, K] and its network evaluations per image.

    ``adaptive``: every fourth draw (so all noise levels are represented) scores every class; the remaining draws
    go only to the max(2, ceil(K/5)) classes with the lowest error so far. As in the paper, the prediction is the
    best survivor; an eliminated class keeps its first-stage error, moved onto the full-draw scale by the
    survivors' mean shift and never below the worst survivor, so its probability stays finite and lower.
    Without it, all K classes get all ``draws`` draws.
    """
    model = _check(model)
    model.check_images(images)
    if draws < 1:
        raise ConfigError(f"the Diffusion Classifier needs at least one draw, got {draws}")
    batch, classes = images.shape[0], model.num_classes
    t, noise = draw_shared(images, draws, model.timesteps, generator)
    all_classes = torch.arange(classes, device=images.device).expand(batch, classes)
    cost = evaluations_per_image(classes, draws, adaptive)
    if not adaptive or draws < 4:
        return denoising_errors(model, images, all_classes, t, noise, chunk).mean(2), cost
    _, keep = _stages(classes, draws)
    first = torch.arange(0, draws, 4, device=images.device)
    later = torch.tensor([n for n in range(draws) if n % 4], device=images.device)
    screen = denoising_errors(model, images, all_classes, t[:, first], noise[:, first], chunk).mean(2)  # [B, K]
    survivors = screen.topk(keep, dim=1, largest=False).indices
    rest = denoising_errors(model, images, survivors, t[:, later], noise[:, later], chunk)
    screened = screen.gather(1, survivors)
    full = (screened * len(first) + rest.sum(2)) / draws  # survivors: the mean over all draws
    shift = (full - screened).mean(1, keepdim=True)
    errors = torch.maximum(screen + shift, full.max(1, keepdim=True).values)
    return errors.scatter(1, survivors, full), cost


def _stages(classes: int, draws: int) -> tuple[int, int]:
    """(draws on every class, classes kept for the remaining draws) of the adaptive Diffusion Classifier."""
    return math.ceil(draws / 4), max(2, math.ceil(classes / 5))


def evaluations_per_image(classes: int, draws: int, adaptive: bool = False) -> float:
    """Network evaluations per image of ``classify``."""
    if not adaptive or draws < 4:
        return float(classes * draws)
    first, keep = _stages(classes, draws)
    return float(classes * first + keep * (draws - first))


def probabilities(errors: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """softmax(-scale * errors) [B, K], computed stably."""
    centred = errors.float() - errors.float().min(dim=1, keepdim=True).values
    return torch.softmax(-float(scale) * centred, dim=1)


def fit_error_scale(errors: torch.Tensor, labels: torch.Tensor) -> float:
    """The scale s that minimises the NLL of softmax(-s * errors) (a 1-D search on a log grid, then refined)."""
    errors, labels = errors.double().cpu(), labels.long().cpu()
    centred = errors - errors.min(dim=1, keepdim=True).values

    def nll(scale: float) -> float:
        return F.cross_entropy(-scale * centred, labels).item()

    grid = torch.logspace(-2, 5, 71).tolist()
    best = min(grid, key=nll)
    fine = torch.logspace(math.log10(best) - 0.1, math.log10(best) + 0.1, 21).tolist()
    return float(min(fine, key=nll))


@torch.no_grad()
def calibrate_error_scale(model, batches, draws: int, seed: int = 0, adaptive: bool = False) -> float:
    """Fit the generative model's ``error_scale`` (softmax(-scale * error) probabilities) to minimise the
    Diffusion Classifier's NLL on ``batches`` (validation images); stores it in the model and returns it."""
    model.eval()
    errors, labels, generator = [], [], None
    for images, targets in batches:
        if generator is None:
            generator = torch.Generator(device=images.device).manual_seed(seed)
        errors.append(classify(model, images, draws, generator, adaptive=adaptive)[0].cpu())
        labels.append(targets.cpu())
    scale = fit_error_scale(torch.cat(errors), torch.cat(labels))
    model.error_scale.fill_(scale)
    model.error_scale_fitted.fill_(True)
    return scale


@torch.no_grad()
def extract_features(model, images: torch.Tensor, t: int, names: list[str] | None = None,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Pooled activations {block: [B, C]} of the unconditional network at noise level t (one noise draw)."""
    model = _check(model)
    model.check_images(images)
    modules = model.feature_modules()
    names = list(modules) if names is None else names
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ConfigError(f"unknown feature blocks {unknown}; the model has {list(modules)}")
    if not 0 <= t < model.timesteps:
        raise ConfigError(f"feature time t={t} outside 0..{model.timesteps - 1}")
    found: dict[str, torch.Tensor] = {}

    def hook(name):
        def keep(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            found[name] = hidden.float().mean(dim=(2, 3))
        return keep

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        steps = torch.full((images.shape[0],), t, device=images.device, dtype=torch.long)
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        nulls = torch.full_like(steps, model.null_class)
        model(model.add_noise(images, steps, noise), steps, nulls)
    finally:
        for handle in handles:
            handle.remove()
    return found


@dataclass
class LinearProbe:
    """Standardise, then a linear map: logits = ((f - mean) / std) @ weight.T + bias."""
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        f = (features.float() - self.mean.to(features.device)) / self.std.to(features.device)
        return f @ self.weight.to(features.device).T + self.bias.to(features.device)


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     weight_decay: float = 1e-4, iterations: int = 200) -> LinearProbe:
    """Multinomial logistic regression on frozen features (full-batch L-BFGS; deterministic)."""
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise InputError(f"features [N, D] and labels [N] must match, got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    if not torch.isfinite(features).all():
        raise InputError("features contain NaN or Inf; the diffusion model's weights may be corrupt")
    features, labels = features.float(), labels.long()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


class FeatureProbe(nn.Module):
    """A plain classifier (forward(x) -> logits): frozen diffusion features at (block, t) plus a linear probe.
    The noise draw is fixed by ``seed`` per call, so predictions are deterministic."""

    def __init__(self, model: ConditionalUNet, block: str, t: int, probe: LinearProbe, seed: int = 0):
        super().__init__()
        self.model, self.block, self.t, self.probe, self.seed = _check(model), block, int(t), probe, seed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=images.device).manual_seed(self.seed)
        features = extract_features(self.model, images, self.t, [self.block], generator)[self.block]
        return self.probe.logits(features)


@torch.no_grad()
def _dataset_features(model, batches, t: int, names: list[str], seed: int) -> tuple[dict, torch.Tensor]:
    generator, chunks, labels = None, {name: [] for name in names}, []
    for images, targets in batches:
        if generator is None:
            generator = torch.Generator(device=images.device).manual_seed(seed)
        for name, value in extract_features(model, images, t, names, generator).items():
            chunks[name].append(value.cpu())
        labels.append(targets.cpu())
    if not labels:
        raise InputError("no images to extract features from")
    return {name: torch.cat(value) for name, value in chunks.items()}, torch.cat(labels)


def fit_feature_probe(model, train_batches, val_batches, times: list[int], blocks: list[str] | None = None,
                      seed: int = 0, weight_decay: float = 1e-4) -> tuple[FeatureProbe, list[dict]]:
    """Fit a linear probe for every (block, t) on the training images and keep the one with the best validation
    top-1. ``train_batches`` / ``val_batches`` are callables returning fresh (images, labels) iterators.
    Returns the chosen ``FeatureProbe`` and one row {block, t, val_top1} per candidate."""
    model = _check(model)
    model.eval()
    names = list(model.feature_modules()) if blocks is None else list(blocks)
    rows, best = [], None
    for t in times:
        train_features, train_labels = _dataset_features(model, train_batches(), t, names, seed)
        val_features, val_labels = _dataset_features(model, val_batches(), t, names, seed + 1)
        for name in names:
            probe = fit_linear_probe(train_features[name], train_labels, model.num_classes, weight_decay)
            top1 = 100.0 * (probe.logits(val_features[name]).argmax(1) == val_labels).float().mean().item()
            rows.append({"block": name, "t": int(t), "val_top1": top1})
            if best is None or top1 > best[0]:
                best = (top1, name, int(t), probe)
    _, name, t, probe = best
    return FeatureProbe(model, name, t, probe, seed=seed), rows
