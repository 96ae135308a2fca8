"""Textual-inversion embeddings in the layout ComfyUI (models/embeddings) and AUTOMATIC1111 load.

SD1.x/SD2.x: one tensor `emb_params` (num_vectors, width). SDXL: `clip_l` (num_vectors, 768) and `clip_g`
(num_vectors, 1280), one per text encoder. ComfyUI finds them by name: `embedding:NAME` in a prompt.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import Config
from ..io import atomic_path, refuse_existing
from ..models.families import Family

EMBEDDING_KEYS: dict[str, tuple[str, ...]] = {"sd1": ("emb_params",), "sd2": ("emb_params",),
                                              "sdxl": ("clip_l", "clip_g")}
"""The file's tensor names per family, in the order of the family's text encoders."""


def embedding_state(family_name: str, vectors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = EMBEDDING_KEYS[family_name]
    if len(keys) != len(vectors):
        raise ValueError(f"{family_name} embeddings have {len(keys)} tensors, got {len(vectors)}")
    return {key: v.detach().to("cpu", torch.float32).contiguous() for key, v in zip(keys, vectors)}


def embedding_metadata(cfg: Config, *, family: Family, prediction_type: str, steps_done: int,
                       finished_at: float) -> dict[str, str]:
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.modelspec_architecture(prediction_type)}/textual-inversion",
        "modelspec.title": cfg.output.name,
        "modelspec.trigger_phrase": cfg.data.trigger_word,
        "modelspec.date": datetime.fromtimestamp(finished_at, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ss_steps": str(steps_done),
        "finetune_config": cfg.to_json(),
        "finetune_trigger_word": cfg.data.trigger_word,
    }


def save_embedding(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str], *,
                   overwrite: bool = False) -> Path:
    path = Path(path)
    refuse_existing(path, overwrite)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path
