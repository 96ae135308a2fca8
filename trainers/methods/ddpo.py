"""DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning"): a LoRA on the UNet is trained
by policy gradient so that the images it samples score higher under a reward.

Each epoch samples `samples_per_epoch` images with a stochastic DDIM chain, keeping every latent and the
log-probability of every step; the rewards become advantages (normalised per prompt over its recent rewards); then
each recorded step is replayed with the current weights and a PPO-clipped ratio of new to old log-probabilities is
the loss. The method supplies its own data to the one training loop: a micro-batch is one timestep of
`train.batch_size` trajectories, and the gradients of all trained timesteps add up to one optimizer step.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ddpo_prompts
from ..ddim_logprob import ddim_scheduler_for, ddim_step_with_logprob
from ..errors import ConfigError
from ..rewards import make_reward
from ..sampling import SamplingInterrupted
from .lora import LoraMethod


class PromptStats:
    """Per-prompt reward normalisation over the last `buffer` rewards of that prompt; until a prompt has
    `min_count` of them, the whole batch's mean and std are used."""

    def __init__(self, buffer: int, min_count: int):
        self.buffer, self.min_count = buffer, min_count
        self.history: dict[str, deque[float]] = {}

    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([p == prompt for p in prompts])
            seen = self.history.setdefault(prompt, deque(maxlen=self.buffer))
            seen.extend(rewards[rows].tolist())
            pool = torch.tensor(list(seen)) if len(seen) >= self.min_count else rewards
            out[rows] = (rewards[rows] - pool.mean()) / (pool.std(unbiased=False) + 1e-6)
        return out

    def state(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        table = torch.full((len(prompts), self.buffer), float("nan"))
        for n, prompt in enumerate(prompts):
            values = list(self.history.get(prompt, ()))
            table[n, :len(values)] = torch.tensor(values)
        return {"stats.history": table}

    def load_state(self, prompts: list[str], state: dict[str, torch.Tensor]) -> None:
        self.history = {p: deque([v for v in row.tolist() if not math.isnan(v)], maxlen=self.buffer)
                        for p, row in zip(prompts, state["stats.history"])}


@dataclass
class Trajectories:
    """One epoch of samples: `latents` (N, T+1, C, H, W) from noise to result, `log_probs` (N, T) of each step under
    the policy that sampled it, the `timesteps` (T,) of the chain, rewards and advantages (N,)."""

    epoch: int
    prompts: list[str]
    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor

    def state(self, known_prompts: list[str]) -> dict[str, torch.Tensor]:
        """Tensors only (for a checkpoint): prompts become their indices in `known_prompts`."""
        tensors = {f"trajectories.{k}": v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return tensors | {"trajectories.epoch": torch.tensor(self.epoch),
                          "trajectories.prompts": torch.tensor([known_prompts.index(p) for p in self.prompts])}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], known_prompts: list[str], device) -> "Trajectories":
        values = {k.split(".", 1)[1]: v.to(device) for k, v in state.items() if k.startswith("trajectories.")}
        values["epoch"] = int(values["epoch"])
        values["prompts"] = [known_prompts[i] for i in values["prompts"].tolist()]
        return cls(**values)


class TrajectoryStream:
    """The loop's data for DDPO: micro-batches of (trajectories, one timestep each), sampled anew every epoch.
    Sampling noise and every shuffle are pure functions of (seed, epoch), so a resumed run continues exactly."""

    def __init__(self, method: "DDPOMethod", micro_step: int, seed: int):
        self.method, self.micro_step, self.seed = method, micro_step, seed
        self._order: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._order_epoch = -1

    def next(self) -> dict[str, Any]:
        method = self.method
        epoch, position = divmod(self.micro_step, method.micro_batches_per_epoch())
        if method.trajectories is None or method.trajectories.epoch != epoch:
            method.trajectories = method.epoch_trajectories(epoch, self.seed)
        if self._order_epoch != epoch:
            self._order, self._order_epoch = method.training_order(epoch, self.seed), epoch
        self.micro_step += 1
        samples, steps = self._order[position]
        return {"samples": samples, "steps": steps}


