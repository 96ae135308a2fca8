"""Held-out denoising loss: fixed noise and timesteps, so two models (or two steps) are compared fairly."""

from __future__ import annotations

import itertools
import weakref

import torch

from .data.dataset import TrainingDataset, collate

EVAL_TIMESTEPS = (100, 300, 500, 700, 900)

_namespaces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_numbers = itertools.count()


def _latent_namespace(dataset) -> str:
    """One latent-cache namespace per dataset for as long as it lives (an `id` could be reused by a later one)."""
    if dataset not in _namespaces:
        _namespaces[dataset] = f"heldout-{next(_numbers)}"
    return _namespaces[dataset]


@torch.no_grad()
def heldout_loss(method, dataset: TrainingDataset, *, seed: int = 0, timesteps=EVAL_TIMESTEPS,
                 batch_size: int = 4) -> float:
    """Mean denoising loss of `method`'s current model over `dataset`, each image at every timestep in
    `timesteps`, with noise drawn from `seed` alone. min-SNR weighting is left out so the number is plain MSE."""
    prep = method.prep
    device = method.base.unet.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    dataset.set_epoch(0)
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        latents = prep.latents(batch, namespace=_latent_namespace(dataset))
        embeds = prep.prompt_embeds(batch["caption"])
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            steps = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
            loss = method.denoise(latents, embeds, batch, generator, timesteps=steps, noise=noise,
                                  snr_weighting=False)
            total += float(loss.sum())
            count += latents.shape[0]
    return total / max(count, 1)
