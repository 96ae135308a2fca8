"""The denoising objective shared by every method: latents, noise, timesteps, target, min-SNR weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.training_utils import compute_snr


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents (the mean of the posterior: deterministic, so cacheable)."""
    weight = next(vae.parameters())  # not vae.device/.dtype: those walk every submodule on each call
    pixels = pixels.to(device=weight.device, dtype=weight.dtype)
    latents = vae.encode(pixels).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
    if noise_offset > 0:
        # A per-channel constant shift teaches the model to change overall brightness (Guttenberg's noise offset).
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator,
                             device=generator.device, dtype=torch.float32)
        noise = noise + noise_offset * offset
    return noise.to(device=latents.device, dtype=latents.dtype)


def sample_timesteps(batch: int, scheduler: DDPMScheduler, generator: torch.Generator, device) -> torch.Tensor:
    steps = scheduler.config.num_train_timesteps
    return torch.randint(0, steps, (batch,), generator=generator, device=generator.device).to(device)


def training_target(scheduler: DDPMScheduler, latents, noise, timesteps) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def latent_mask(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) scaled to the latents' size: each latent position gets the mean of the pixels it
    covers (a position half inside the mask learns at half weight)."""
    return F.interpolate(mask.to(latents.device, torch.float32), size=latents.shape[-2:], mode="area")


def denoising_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    min_snr_gamma: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample MSE, weighted by min-SNR-gamma (Hang et al. 2023) when gamma > 0. With a `mask` (B, 1, H, W) in
    [0, 1] at the latents' size, each sample's MSE is the mask-weighted mean: positions where it is 0 add nothing."""
    squared = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    if mask is None:
        loss = squared.mean(dim=(1, 2, 3))
    else:
        weights = mask.float().expand_as(squared)
        loss = (squared * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp(min=1e-8)
    if min_snr_gamma > 0:
        snr = compute_snr(scheduler, timesteps).float()
        weight = torch.clamp(snr, max=min_snr_gamma) / snr
        if scheduler.config.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1)
        loss = loss * weight.to(loss.device)
    return loss
