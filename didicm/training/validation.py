"""Validation during training: every rank predicts its shard of the split, and the per-image results are gathered
so that every rank computes the same scores (and takes the same early-stopping decision)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..evaluation import SamplerSpec, collect_probs
from ..loader import eval_batches, mix_seed
from ..objectives import heldout_epsilon_loss

__all__ = ["gather_rows", "validate", "validation_loss"]


def gather_rows(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate every rank's [n_r, ...] CPU tensor in rank order (shards may differ in length by one)."""
    if world == 1:
        return tensor
    backend_device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    count = torch.tensor([tensor.shape[0]], device=backend_device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=backend_device)
    padded[:tensor.shape[0]] = tensor.to(backend_device)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(c.item())].cpu() for part, c in zip(parts, counts, strict=True)])


@torch.no_grad()
def validate(model, dataset, spec: SamplerSpec, diffusion, *, batch_size: int, device: torch.device, seed: int,
             rank: int = 0, world: int = 1, num_workers: int = 0, amp_dtype: torch.dtype | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [N, K] float32 CPU, labels [N] int64 CPU) over the whole split, on every rank.

    Each rank decodes and predicts its contiguous shard only (its sampler draws seeded by (seed, rank)), under
    autocast when ``amp_dtype`` is given."""
    batches = eval_batches(dataset, batch_size, device, num_workers=num_workers, rank=rank, world=world)
    with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        probs, labels = collect_probs(model, batches, spec, diffusion,
                                      seed=seed if world == 1 else mix_seed(seed, 4, rank))
    return gather_rows(probs.float(), world), gather_rows(labels, world)


@torch.no_grad()
def validation_loss(model, dataset, *, batch_size: int, device: torch.device, seed: int, rank: int = 0,
                    world: int = 1, num_workers: int = 0, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The generative model's held-out denoising loss per image [N] (float32 CPU, every rank): one network pass
    per image with (t, eps) fixed by ``seed`` (eval.select 'loss'), sharded like ``validate``."""
    model.eval()
    generator, losses = None, []
    with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        for images, labels in eval_batches(dataset, batch_size, device, num_workers=num_workers, rank=rank,
                                           world=world):
            if generator is None:
                generator = torch.Generator(device=images.device).manual_seed(
                    seed if world == 1 else mix_seed(seed, 4, rank))
            losses.append(heldout_epsilon_loss(model, images, labels, generator).float().cpu())
    return gather_rows(torch.cat(losses), world)
