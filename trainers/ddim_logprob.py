"""A DDIM step that also returns the log-probability of the previous latent, for policy-gradient training (DDPO).

diffusers' `DDIMScheduler.step` draws x_{t-1} ~ N(mean, std²) when eta > 0 but does not expose the mean, the std or
the density. This is the same step math (Song et al. 2021, eq. 12, as diffusers writes it), with timesteps that may
differ per sample, and the Gaussian log-density of a given (or freshly drawn) x_{t-1}.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler


def ddim_scheduler_for(noise_scheduler_config, num_steps: int, device) -> DDIMScheduler:
    """A DDIM sampler matching the model's noise schedule, with SD's own DDIM spacing (timesteps 1 + k·1000/steps,
    which is also what `step` assumes). Every step must keep some noise, or its std is 0 and its log-probability
    undefined: so the chain ends at t = 1, not 0, and the final alpha is not rounded up to 1."""
    scheduler = DDIMScheduler.from_config(noise_scheduler_config, set_alpha_to_one=False, thresholding=False,
                                          timestep_spacing="leading", steps_offset=1)
    scheduler.set_timesteps(num_steps, device=device)
    return scheduler


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def ddim_step_with_logprob(scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: torch.Tensor | int,
                           sample: torch.Tensor, *, eta: float, generator: torch.Generator | None = None,
                           prev_sample: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from `sample` at `timestep` (an int, or one timestep per sample).

    Returns (prev_sample, log_prob): with `prev_sample` given, its log-probability under this step's Gaussian (the
    gradient flows through the mean); otherwise a sample drawn with `generator`. `log_prob` is the per-sample mean of
    the element-wise log-density (the convention of DDPO's reference implementation; it keeps ratios well scaled).
    """
    if eta <= 0:
        raise ValueError("a log-probability needs a stochastic step: eta must be > 0")
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps first")
    batch = sample.shape[0]
    timestep = torch.as_tensor(timestep, device=scheduler.alphas_cumprod.device).long().expand(batch)
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod
    alpha_t = alphas[timestep]
    alpha_prev = torch.where(prev_timestep >= 0, alphas[prev_timestep.clamp(min=0)],
                             torch.as_tensor(scheduler.final_alpha_cumprod, dtype=alphas.dtype, device=alphas.device))
    alpha_t, alpha_prev = _per_sample(alpha_t, sample), _per_sample(alpha_prev, sample)
    beta_t = 1 - alpha_t
    model_output, sample = model_output.float(), sample.float()

    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        pred_x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()
        pred_eps = model_output
    elif prediction == "v_prediction":
        pred_x0 = alpha_t.sqrt() * sample - beta_t.sqrt() * model_output
        pred_eps = alpha_t.sqrt() * model_output + beta_t.sqrt() * sample
    elif prediction == "sample":
        pred_x0 = model_output
        pred_eps = (sample - alpha_t.sqrt() * pred_x0) / beta_t.sqrt()
    else:
        raise ValueError(f"unknown prediction_type {prediction!r}")
    if scheduler.config.clip_sample:
        pred_x0 = pred_x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)

    variance = (1 - alpha_prev) / beta_t * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - std**2).sqrt() * pred_eps

    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator, device=generator.device if generator else sample.device,
                            dtype=sample.dtype).to(sample.device)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.detach().float()
    log_density = -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return prev_sample, log_density.mean(dim=tuple(range(1, sample.ndim)))
