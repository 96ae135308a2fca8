"""The denoising objective against diffusers' own references: min-SNR weighting (epsilon and v-prediction) with
`diffusers.training_utils.compute_snr` and the weights of diffusers' training examples, offset noise as diffusers'
examples draw it, and the v-prediction target inside a real training step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from trainers.diffusion import denoising_loss, sample_noise

from method_helpers import rebuilt_method
from train_helpers import make_images, tiny_config

SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
TIMESTEPS = torch.tensor([0, 10, 100, 400, 700, 999])


def diffusers_min_snr_loss(pred, target, timesteps, scheduler, gamma):
    """The min-SNR loss exactly as diffusers' examples/text_to_image/train_text_to_image.py computes it."""
    snr = compute_snr(scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    return loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weighting_is_diffusers_own(prediction_type, gamma):
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    pred, target = (torch.randn(len(TIMESTEPS), 4, 8, 8, generator=generator) for _ in range(2))
    ours = denoising_loss(pred, target, TIMESTEPS, scheduler, gamma)
    torch.testing.assert_close(ours, diffusers_min_snr_loss(pred, target, TIMESTEPS, scheduler, gamma))
    plain = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    assert not torch.allclose(ours, plain), "the weighting changed nothing"
    torch.testing.assert_close(denoising_loss(pred, target, TIMESTEPS, scheduler, 0.0), plain)


def test_offset_noise_is_drawn_as_diffusers_examples_draw_it():
    latents = torch.zeros(3, 4, 16, 16)
    ours = sample_noise(latents, torch.Generator().manual_seed(5), noise_offset=0.1)
    # diffusers: noise = torch.randn_like(latents); noise += noise_offset * torch.randn((b, c, 1, 1))
    generator = torch.Generator().manual_seed(5)
    reference = torch.randn(latents.shape, generator=generator)
    reference += 0.1 * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    torch.testing.assert_close(ours, reference)
    without = sample_noise(latents, torch.Generator().manual_seed(5), noise_offset=0.0)
    torch.testing.assert_close(without, torch.randn(latents.shape, generator=torch.Generator().manual_seed(5)))


def test_offset_noise_shifts_each_channel_by_a_constant():
    latents = torch.zeros(64, 4, 32, 32)
    channel_means = sample_noise(latents, torch.Generator().manual_seed(0), noise_offset=0.5).mean(dim=(2, 3))
    # per-channel mean: N(0, 1/1024) from the noise plus N(0, 0.25) from the offset
    assert 0.4 < channel_means.std().item() < 0.6
    plain_means = sample_noise(latents, torch.Generator().manual_seed(0), noise_offset=0.0).mean(dim=(2, 3))
    assert plain_means.std().item() < 0.05


@pytest.mark.parametrize("family, prediction_type", [("sd2v", "v_prediction"), ("sd1", "epsilon")])
def test_a_training_step_noises_targets_and_weights_as_diffusers_does(tmp_path, family, prediction_type):
    images = make_images(tmp_path / "images", count=2)
    cfg = tiny_config(tmp_path, images, family=family, train={"noise_offset": 0.1, "min_snr_gamma": 5.0})
    method, _ = rebuilt_method(cfg)
    scheduler = method.base.noise_scheduler
    assert scheduler.config.prediction_type == prediction_type
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    embeds = method.prep.prompt_embeds(["a red disc", "a red disc"])
    seen = {}

    def unet(noisy, timesteps, **kwargs):
        seen.update(noisy=noisy, timesteps=timesteps)
        return SimpleNamespace(sample=torch.full_like(noisy, 0.25))

    method.unet_forward = unet
    loss = method.denoise(latents, embeds, {}, torch.Generator().manual_seed(9))

    generator = torch.Generator().manual_seed(9)  # the step's draws, in its order: noise, offset, timesteps
    noise = torch.randn(latents.shape, generator=generator)
    noise += 0.1 * torch.randn((2, 4, 1, 1), generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (2,), generator=generator)
    assert torch.equal(seen["timesteps"], timesteps)
    torch.testing.assert_close(seen["noisy"], scheduler.add_noise(latents, noise, timesteps))
    alpha = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0 (Salimans & Ho 2022); epsilon models predict the noise
    target = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents if prediction_type == "v_prediction" else noise
    pred = torch.full_like(latents, 0.25)
    torch.testing.assert_close(loss, diffusers_min_snr_loss(pred, target, timesteps, scheduler, 5.0))
