"""Loading the base model a run fine-tunes: a single file, a diffusers folder or a hub id, with an optional VAE.

Single files are read with the family's shipped config folder, so nothing is fetched; every problem a user can fix
(missing or damaged file, unknown architecture, hub id that cannot be fetched) is one ModelError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from safetensors import SafetensorError
from transformers import CLIPTokenizer

from ..config import ModelConfig
from ..errors import ModelError
from .families import Family, detect_family, family_from_unet_config
from .from_original import text_encoders_from_original, unet_from_original, vae_from_original
from .single_file import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, CheckpointFile

SAMPLERS = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler, "ddim": DDIMScheduler,
            "dpm++": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what diffusers and transformers raise for a folder or hub entry they cannot read
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, SafetensorError)


@dataclass
class BaseModel:
    family: Family
    prediction_type: str
    """"epsilon" or "v_prediction"."""
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list
    tokenizers: list
    noise_scheduler: DDPMScheduler
    """The training scheduler: the model's betas and prediction type."""
    source: str
    """What the user gave."""
    single_file: Path | None = None
    """The original file when loaded from one (an export reuses what the modules do not hold)."""
    zero_terminal_snr: bool = False
    """The noise schedule is rescaled to zero terminal SNR (a v-prediction model marked `ztsnr`, as NoobAI-XL v-pred
    is): trained and exported that way."""
    encoders_parked: bool = False
    """The VAE and text encoders wait in CPU memory and visit the UNet's device only to encode (`levers`)."""


def load_base_model(model_cfg: ModelConfig, *, dtype: torch.dtype = torch.float32) -> BaseModel:
    source = model_cfg.base.strip()
    if not source:
        raise ModelError("no base model given", "set it to a checkpoint file, a diffusers folder or a hub id",
                         where="model.base")
    path = Path(source).expanduser()
    if path.is_file():
        base = _from_single_file(path, model_cfg, dtype)
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError("this folder is not a diffusers model (it has no model_index.json)",
                             "give a .safetensors checkpoint, or the folder that holds model_index.json", where=source)
        base = _from_diffusers(str(path), model_cfg, dtype, where=source)
    elif _looks_like_hub_id(source):
        base = _from_diffusers(source, model_cfg, dtype, where=source)
    else:
        raise ModelError("file or folder not found", "check the path in model.base", where=source)
    if model_cfg.vae.strip():
        base.vae = load_vae(model_cfg.vae.strip(), base.family, dtype)
    return base


def _from_single_file(path: Path, cfg: ModelConfig, dtype: torch.dtype) -> BaseModel:
    file = CheckpointFile(path)
    family, detected = detect_family(file, where=file.where)
    _check_family(cfg, family, file.where)
    prediction_type = detected if cfg.prediction_type == "auto" else cfg.prediction_type
    zero_snr = prediction_type == "v_prediction" and ZERO_SNR_MARKER in file
    config_dir = family.config_dir_for(prediction_type)
    return BaseModel(
        family=family, prediction_type=prediction_type,
        unet=unet_from_original(file, family, config_dir, dtype),
        vae=vae_from_original(file, config_dir, dtype),
        text_encoders=text_encoders_from_original(file, family, config_dir, dtype),
        tokenizers=family.load_tokenizers(),
        noise_scheduler=_noise_scheduler(DDPMScheduler.from_pretrained(config_dir, subfolder="scheduler"),
                                         prediction_type, zero_snr),
        source=cfg.base, single_file=path.resolve(), zero_terminal_snr=zero_snr)


def _from_diffusers(source: str, cfg: ModelConfig, dtype: torch.dtype, *, where: str) -> BaseModel:
    """A local diffusers folder or a hub id (fetched as diffusers' `from_pretrained` does)."""
    local = Path(source).is_dir()
    try:
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet")
    except _LOAD_ERRORS as exc:
        if local:
            raise ModelError(f"the diffusers folder has no readable unet/config.json ({exc})",
                             "give a complete diffusers folder or a single checkpoint file", where=where) from None
        raise ModelError(f"could not fetch the hub model ({_first_line(exc)})",
                         "check the id and the network, or download the model and give its local file or folder",
                         where=where) from None
    family = family_from_unet_config(unet_config, where=where)
    _check_family(cfg, family, where)
    unet = _component(UNet2DConditionModel, source, "unet", where, torch_dtype=dtype)
    vae = _component(AutoencoderKL, source, "vae", where, torch_dtype=dtype)
    encoders = [_component(spec.model_class, source, spec.subfolder, where, torch_dtype=dtype)
                for spec in family.text_encoder_specs]
    scheduler = _component(DDPMScheduler, source, "scheduler", where)
    prediction_type = scheduler.config.prediction_type if cfg.prediction_type == "auto" else cfg.prediction_type
    zero_snr = prediction_type == "v_prediction" and bool(scheduler.config.get("rescale_betas_zero_snr"))
    return BaseModel(family=family, prediction_type=prediction_type, unet=unet, vae=vae, text_encoders=encoders,
                     tokenizers=_folder_tokenizers(source, family, where),
                     noise_scheduler=_noise_scheduler(scheduler, prediction_type, zero_snr), source=cfg.base,
                     zero_terminal_snr=zero_snr)