class DDPOMethod(LoraMethod):
    name = "ddpo"

    def setup(self) -> None:
        if self.cfg.lora.train_text_encoder:
            raise ConfigError("DDPO trains the UNet only", "turn lora.train_text_encoder off",
                              where="lora.train_text_encoder")
        super().setup()
        opts = self.cfg.ddpo
        self.prompts = ddpo_prompts(opts)
        self.train_steps = max(1, round(opts.sample_steps * opts.timestep_fraction))
        self.sampler = ddim_scheduler_for(self.base.noise_scheduler.config, opts.sample_steps, self.base.unet.device)
        self.stats = PromptStats(opts.stats_buffer, opts.stats_min_count)
        self.reward = make_reward(opts, self.base.unet.device)
        self.trajectories: Trajectories | None = None

    # ---- the data ----------------------------------------------------------------------------------------
    def data_stream(self, micro_step: int, generator: torch.Generator) -> TrajectoryStream:
        return TrajectoryStream(self, micro_step, generator.initial_seed())

    def micro_steps_per_step(self) -> int:
        return self.cfg.train.gradient_accumulation * self.train_steps

    def micro_batches_per_epoch(self) -> int:
        opts = self.cfg.ddpo
        return opts.inner_epochs * opts.samples_per_epoch // self.cfg.train.batch_size * self.train_steps

    def training_order(self, epoch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(sample indices, one chain position per sample) for every micro-batch of the epoch: the samples are
        shuffled per inner epoch, and each sample trains on its own random subset of the chain's steps."""
        opts, batch = self.cfg.ddpo, self.cfg.train.batch_size
        rng = _epoch_rng(seed, epoch, purpose=1)
        order = []
        for _ in range(opts.inner_epochs):
            samples = torch.randperm(opts.samples_per_epoch, generator=rng)
            positions = torch.stack([torch.randperm(opts.sample_steps, generator=rng)[:self.train_steps]
                                     for _ in range(opts.samples_per_epoch)])
            for start in range(0, opts.samples_per_epoch, batch):
                rows = samples[start:start + batch]
                order += [(rows, positions[rows, j]) for j in range(self.train_steps)]
        return order

    def epoch_trajectories(self, epoch: int, seed: int) -> Trajectories:
        """The epoch's samples (random prompts from the list) with their advantages."""
        rng = _epoch_rng(seed, epoch, purpose=2)
        choice = torch.randint(len(self.prompts), (self.cfg.ddpo.samples_per_epoch,), generator=rng).tolist()
        trajectories = self.sample([self.prompts[i] for i in choice], seed=seed, epoch=epoch)
        rewards = trajectories.rewards
        if self.cfg.ddpo.per_prompt_stats:
            advantages = self.stats.advantages(trajectories.prompts, rewards)
        else:
            advantages = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
        trajectories.advantages = advantages.to(trajectories.latents.device)
        return trajectories

    @torch.no_grad()
    def sample(self, prompts: list[str], *, seed: int, epoch: int = 0) -> Trajectories:
        """Sample and score one image per prompt with the current weights; the noise depends on (seed, epoch) only."""
        opts, device = self.cfg.ddpo, self.base.unet.device
        rng = _epoch_rng(seed, epoch, purpose=0)
        self.train_mode(False)
        chains, log_probs, rewards = [], [], []
        for start in range(0, len(prompts), opts.sample_batch_size):
            chunk = prompts[start:start + opts.sample_batch_size]
            latents = torch.randn((len(chunk), *self.latent_shape()), generator=rng).to(device)
            chain, chunk_log_probs = [latents], []
            for t in self.sampler.timesteps:
                if self.should_stop():
                    self.train_mode(True)
                    raise SamplingInterrupted()
                pred = self.guided_prediction(latents, t, chunk)
                latents, log_prob = ddim_step_with_logprob(self.sampler, pred, t, latents, eta=opts.eta, generator=rng)
                chain.append(latents)
                chunk_log_probs.append(log_prob)
            chains.append(torch.stack(chain, dim=1))
            log_probs.append(torch.stack(chunk_log_probs, dim=1))
            rewards.append(self.reward(self.decode(latents), chunk))
        self.train_mode(True)
        rewards = torch.cat(rewards).float()
        return Trajectories(epoch, prompts, torch.cat(chains), torch.cat(log_probs), self.sampler.timesteps.clone(),
                            rewards, torch.zeros_like(rewards, device=device))

    def latent_shape(self) -> tuple[int, int, int]:
        factor = 2 ** (len(self.base.vae.config.block_out_channels) - 1)
        side = self.cfg.data.resolution // factor
        return (self.base.unet.config.in_channels, side, side)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1]."""
        vae = self.base.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def guided_prediction(self, latents: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Classifier-free guided model output, with `t` one timestep or one per sample (guidance 1: no guidance,
        and no unconditional pass)."""
        assert self.prep is not None
        guidance = self.cfg.ddpo.guidance
        passes = 1 if guidance == 1 else 2
        texts = prompts if passes == 1 else [self.cfg.ddpo.negative_prompt] * len(prompts) + list(prompts)
        side, rows = self.cfg.data.resolution, len(texts)
        sizes = {"original_size": [(side, side)] * rows, "crop_top_left": [(0, 0)] * rows,
                 "target_size": [(side, side)] * rows}
        dtype = self.base.unet.dtype
        timesteps = torch.as_tensor(t, device=latents.device).expand(len(prompts)).repeat(passes)
        embeds = self.prep.prompt_embeds(texts).to(latents.device, dtype)
        out = self.predict(latents.repeat(passes, 1, 1, 1).to(dtype), timesteps, embeds, sizes).float()
        if passes == 1:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    # ---- the loss ----------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        opts, traj = self.cfg.ddpo, self.trajectories
        assert traj is not None
        rows, steps = batch["samples"].to(traj.latents.device), batch["steps"].to(traj.latents.device)
        latents, next_latents = traj.latents[rows, steps], traj.latents[rows, steps + 1]
        timesteps = traj.timesteps[steps]
        pred = self.guided_prediction(latents, timesteps, [traj.prompts[i] for i in rows.tolist()])
        _, log_prob = ddim_step_with_logprob(self.sampler, pred, timesteps, latents, eta=opts.eta,
                                             prev_sample=next_latents)
        advantages = traj.advantages[rows].clamp(-opts.advantage_clip, opts.advantage_clip)
        ratio = torch.exp(log_prob - traj.log_probs[rows, steps])
        clipped = ratio.clamp(1 - opts.clip_range, 1 + opts.clip_range)
        loss = torch.maximum(-advantages * ratio, -advantages * clipped).mean()
        logs = {"reward_mean": float(traj.rewards.mean()), "reward_std": float(traj.rewards.std(unbiased=False)),
                "approx_kl": float(0.5 * ((log_prob - traj.log_probs[rows, steps]) ** 2).mean().detach()),
                "clip_fraction": float(((ratio - 1).abs() > opts.clip_range).float().mean())}
        return loss, logs

    # ---- state -------------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = self.stats.state(self.prompts)
        if self.trajectories is not None:
            state.update(self.trajectories.state(self.prompts))
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.stats.load_state(self.prompts, state)
        if "trajectories.epoch" in state:
            self.trajectories = Trajectories.from_state(state, self.prompts, self.base.unet.device)


def _epoch_rng(seed: int, epoch: int, *, purpose: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, purpose): the same on every run and after a resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7 + purpose)
