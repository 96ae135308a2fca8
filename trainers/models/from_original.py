"""diffusers modules built from a single file in the original layout, one part at a time.

diffusers' own converters rename the keys; the configs come from the file's shapes (original_configs.py) over the
family's shipped config folder. Each module is created without memory for its weights and then takes the file's
tensors directly, so loading needs little more than the model itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

from ..errors import ModelError
from .families import UNET_PREFIX, Family, TextEncoderSpec
from .original_configs import (
    VAE_PREFIX,
    text_encoder_config_from_original,
    unet_config_from_original,
    vae_config_from_original,
)
from .single_file import CheckpointFile


def read_config(folder: Path, subfolder: str) -> dict[str, Any]:
    return json.loads((folder / subfolder / "config.json").read_text(encoding="utf-8"))


def unet_from_original(file: CheckpointFile, family: Family, config_dir: Path, dtype: torch.dtype) -> UNet2DConditionModel:
    config = unet_config_from_original(file, family, read_config(config_dir, "unet"), where=file.where)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    state = convert_ldm_unet_checkpoint(file.part(UNET_PREFIX), config)
    return _fill(unet, state, dtype, where=file.where, what="UNet")


def vae_from_original(file: CheckpointFile, config_dir: Path, dtype: torch.dtype) -> AutoencoderKL:
    """The VAE of a full checkpoint (`first_stage_model.*`) or of a VAE-only file in the original layout."""
    prefix = VAE_PREFIX if VAE_PREFIX + "encoder.conv_in.weight" in file else ""
    config = vae_config_from_original(file, read_config(config_dir, "vae"), prefix=prefix, where=file.where)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    state = convert_ldm_vae_checkpoint(file.part(prefix), config)
    return _fill(vae, state, dtype, where=file.where, what="VAE")


def text_encoders_from_original(file: CheckpointFile, family: Family, config_dir: Path,
                                dtype: torch.dtype) -> list[torch.nn.Module]:
    return [_text_encoder(file, spec, config_dir, dtype) for spec in family.text_encoder_specs]


def _text_encoder(file: CheckpointFile, spec: TextEncoderSpec, config_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    values = text_encoder_config_from_original(file, spec, read_config(config_dir, spec.subfolder), where=file.where)
    with init_empty_weights():
        encoder = spec.model_class(spec.model_class.config_class.from_dict(values))
    part = file.part(spec.original_prefix)
    if spec.drops_last_layer:
        unused = f"{spec.original_prefix}transformer.resblocks.{values['num_hidden_layers']}."
        part = {k: v for k, v in part.items() if not k.startswith(unused) and not k.endswith("text_projection")}
    if spec.layout == "open_clip":
        state = convert_open_clip_checkpoint(encoder, part, prefix=spec.original_prefix)
    else:
        state = convert_ldm_clip_checkpoint(part, remove_prefix=spec.original_prefix)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if not hasattr(encoder, "text_model"):  # transformers 5 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return _fill(encoder, state, dtype, where=file.where, what=f"text encoder ({spec.original_prefix}*)")


def _fill(model: torch.nn.Module, state: Mapping[str, torch.Tensor], dtype: torch.dtype, *,
          where: str, what: str) -> torch.nn.Module:
    """Give `model` (built without weights) the tensors of `state`; every weight must be there and used."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if _is_meta(model, k)]
    if missing or unexpected:
        raise ModelError(f"the {what} weights do not fit its layout: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})",
                         "the file may be damaged or a variant this trainer cannot read; try its diffusers folder",
                         where=where)
    return model.eval()


def _is_meta(model: torch.nn.Module, key: str) -> bool:
    module_path, _, name = key.rpartition(".")
    return getattr(model.get_submodule(module_path), name).is_meta