def _component(component_class, source: str, subfolder: str | None, where: str, **kwargs):
    """One part of a diffusers folder or hub model, by its class's `from_pretrained`."""
    try:
        return component_class.from_pretrained(source, subfolder=subfolder, **kwargs)
    except _LOAD_ERRORS as exc:
        raise ModelError(f"cannot load its {subfolder} ({_first_line(exc)})",
                         "the folder may be incomplete or damaged; give a complete one or a checkpoint file",
                         where=where) from None


def _folder_tokenizers(source: str, family: Family, where: str) -> list[CLIPTokenizer]:
    """The folder's own tokenizers; the shipped ones where it has none (transformers would otherwise quietly build
    a tokenizer that knows only its special tokens)."""
    shipped = family.load_tokenizers()
    tokenizers = []
    for spec, fallback in zip(family.text_encoder_specs, shipped):
        folder = Path(source) / spec.tokenizer_subfolder
        if Path(source).is_dir() and not any((folder / name).is_file() for name in ("vocab.json", "tokenizer.json")):
            tokenizers.append(fallback)
        else:
            tokenizers.append(_component(CLIPTokenizer, source, spec.tokenizer_subfolder, where))
    return tokenizers


ZERO_SNR_MARKER = "ztsnr"
"""An empty tensor in a single file beside `v_pred`: the model was trained with zero terminal SNR (ComfyUI's
convention)."""


def _noise_scheduler(scheduler: DDPMScheduler, prediction_type: str, zero_snr: bool) -> DDPMScheduler:
    # Zero terminal SNR only with v-prediction: at the last step there is no signal left, so epsilon is undefined.
    return DDPMScheduler.from_config(scheduler.config, prediction_type=prediction_type,
                                     rescale_betas_zero_snr=zero_snr)


def _check_family(cfg: ModelConfig, family: Family, where: str) -> None:
    if cfg.family not in ("auto", family.name):
        raise ModelError(f"this is a {family.label} model, but model.family says {cfg.family!r}",
                         f"set model.family to 'auto' (or {family.name!r}), or give a {cfg.family} model", where=where)


def load_vae(source: str, family: Family, dtype: torch.dtype) -> AutoencoderKL:
    """A separate VAE: a single file in the original layout, a diffusers VAE folder (or a model folder with vae/),
    or a hub id."""
    path = Path(source).expanduser()
    where = f"model.vae ({source})"
    if path.is_file():
        return vae_from_original(CheckpointFile(path), family.config_dir, dtype)
    if path.is_dir() and (path / "config.json").is_file():
        return _component(AutoencoderKL, str(path), None, where, torch_dtype=dtype)
    if path.is_dir() and (path / "vae" / "config.json").is_file():
        return _component(AutoencoderKL, str(path), "vae", where, torch_dtype=dtype)
    if path.is_dir() or not _looks_like_hub_id(source):
        raise ModelError("no VAE found here", "give a VAE .safetensors file or a diffusers VAE folder", where=where)
    return _component(AutoencoderKL, source, None, where, torch_dtype=dtype)


def build_pipeline(base: BaseModel, *, scheduler: str = "euler") -> DiffusionPipeline:
    """The family's diffusers pipeline sharing `base`'s modules (no copies), for sample and class images."""
    if scheduler not in SAMPLERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SAMPLERS)}")
    parts = {"unet": base.unet, "vae": base.vae,
             "scheduler": SAMPLERS[scheduler].from_config(base.noise_scheduler.config)}
    for n, (encoder, tokenizer) in enumerate(zip(base.text_encoders, base.tokenizers)):
        suffix = f"_{n + 1}" if n else ""
        parts[f"text_encoder{suffix}"] = encoder
        parts[f"tokenizer{suffix}"] = tokenizer
    pipeline_class = getattr(diffusers, base.family.pipeline_class_name)
    pipeline = pipeline_class(**parts, **base.family.pipeline_extras)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _looks_like_hub_id(source: str) -> bool:
    """`owner/name`, unless it names a checkpoint file or its first part is a local folder (a mistyped path)."""
    return (bool(_HUB_ID.match(source)) and not source.lower().endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
            and not Path(source).parent.is_dir())


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
