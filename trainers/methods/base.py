"""What every method shares: freezing, the standard denoising step, and the prior-preservation term.

A method says what is trainable (`setup`, `parameter_groups`), how one batch becomes a loss (`compute_loss`), what a
resumable checkpoint holds (`trainable_state`) and how the result is written (`export`). The loop does the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..batches import BatchPreparer
from ..config import Config
from ..data.dataset import TrainingDataset
from ..diffusion import denoising_loss, latent_mask, sample_noise, sample_timesteps, training_target
from ..models.families import PromptEmbeds
from ..models.loading import BaseModel


@dataclass
class RunSummary:
    """What the metadata of an exported file tells about the run that made it."""

    steps_done: int
    num_images: int
    tag_frequency: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float = 0.0


class MappedDataset:
    """`dataset` with every example passed through `fn`; everything else (buckets, epochs, length) is the dataset's."""

    def __init__(self, dataset: TrainingDataset, fn: Callable[[dict[str, Any]], dict[str, Any]]):
        self.dataset, self.fn = dataset, fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.fn(self.dataset[index])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dataset, name)


class Method(ABC):
    name: str = ""
    trains_text_encoder: bool = False

    def __init__(self, cfg: Config, base: BaseModel):
        self.cfg = cfg
        self.base = base
        self.prep: BatchPreparer | None = None
        self._training: bool | None = None
        # Asked during long sampling (samples, DDPO trajectories): True ends it early. The loop sets it.
        self.should_stop: Callable[[], bool] = lambda: False
        # What the loss calls: the raw modules, or their distributed wrappers after `wrap`.
        self.unet_forward = base.unet

    # ---- what is trained ---------------------------------------------------------------------------------
    def freeze_all(self) -> None:
        for module in (self.base.unet, self.base.vae, *self.base.text_encoders):
            module.requires_grad_(False)

    @abstractmethod
    def setup(self) -> None:
        """Freeze what stays fixed and make the trainable parameters."""

    @abstractmethod
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups: [{"params": [...], "lr": ...}, ...]."""

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """Modules holding trainable parameters, by name; the loop wraps them for multi-process training."""
        modules = {"unet": self.base.unet}
        if self.trains_text_encoder:
            modules.update({f"text_encoder_{i}": te for i, te in enumerate(self.base.text_encoders)})
        return modules

    def wrap(self, wrapped: dict[str, torch.nn.Module]) -> None:
        """Receive the prepared (e.g. DistributedDataParallel) modules from the loop."""
        if "unet" in wrapped:
            self.unet_forward = wrapped["unet"]
        if self.prep is not None and self.trains_text_encoder:
            self.prep.text_encoders = [wrapped.get(f"text_encoder_{i}", te) for i, te in enumerate(self.base.text_encoders)]

    # ---- the data ----------------------------------------------------------------------------------------
    def prepare_dataset(self, dataset: TrainingDataset) -> TrainingDataset | MappedDataset:
        """The dataset the method trains and validates on; a method may add to each example (ControlNet's control
        map) or change it (textual inversion's placeholder tokens) by returning `MappedDataset(dataset, fn)`."""
        return dataset

    def data_stream(self, micro_step: int, generator: torch.Generator):
        """A method that makes its own training data (DDPO samples from the model) returns its stream here: an
        object with `next()` (one micro-batch) and `micro_step` (micro-batches consumed, for checkpoints)."""
        return None

    def micro_steps_per_step(self) -> int:
        """Micro-batches whose gradients add up to one optimizer step."""
        return self.cfg.train.gradient_accumulation

    def train_mode(self, training: bool) -> None:
        if self._training == training:
            return  # switching walks every submodule: only do it when the mode changes (sampling, validation)
        for module in self.trained_modules().values():
            module.train(training)
        self._training = training

    # ---- the loss ----------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator
                     ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """The step's loss and what to log beside it (tensors are read once the whole step is queued)."""
        instance = self.batch_loss(batch, generator).mean()
        logs = {"loss_instance": instance.detach()}
        if "prior" in batch:
            prior = self.batch_loss(batch["prior"], generator, namespace="prior").mean()
            logs["loss_prior"] = prior.detach()
            return instance + self.cfg.dreambooth.prior_loss_weight * prior, logs
        return instance, logs

    def batch_loss(self, batch: dict[str, Any], generator: torch.Generator, *, namespace: str = "train") -> torch.Tensor:
        assert self.prep is not None
        latents = self.prep.latents(batch, namespace=namespace)
        embeds = self.prep.prompt_embeds(batch["caption"], grad=self.trains_text_encoder)
        return self.denoise(latents, embeds, batch, generator)

    def denoise(self, latents: torch.Tensor, embeds: PromptEmbeds, batch: dict[str, Any],
                generator: torch.Generator, timesteps: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, *, snr_weighting: bool = True) -> torch.Tensor:
        """Per-sample denoising loss for clean `latents` under `embeds` (plain MSE when `snr_weighting` is off)."""
        scheduler, train = self.base.noise_scheduler, self.cfg.train
        unet_dtype = next(self.base.unet.parameters()).dtype  # not unet.dtype: it walks every submodule per call
        if noise is None:
            noise = sample_noise(latents, generator, train.noise_offset)
        if timesteps is None:
            timesteps = sample_timesteps(latents.shape[0], scheduler, generator, latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = self.predict(noisy.to(unet_dtype), timesteps, embeds.to(latents.device, unet_dtype), batch)
        target = training_target(scheduler, latents, noise, timesteps)
        mask = latent_mask(batch["mask"], latents) if batch.get("mask") is not None else None
        return denoising_loss(pred, target, timesteps, scheduler, train.min_snr_gamma if snr_weighting else 0.0, mask)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,
                batch: dict[str, Any]) -> torch.Tensor:
        """The model's output for `noisy` latents (a ControlNet adds its residuals to the UNet's)."""
        added = self.base.family.added_cond_kwargs(
            embeds, batch.get("original_size"), batch.get("crop_top_left"), batch.get("target_size"))
        return self.unet_forward(noisy, timesteps, encoder_hidden_states=embeds.hidden_states,
                                 added_cond_kwargs=added).sample

    # ---- state and output --------------------------------------------------------------------------------
    @abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything trained, for resumable checkpoints."""

    @abstractmethod
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def after_optimizer_step(self) -> None:
        """Hook for EMA and the like."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Extra tensors for checkpoints (e.g. EMA weights)."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    @abstractmethod
    def export(self, path: Path, run: RunSummary, *, overwrite: bool) -> Path:
        """Write the result (LoRA, checkpoint, embedding...) atomically, with metadata; return its path."""

    export_suffix: str = ".safetensors"

    def sampling_context(self):
        """Modules as they should be for sample images (e.g. EMA weights swapped in)."""
        from contextlib import nullcontext

        return nullcontext()
