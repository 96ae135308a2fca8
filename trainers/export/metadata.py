"""The safetensors header of an exported file: kohya's `ss_*` keys (read by AUTOMATIC1111, Forge and civitai),
the SAI model spec's `modelspec.*` keys, and our own `finetune_*` keys (the full config, trigger word, class noun).

Every value is a string, as the safetensors header requires.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from ..config import Config
from ..models.families import FAMILIES

_BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
# Our LoRA keys name diffusers' modules; a single-file checkpoint uses the original (Stability) layout.
_LORA_IMPLEMENTATION = "diffusers"
_CHECKPOINT_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def lora_metadata(cfg: Config, *, family_name: str, prediction_type: str, steps_done: int, num_images: int,
                  tag_frequency: dict[str, int], started_at: float, finished_at: float,
                  base_model_name: str, zero_terminal_snr: bool = False) -> dict[str, str]:
    """Header of an exported LoRA file."""
    lora, train = cfg.lora, cfg.train
    metadata = checkpoint_metadata(cfg, family_name=family_name, prediction_type=prediction_type, steps_done=steps_done,
                                   num_images=num_images, tag_frequency=tag_frequency, started_at=started_at,
                                   finished_at=finished_at, base_model_name=base_model_name,
                                   zero_terminal_snr=zero_terminal_snr)
    metadata.update(_modelspec(cfg, family_name, prediction_type, finished_at, adapter="lora",
                               implementation=_LORA_IMPLEMENTATION))
    metadata.update({
        "ss_network_module": "networks.lora" if lora.algorithm == "lora" else "lycoris.kohya",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(float(lora.alpha)),
        "ss_network_dropout": str(float(lora.dropout)),
        "ss_unet_lr": str(train.learning_rate),
        "ss_text_encoder_lr": str(train.text_encoder_lr if lora.train_text_encoder else 0.0),
        "ss_network_train_unet_only": str(not lora.train_text_encoder),
    })
    metadata.update(_network_args(lora))
    return metadata


def _network_args(lora) -> dict[str, str]:
    """ss_network_args as kohya's LoCon and LyCORIS's kohya module write them (LyCORIS names its algorithm `algo`).

    DoRA is LyCORIS's: its kohya module is the one whose network args turn DoRA on (`dora_wd`, per output row with
    `wd_on_output`, the axis of our `dora_scale`), on its LoRA (`algo` lora); kohya's own networks.lora reads no DoRA
    argument, so a run repeated from these arguments with it would train a plain LoRA."""
    args = {"conv_dim": str(lora.conv_rank), "conv_alpha": str(float(lora.conv_alpha))} if lora.targets == "all" else {}
    if lora.algorithm != "lora":
        args = {"algo": "lora" if lora.algorithm == "dora" else lora.algorithm, **args}
    if lora.algorithm == "lokr":
        args["factor"] = str(lora.lokr_factor)
    if lora.algorithm == "dora":
        args.update(dora_wd="True", wd_on_output="True")
    return {"ss_network_args": json.dumps(args)} if args else {}


def checkpoint_metadata(cfg: Config, *, family_name: str, prediction_type: str, steps_done: int, num_images: int,
                        tag_frequency: dict[str, int], started_at: float, finished_at: float,
                        base_model_name: str, zero_terminal_snr: bool = False) -> dict[str, str]:
    """Header of an exported single-file checkpoint (full fine-tune); a LoRA's header adds to it."""
    data, train, db = cfg.data, cfg.train, cfg.dreambooth
    metadata = _modelspec(cfg, family_name, prediction_type, finished_at, adapter="",
                          implementation=_CHECKPOINT_IMPLEMENTATION)
    # kohya groups tag counts by dataset folder; UIs read that nesting.
    dataset_name = Path(data.folder or data.manifest).stem or "dataset"
    comment = ", ".join(f"{label}: {value}" for label, value in
                        (("trigger word", data.trigger_word), ("class", data.class_noun)) if value)
    metadata.update({
        "ss_base_model_version": _BASE_MODEL_VERSIONS[family_name],
        "ss_v2": str(family_name == "sd2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_zero_terminal_snr": str(zero_terminal_snr),
        "ss_sd_model_name": base_model_name,
        "ss_output_name": cfg.output.name,
        "ss_training_comment": comment,
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(finished_at),
        "ss_steps": str(steps_done),
        "ss_max_train_steps": str(train.steps),
        "ss_num_train_images": str(num_images),
        "ss_num_reg_images": str(db.num_class_images if db.enabled and db.prior_preservation else 0),
        "ss_prior_loss_weight": str(float(db.prior_loss_weight)),
        "ss_tag_frequency": json.dumps({dataset_name: tag_frequency}, ensure_ascii=False),
        "ss_resolution": f"({data.resolution}, {data.resolution})",
        "ss_enable_bucket": str(data.buckets),
        "ss_min_bucket_reso": str(data.min_bucket_side),
        "ss_max_bucket_reso": str(data.max_bucket_side),
        "ss_bucket_reso_steps": str(data.bucket_step),
        "ss_flip_aug": str(data.flip),
        "ss_random_crop": str(data.crop == "random"),
        "ss_shuffle_caption": str(data.shuffle_tags),
        "ss_keep_tokens": str(data.keep_tokens),
        "ss_caption_dropout_rate": str(float(data.caption_dropout)),
        "ss_learning_rate": str(train.learning_rate),
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": str(train.warmup_steps),
        "ss_optimizer": train.optimizer,
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation),
        "ss_max_grad_norm": str(float(train.max_grad_norm)),
        "ss_mixed_precision": train.mixed_precision,
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_cache_latents": str(train.cache_latents),
        "ss_min_snr_gamma": str(float(train.min_snr_gamma)),
        "ss_noise_offset": str(float(train.noise_offset)),
        "ss_seed": str(train.seed),
        "finetune_config": cfg.to_json(),
        "finetune_trigger_word": data.trigger_word,
        "finetune_class_noun": data.class_noun,
    })
    return metadata


def _architecture(family_name: str, prediction_type: str, adapter: str) -> str:
    """The model spec's architecture id, e.g. "stable-diffusion-v2-768-v" or "stable-diffusion-v1/lora"."""
    if family_name not in FAMILIES:
        raise ValueError(f"unknown model family {family_name!r}")
    arch = FAMILIES[family_name].modelspec_architecture(prediction_type)
    return f"{arch}/{adapter}" if adapter else arch


def _modelspec(cfg: Config, family_name: str, prediction_type: str, finished_at: float, *, adapter: str,
               implementation: str) -> dict[str, str]:
    resolution = cfg.data.resolution
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _architecture(family_name, prediction_type, adapter),
        "modelspec.implementation": implementation,
        "modelspec.title": cfg.output.name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.fromtimestamp(finished_at, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    if cfg.data.trigger_word:
        spec["modelspec.trigger_phrase"] = cfg.data.trigger_word
    return spec
