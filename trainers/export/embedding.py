"""Textual-inversion embeddings in the layout ComfyUI (models/embeddings) and AUTOMATIC1111 load.

SD1.x/SD2.x: one tensor `emb_params` (num_vectors, width). SDXL: `clip_l` (num_vectors, 768) and `clip_g`
(num_vectors, 1280), one per text encoder. ComfyUI finds them by name: `embedding:NAME` in a prompt.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import Config
from ..errors import ConfigError, ModelError
from ..io import atomic_path
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
    if path.exists() and not overwrite:
        raise ConfigError("a file of that name already exists and would be replaced",
                          "set output.overwrite = true, or choose another output.name", where=str(path))
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def read_embedding(path: str | Path) -> dict[str, torch.Tensor]:
    """The vectors of an embedding file we (or A1111's tools) wrote, by key."""
    try:
        state = load_file(str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the embedding ({exc})", "pick a .safetensors embedding", where=str(path)) from None
    if not any(key in state for keys in EMBEDDING_KEYS.values() for key in keys):
        raise ModelError(f"not a textual-inversion embedding (keys: {', '.join(sorted(state)[:4])})",
                         "pick a file with emb_params (SD1/SD2) or clip_l and clip_g (SDXL)", where=str(path))
    return state
