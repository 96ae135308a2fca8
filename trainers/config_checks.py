"""Checks of a whole config (`Config.validate`): each bad value is one ConfigError naming its dotted field and the
fix. Kept apart from the dataclasses in config.py, which say what each setting is."""

from __future__ import annotations

import math
import re
from pathlib import Path

from .config import DEFAULT_LEARNING_RATES, FP8_METHODS, METHODS, METHODS_WITHOUT_IMAGES, Config, ddpo_prompts
from .errors import ConfigError
NAME_BYTES = 200
"""Longest output name (UTF-8 bytes): room for "_2" and ".safetensors" within the 255 bytes file systems allow."""
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{n}" for n in range(1, 10)), *(f"LPT{n}" for n in range(1, 10))}
CAPTION_EXTENSION = re.compile(r"^\.?[A-Za-z0-9_-]{1,16}$")


def file_name_problem(name: str) -> str:
    """Why `name` cannot be a file name on every system the results travel to ("" when it can)."""
    if not name.strip() or name in (".", ".."):
        return "empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it has a control character"
    if any(c in name for c in '/\\:*?"<>|'):
        return "it has one of / \\ : * ? \" < > |"
    if len(name.encode("utf-8")) > NAME_BYTES:
        return f"longer than {NAME_BYTES} bytes"
    if name.split(".")[0].strip().upper() in WINDOWS_RESERVED or name.endswith((".", " ")):
        return "Windows reserves it"
    return ""


