"""LoRA on the UNet (and optionally the text encoders) through peft; exported in the kohya key layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..adapters import add_text_encoder_lora, add_unet_lora, load_lora_state, lora_parameters, lora_state
from ..export.lora import kohya_lora_state, save_lora, save_peft_lora
from ..export.metadata import lora_metadata
from .base import Method, RunSummary


class LoraMethod(Method):
    name = "lora"

    def setup(self) -> None:
        self.freeze_all()
        self.trains_text_encoder = self.cfg.lora.train_text_encoder
        add_unet_lora(self.base.unet, self.cfg.lora)
        if self.trains_text_encoder:
            for text_encoder in self.base.text_encoders:
                add_text_encoder_lora(text_encoder, self.cfg.lora)

    def parameter_groups(self) -> list[dict[str, Any]]:
        train = self.cfg.train
        groups = [{"params": lora_parameters(self.base.unet), "lr": train.learning_rate}]
        if self.trains_text_encoder:
            params = [p for te in self.base.text_encoders for p in lora_parameters(te)]
            groups.append({"params": params, "lr": train.text_encoder_lr})
        return groups

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"unet.{k}": v for k, v in lora_state(self.base.unet).items()}
        if self.trains_text_encoder:
            for i, te in enumerate(self.base.text_encoders):
                state.update({f"text_encoder_{i}.{k}": v for k, v in lora_state(te).items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_lora_state(self.base.unet, _section(state, "unet."))
        if self.trains_text_encoder:
            for i, te in enumerate(self.base.text_encoders):
                load_lora_state(te, _section(state, f"text_encoder_{i}."))

    def export(self, path: Path, run: RunSummary, *, overwrite: bool) -> Path:
        text_encoders = self.base.text_encoders if self.trains_text_encoder else []
        if self.cfg.lora.format == "peft":
            return save_peft_lora(path.with_suffix(""), self.base.unet, text_encoders, overwrite=overwrite)
        state = kohya_lora_state(self.base.unet, text_encoders,
                                 te_prefixes=self.base.family.kohya_text_encoder_prefixes)
        metadata = lora_metadata(
            self.cfg, family_name=self.base.family.name, prediction_type=self.base.prediction_type,
            steps_done=run.steps_done, num_images=run.num_images, tag_frequency=run.tag_frequency,
            started_at=run.started_at, finished_at=run.finished_at, base_model_name=Path(self.base.source).name,
            zero_terminal_snr=self.base.zero_terminal_snr)
        return save_lora(path, state, metadata, overwrite=overwrite)


def _section(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
