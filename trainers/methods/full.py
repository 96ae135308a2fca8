"""Full fine-tune of the UNet (optionally the text encoders) with EMA; exported as a single-file checkpoint."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from ..export.checkpoint import save_single_file
from ..export.metadata import checkpoint_metadata
from .base import Method, RunSummary


class FullMethod(Method):
    name = "full"

    def setup(self) -> None:
        self.freeze_all()
        self.trains_text_encoder = self.cfg.full.train_text_encoder
        unet = self.base.unet.float()
        unet.requires_grad_(True)
        if self.trains_text_encoder:
            for te in self.base.text_encoders:
                te.float().requires_grad_(True)
        self.ema = EMAModel(unet.parameters(), decay=self.cfg.full.ema_decay) if self.cfg.full.ema else None

    def parameter_groups(self) -> list[dict[str, Any]]:
        train = self.cfg.train
        groups = [{"params": [p for p in self.base.unet.parameters() if p.requires_grad], "lr": train.learning_rate}]
        if self.trains_text_encoder:
            params = [p for te in self.base.text_encoders for p in te.parameters() if p.requires_grad]
            groups.append({"params": params, "lr": train.text_encoder_lr})
        return groups

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.to(next(self.base.unet.parameters()).device)
            self.ema.step(self.base.unet.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"unet.{k}": v for k, v in self.base.unet.state_dict().items()}
        if self.trains_text_encoder:
            for i, te in enumerate(self.base.text_encoders):
                state.update({f"text_encoder_{i}.{k}": v for k, v in te.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.base.unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
        if self.trains_text_encoder:
            for i, te in enumerate(self.base.text_encoders):
                prefix = f"text_encoder_{i}."
                te.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def extra_state(self) -> dict[str, torch.Tensor]:
        if self.ema is None:
            return {}
        state = {f"ema.{n}": p.detach().clone() for n, p in enumerate(self.ema.shadow_params)}
        state["ema.optimization_step"] = torch.tensor(self.ema.optimization_step)
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.ema is None:
            return
        for n, param in enumerate(self.ema.shadow_params):
            param.data.copy_(state[f"ema.{n}"])
        self.ema.optimization_step = int(state["ema.optimization_step"])

    @contextmanager
    def sampling_context(self):
        """Samples show the EMA weights, which is what gets exported."""
        if self.ema is None:
            yield
            return
        params = list(self.base.unet.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def export(self, path: Path, run: RunSummary, *, overwrite: bool) -> Path:
        with self.sampling_context():
            unet_state = {k: v.detach() for k, v in self.base.unet.state_dict().items()}
            te_states = None
            if self.trains_text_encoder:
                te_states = [{k: v.detach() for k, v in te.state_dict().items()} for te in self.base.text_encoders]
            metadata = checkpoint_metadata(
                self.cfg, family_name=self.base.family.name, prediction_type=self.base.prediction_type,
                steps_done=run.steps_done, num_images=run.num_images, tag_frequency=run.tag_frequency,
                started_at=run.started_at, finished_at=run.finished_at, base_model_name=Path(self.base.source).name,
                zero_terminal_snr=self.base.zero_terminal_snr)
            return save_single_file(path, self.base, unet_state=unet_state, text_encoder_states=te_states,
                                    metadata=metadata, overwrite=overwrite)