def _check(ok: bool, where: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(problem, fix, where=where)


def validate(cfg: Config) -> None:
    m, d, t, lo, db, o = cfg.model, cfg.data, cfg.train, cfg.lora, cfg.dreambooth, cfg.output
    _check(bool(m.base.strip()), "model.base", "no base model given",
           "set it to a checkpoint file, a diffusers folder or a hub id")
    _check(bool(d.folder or d.manifest) or t.method in METHODS_WITHOUT_IMAGES, "data.folder",
           "no training data given", "set data.folder to a folder of images (or data.manifest to a JSON-lines file)")
    _check(d.repeats >= 1, "data.repeats", f"must be at least 1, got {d.repeats}", "use 1 or more")
    _check(d.resolution >= 32 and d.resolution % 8 == 0, "data.resolution",
           f"must be a multiple of 8 and at least 32, got {d.resolution}", "use e.g. 512 (SD1.x), 768 (SD2) or 1024 (SDXL)")
    _check(d.bucket_step > 0 and d.bucket_step % 8 == 0, "data.bucket_step",
           f"must be a positive multiple of 8, got {d.bucket_step}", "use 64")
    # Without buckets the step is unused (one square bucket of `resolution`).
    _check(not d.buckets or d.bucket_step <= d.resolution, "data.bucket_step",
           f"must not exceed data.resolution ({d.resolution})", "use a step up to the resolution, or buckets = false")
    _check(d.min_bucket_side > 0 and (d.max_bucket_side == 0 or d.min_bucket_side <= d.max_bucket_side),
           "data.min_bucket_side", "must be positive and not above data.max_bucket_side", "e.g. 256 and 1024")
    _check(bool(CAPTION_EXTENSION.match(d.caption_extension.strip())), "data.caption_extension",
           f"{d.caption_extension!r} is not a file extension", "use e.g. .txt or .caption")
    _check(0.0 <= d.caption_dropout < 1.0, "data.caption_dropout", f"must be in [0, 1), got {d.caption_dropout}", "use e.g. 0.05")
    _check(0.0 <= d.validation_fraction < 1.0, "data.validation_fraction",
           f"must be in [0, 1), got {d.validation_fraction}", "use e.g. 0.1, or 0 for none")
    _check(0.0 <= d.unmasked_share <= 1.0, "data.unmasked_share", f"must be in [0, 1], got {d.unmasked_share}",
           "use e.g. 0.1, or 0")
    _check(d.keep_tokens >= 0, "data.keep_tokens", f"must not be negative, got {d.keep_tokens}", "use 0 or more")
    _check(t.method in METHODS, "train.method", f"unknown method {t.method!r}", f"use one of {', '.join(METHODS)}")
    _check(t.steps >= 0, "train.steps", f"must not be negative, got {t.steps}", "use 0 for automatic, or a step count")
    _check(t.batch_size >= 1, "train.batch_size", f"must be at least 1, got {t.batch_size}", "use 1 or more")
    _check(t.gradient_accumulation >= 1, "train.gradient_accumulation", f"must be at least 1, got {t.gradient_accumulation}", "use 1 or more")
    for name in ("learning_rate", "text_encoder_lr"):
        value = getattr(t, name)
        _check(math.isfinite(value) and value >= 0, f"train.{name}", f"must be a positive number, got {value}",
               f"use e.g. {DEFAULT_LEARNING_RATES.get(t.method, 1e-4):.0e}, or 0 for the default"
               .replace("e-0", "e-"))
    _check(t.optimizer != "schedulefree_adamw" or t.lr_scheduler in ("constant", "constant_with_warmup"),
           "train.lr_scheduler", f"schedulefree_adamw replaces the learning-rate schedule, got {t.lr_scheduler}",
           "use constant_with_warmup (the warmup is the optimizer's own), or another optimizer")
    _check(math.isfinite(t.memory_budget_gb) and t.memory_budget_gb >= 0, "train.memory_budget_gb",
           f"must not be negative, got {t.memory_budget_gb}", "use e.g. 12, or 0 for the GPU's free memory")
    _check(t.fp8_base != "on" or t.method in FP8_METHODS, "train.fp8_base",
           f"fp8 base weights are for the frozen UNet of LoRA methods, not {t.method}", "set fp8_base off or auto")
    _check(t.fp8_base != "on" or lo.algorithm != "dora", "train.fp8_base",
           "DoRA reads the base weights' norms in every step, which fp8 storage would change",
           "set fp8_base off or auto, or choose another lora.algorithm")
    _check(not t.offload_unet or t.method in FP8_METHODS, "train.offload_unet",
           f"block offload is for the frozen UNet of LoRA methods, not {t.method}", "set offload_unet false")
    _check(t.fused_backward != "on" or (t.method == "full" and t.gradient_accumulation == 1 and t.max_grad_norm == 0),
           "train.fused_backward", "fused_backward steps each weight during backward: it needs method full, "
           "gradient_accumulation 1 and max_grad_norm 0", "set fused_backward off or auto, or change those settings")
    _check(t.max_grad_norm >= 0, "train.max_grad_norm", f"must not be negative, got {t.max_grad_norm}", "use 1.0, or 0 to disable")
    _check(t.min_snr_gamma >= 0, "train.min_snr_gamma", f"must not be negative, got {t.min_snr_gamma}", "use 5, or 0 to disable")
    _check(0.0 <= t.noise_offset <= 1.0, "train.noise_offset", f"must be in [0, 1], got {t.noise_offset}", "use e.g. 0.05")
    _check(lo.rank >= 1, "lora.rank", f"must be at least 1, got {lo.rank}", "use e.g. 16")
    _check(lo.alpha > 0, "lora.alpha", f"must be positive, got {lo.alpha}", "use the rank, or half of it")
    _check(lo.conv_rank >= 1, "lora.conv_rank", f"must be at least 1, got {lo.conv_rank}", "use e.g. 8")
    _check(lo.conv_alpha > 0, "lora.conv_alpha", f"must be positive, got {lo.conv_alpha}", "use e.g. 8")
    _check(lo.text_encoder_rank >= 0, "lora.text_encoder_rank", f"must not be negative, got {lo.text_encoder_rank}", "use 0 for the UNet rank")
    _check(0.0 <= lo.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {lo.dropout}", "use 0 or e.g. 0.1")
    _check(lo.dropout == 0 or lo.algorithm in ("lora", "dora"), "lora.dropout",
           f"is for algorithms lora and dora, not {lo.algorithm}", "set lora.dropout to 0")
    _check(lo.lokr_factor == -1 or lo.lokr_factor >= 1, "lora.lokr_factor", f"must be -1 or at least 1, got "
           f"{lo.lokr_factor}", "use -1 (balanced), or e.g. 8")
    _check(lo.format != "peft" or lo.algorithm != "dora" or not lo.train_text_encoder, "lora.format",
           "diffusers' load_lora_weights does not load a DoRA text encoder's magnitudes back from the peft format",
           "use format kohya (ComfyUI and Forge load it exactly), or train_text_encoder false")
    if db.enabled:
        _check(db.num_class_images >= 1 or not db.prior_preservation, "dreambooth.num_class_images",
               f"must be at least 1 with prior preservation, got {db.num_class_images}", "use e.g. 50-200")
        _check(db.prior_loss_weight >= 0, "dreambooth.prior_loss_weight",
               f"must not be negative, got {db.prior_loss_weight}", "use 1.0")
        _check(bool(d.class_noun.strip()) or "{class}" not in db.class_prompt, "data.class_noun",
               "DreamBooth needs a class noun (what the subject is, e.g. 'person', 'dog')", "set data.class_noun")
    _check(0.0 < cfg.full.ema_decay < 1.0, "full.ema_decay", f"must be in (0, 1), got {cfg.full.ema_decay}", "use e.g. 0.999")
    problem = file_name_problem(o.name)
    _check(not problem, "output.name", f"{o.name!r} is not a usable file name ({problem})",
           "use letters, digits, '-' and '_'")
    for name in ("checkpoint_every", "save_every", "sample_every", "validation_every", "keep_checkpoints"):
        _check(getattr(o, name) >= 0, f"output.{name}", f"must not be negative, got {getattr(o, name)}", "use 0 to disable")
    _check(o.sample_steps >= 1, "output.sample_steps", f"must be at least 1, got {o.sample_steps}", "use e.g. 20")
    {"textual_inversion": _validate_textual_inversion, "controlnet": _validate_controlnet,
     "ddpo": _validate_ddpo}.get(t.method, lambda cfg: None)(cfg)


def _validate_textual_inversion(cfg: Config) -> None:
    ti, d = cfg.textual_inversion, cfg.data
    _check(bool(d.trigger_word.strip()) and len(d.trigger_word.split()) == 1, "data.trigger_word",
           "textual inversion needs one trigger word: the word in the captions that the new embedding stands for",
           "set data.trigger_word to a single made-up word, e.g. 'sks' or 'my-cat'")
    _check(1 <= ti.num_vectors <= 75, "textual_inversion.num_vectors", f"must be 1-75, got {ti.num_vectors}",
           "use 1-4 for a subject, up to 16 for a style")
    _check(not cfg.dreambooth.enabled, "dreambooth.enabled", "DreamBooth prior preservation is for LoRA and full "
           "fine-tuning", "turn dreambooth.enabled off for textual inversion")


def _validate_controlnet(cfg: Config) -> None:
    c = cfg.controlnet
    if c.control_folder:
        folder = Path(c.control_folder).expanduser()
        _check(folder.is_dir(), "controlnet.control_folder", f"folder not found: {folder}",
               "point it at the folder of control maps (same file names as the training images), or leave it empty "
               "to make maps with controlnet.preprocessor")
    else:
        from .preprocess import NEEDS_DEPTH_MODEL, PREPROCESSORS

        _check(c.preprocessor in PREPROCESSORS, "controlnet.preprocessor", f"unknown preprocessor {c.preprocessor!r}",
               f"use one of {', '.join(p for p in PREPROCESSORS if p not in NEEDS_DEPTH_MODEL)}, or set "
               "controlnet.control_folder")
        _check(c.preprocessor not in NEEDS_DEPTH_MODEL, "controlnet.preprocessor",
               f"{c.preprocessor} maps need a depth model, so training does not make them on the fly",
               "make the maps once (e.g. ControlNet Condition's control_map into a Save Image node), save them under "
               "the images' names in a folder and set controlnet.control_folder")
    _check(math.isfinite(c.conditioning_scale) and c.conditioning_scale > 0, "controlnet.conditioning_scale",
           f"must be a positive number, got {c.conditioning_scale}", "use 1.0")
    _check(not cfg.dreambooth.enabled, "dreambooth.enabled", "DreamBooth prior preservation is for LoRA and full "
           "fine-tuning", "turn dreambooth.enabled off for ControlNet training")


def _validate_ddpo(cfg: Config) -> None:
    p, t = cfg.ddpo, cfg.train
    if p.prompt_file:
        _check(Path(p.prompt_file).expanduser().is_file(), "ddpo.prompt_file", f"file not found: {p.prompt_file}",
               "point it at a text file with one prompt per line, or list them in ddpo.prompts")
    _check(bool(ddpo_prompts(p)), "ddpo.prompts", "DDPO needs at least one prompt to sample images from",
           'set ddpo.prompts, e.g. ["a photo of a cat"], or ddpo.prompt_file')
    _check(not cfg.lora.train_text_encoder, "lora.train_text_encoder", "DDPO trains the UNet only",
           "turn lora.train_text_encoder off")
    if p.reward in ("aesthetic", "clip_score", "blip_score"):
        _check(bool(p.reward_model.strip()), "ddpo.reward_model", f"reward {p.reward!r} needs a model",
               "set it to a local CLIP model folder (aesthetic, clip_score) or BLIP ITM folder (blip_score), or use "
               "reward jpeg_compressibility, which needs no weights")
    if p.reward == "reference_similarity":
        _check(Path(p.reference_folder).expanduser().is_dir(), "ddpo.reference_folder",
               f"the reference image folder was not found: {p.reference_folder or '(empty)'}",
               "set it to a folder of the images the samples should come to look like")
    if p.reward == "aesthetic":
        _check(Path(p.aesthetic_head).expanduser().is_file(), "ddpo.aesthetic_head",
               f"the aesthetic predictor file was not found: {p.aesthetic_head or '(empty)'}",
               "download sac+logos+ava1-l14-linearMSE.pth (LAION improved-aesthetic-predictor) and set its path")
    for name in ("sample_steps", "samples_per_epoch", "sample_batch_size", "inner_epochs", "stats_buffer"):
        _check(getattr(p, name) >= 1, f"ddpo.{name}", f"must be at least 1, got {getattr(p, name)}", "use 1 or more")
    _check(p.sample_steps <= 1000, "ddpo.sample_steps", f"must be at most 1000, got {p.sample_steps}", "use e.g. 50")
    _check(p.eta > 0, "ddpo.eta", f"must be positive (DDPO needs a stochastic sampler), got {p.eta}", "use 1.0")
    _check(p.guidance >= 1, "ddpo.guidance", f"must be at least 1, got {p.guidance}", "use e.g. 5")
    _check(0 < p.timestep_fraction <= 1, "ddpo.timestep_fraction", f"must be in (0, 1], got {p.timestep_fraction}",
           "use 1.0, or e.g. 0.5 to train on half the steps")
    _check(p.clip_range > 0, "ddpo.clip_range", f"must be positive, got {p.clip_range}", "use 1e-4")
    _check(p.advantage_clip > 0, "ddpo.advantage_clip", f"must be positive, got {p.advantage_clip}", "use 5")
    _check(0 <= p.stats_min_count <= p.stats_buffer, "ddpo.stats_min_count",
           f"must be between 0 and ddpo.stats_buffer ({p.stats_buffer}), got {p.stats_min_count}", "use e.g. 16")
    per_step = t.batch_size * t.gradient_accumulation
    _check(p.samples_per_epoch % per_step == 0, "ddpo.samples_per_epoch",
           f"must be a multiple of train.batch_size × train.gradient_accumulation ({per_step}), got "
           f"{p.samples_per_epoch}", f"use e.g. {per_step * max(1, round(p.samples_per_epoch / per_step))}")
    _check(p.samples_per_epoch % p.sample_batch_size == 0, "ddpo.sample_batch_size",
           f"must divide ddpo.samples_per_epoch ({p.samples_per_epoch}), got {p.sample_batch_size}",
           "use e.g. 4 or 8")
