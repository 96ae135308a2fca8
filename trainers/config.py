"""The typed training config: one dataclass per concern, loaded from TOML or JSON, saved beside every output.

Every field has a default a user can trust; `resolve_defaults` fills the ones that depend on the data
(steps, learning rate) and `validate` rejects bad values with the field's dotted name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from . import toml_reader
from .errors import ConfigError

Method = Literal["lora", "full", "textual_inversion", "controlnet", "ddpo"]
METHODS: tuple[str, ...] = get_args(Method)
METHODS_WITHOUT_IMAGES: tuple[str, ...] = ("ddpo",)
"""Methods that make their own training data (DDPO samples from the model) and need no image folder."""
Optimizer = Literal["adamw", "adamw8bit", "prodigy", "schedulefree_adamw", "adafactor"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
Algorithm = Literal["lora", "loha", "lokr"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)


@dataclass
class ModelConfig:
    base: str = ""
    """Single-file checkpoint (.safetensors/.ckpt), diffusers folder, or hub id."""
    family: Literal["auto", "sd1", "sd2", "sdxl"] = "auto"
    """auto = detected from the checkpoint's keys and shapes; set it only for a checkpoint detection gets wrong."""
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    """auto = from the checkpoint (SD2.x 768 models predict v); epsilon or v_prediction to override."""
    vae: str = ""
    """Optional separate VAE (single file or diffusers folder)."""


@dataclass
class DataConfig:
    folder: str = ""
    """Folder of images with optional caption sidecars; subfolders are included."""
    manifest: str = ""
    """JSON-lines file, one {"image": path, "caption": text, "repeats": n} per line (what the nodes write)."""
    repeats: int = 1
    """How often each image is seen per epoch (a manifest line can set its own)."""
    caption_extension: str = ".txt"
    """Sidecar caption files: `photo.jpg` + `photo.txt`."""
    default_caption: str = ""
    """Caption for images without a sidecar; `{trigger}` and `{class}` are replaced."""
    trigger_word: str = ""
    """Rare token put first in every caption (e.g. `sks`); the word you prompt with later."""
    class_noun: str = ""
    """What the subject is (`dog`, `person`): follows the trigger word, and names the DreamBooth class."""
    caption_dropout: float = 0.0
    """Share of steps trained on an empty caption (helps classifier-free guidance), 0-1."""
    shuffle_tags: bool = False
    """Shuffle comma-separated tags per step (booru-style captions), keeping the first `keep_tokens`."""
    keep_tokens: int = 1
    """Leading comma-separated tags kept in place when shuffling (the trigger word is always first)."""
    resolution: int = 512
    """Training side in pixels (512 for SD1.5, 768 for SD2.x 768, 1024 for SDXL); a multiple of 8."""
    crop: Literal["center", "random"] = "center"
    """Where images are cropped to their bucket: center, or random (a new crop every epoch)."""
    flip: bool = False
    """Randomly mirror images left-right (not for subjects with text or asymmetric features)."""
    buckets: bool = True
    """Aspect-ratio bucketing: images train at their own shape (same pixel count) instead of square crops."""
    bucket_step: int = 64
    """Bucket sides are multiples of this."""
    min_bucket_side: int = 256
    """Smallest bucket side in pixels."""
    max_bucket_side: int = 0
    """0 = twice the resolution."""
    masked_loss: bool = False
    """Weight the loss per pixel by each image's mask so that what is outside it is not learned: `photo.mask.png`
    beside `photo.jpg` (white = learn, black = ignore; same size as the image), else the image's alpha channel;
    images with neither are learned whole. Masks follow crops, flips and buckets and are scaled to the latent."""
    unmasked_share: float = 0.0
    """With masked_loss: share of steps (per image, drawn from the seed) that learn the whole image, 0-1."""
    validation_folder: str = ""
    """Held-out images for the validation loss (not trained on)."""
    validation_fraction: float = 0.0
    """Or hold out this share of the training images instead, 0-0.5."""


@dataclass
class LoraConfig:
    algorithm: Algorithm = "lora"
    """The adapter: lora (low-rank update; with targets = all also on convolutions: LoCon), loha (LyCORIS's
    Hadamard product of two low-rank pairs: more expressive at the same size), lokr (LyCORIS's Kronecker product:
    very small files). All are written in the kohya/LyCORIS layout that ComfyUI, A1111 and Forge load."""
    rank: int = 16
    """Adapter rank (dimension): 4-16 for a subject, 32-128 for a style (LoHa: half of a LoRA's rank is as big)."""
    alpha: float = 16.0
    """Adapter alpha; the update is scaled by alpha / rank (LoKr: where a factor is low-rank; full factors are not
    scaled)."""
    targets: Literal["attention", "attention_ff", "all_linear", "all"] = "attention"
    """attention: q/k/v/out; attention_ff: + feed-forward; all_linear: + proj_in/out and time embeddings;
    all: + conv layers (LoCon) with conv_rank/conv_alpha."""
    conv_rank: int = 8
    """Rank of the conv layers' LoRA when targets = all."""
    conv_alpha: float = 8.0
    """Alpha of the conv layers' LoRA."""
    dropout: float = 0.0
    """Dropout on the LoRA path, 0-1 (algorithm lora only)."""
    lokr_factor: int = -1
    """LoKr: the size of the Kronecker product's first (small) factor per side; -1 = the most balanced split of
    each layer's width (LyCORIS's default); e.g. 8 or 16 for smaller files."""
    train_text_encoder: bool = False
    """Also put LoRA on the text encoder(s) (CLIP-L; both for SDXL)."""
    text_encoder_rank: int = 0
    """0 = same as rank."""
    format: Literal["kohya", "peft"] = "kohya"
    """kohya (loads in ComfyUI, A1111, Forge) or peft (diffusers' `load_lora_weights`)."""


@dataclass
class DreamBoothConfig:
    enabled: bool = False
    """Train on `instance_prompt` captions (trigger word + class noun) with prior preservation."""
    instance_prompt: str = "a photo of {trigger} {class}"
    """Caption of the instance images; `{trigger}` and `{class}` are replaced."""
    class_prompt: str = "a photo of {class}"
    """Caption of the class images."""
    prior_preservation: bool = True
    """Also train on class images so the class itself (any dog, not only yours) is not forgotten."""
    class_folder: str = ""
    """User-given class images; topped up by generating with the base model when fewer than num_class_images."""
    num_class_images: int = 50
    """Class images used; missing ones are generated with the base model once and cached."""
    prior_loss_weight: float = 1.0
    """Weight of the class images' loss."""
    class_generation_steps: int = 25
    """Sampling steps per generated class image."""


@dataclass
class FullConfig:
    train_text_encoder: bool = False
    """Also fine-tune the text encoder(s)."""
    ema: bool = True
    """Keep an exponential moving average of the weights and export it (smoother results)."""
    ema_decay: float = 0.999
    """EMA decay per step."""


@dataclass
class TextualInversionConfig:
    initializer: str = ""
    """Word(s) whose embedding the new one starts from; empty = data.class_noun, or "*" without one."""
    num_vectors: int = 1
    """Vectors (tokens) the embedding spans; 1-4 for a subject, more for a style."""


@dataclass
class ControlNetConfig:
    preprocessor: str = "canny"
    """How control maps are made from the training images (see trainers/preprocess.py); unused with control_folder."""
    control_folder: str = ""
    """Folder of ready-made control maps, one per training image with the same file stem (e.g. img_01.png)."""
    conditioning_scale: float = 1.0
    """Strength of the ControlNet's residuals while training."""


DDPOReward = Literal["jpeg_compressibility", "jpeg_incompressibility", "aesthetic", "clip_score", "blip_score",
                     "reference_similarity"]


@dataclass
class DDPOConfig:
    prompts: list[str] = field(default_factory=list)
    """Prompts to sample from (one picked at random per image)."""
    prompt_file: str = ""
    """Text file, one prompt per line (added to `prompts`)."""
    negative_prompt: str = ""
    """Negative prompt while sampling."""
    reward: DDPOReward = "jpeg_compressibility"
    """What is rewarded: jpeg_compressibility / jpeg_incompressibility (no weights), aesthetic, clip_score,
    blip_score (need `reward_model`), reference_similarity (needs `reference_folder`)."""
    reward_model: str = ""
    """aesthetic / clip_score: a CLIP model folder (transformers layout) or hub id; blip_score: a BLIP ITM model."""
    aesthetic_head: str = ""
    """The LAION aesthetic predictor file (.pth or .safetensors) for reward = aesthetic."""
    reference_folder: str = ""
    """reference_similarity: the images the samples should come to look like (the nodes fill it from a graph)."""
    sample_steps: int = 50
    """DDIM steps per sampled image."""
    eta: float = 1.0
    """DDIM eta; must be > 0 (the policy needs a stochastic sampler)."""
    guidance: float = 5.0
    """Classifier-free guidance while sampling (1 = none)."""
    samples_per_epoch: int = 64
    """Images sampled (and scored) per epoch; each is then trained on `inner_epochs` times."""
    sample_batch_size: int = 8
    """Images sampled at once."""
    inner_epochs: int = 1
    """Passes of training over each epoch's samples."""
    timestep_fraction: float = 1.0
    """Share of each trajectory's steps trained on (a random subset per sample)."""
    clip_range: float = 1e-4
    """PPO clip range of the probability ratio."""
    advantage_clip: float = 5.0
    """Advantages are clipped to +-this."""
    per_prompt_stats: bool = True
    """Normalise rewards per prompt (over its recent rewards) rather than over the whole batch."""
    stats_buffer: int = 32
    """Rewards remembered per prompt for normalisation."""
    stats_min_count: int = 16
    """Rewards a prompt needs before its own statistics are used (the batch's until then)."""


@dataclass
class TrainConfig:
    method: Method = "lora"
    """lora, full (fine-tune the whole UNet), textual_inversion, controlnet or ddpo; DreamBooth is `[dreambooth]
    enabled`."""
    steps: int = 0
    """0 = from the dataset: 100 per image, clamped to 400-1200."""
    batch_size: int = 1
    """Images per step (per GPU)."""
    gradient_accumulation: int = 1
    """Steps whose gradients are summed before one optimizer step (a larger effective batch)."""
    learning_rate: float = 0.0
    """0 = the optimizer's default: 1.0 for prodigy (it finds its own step size), 1e-2 for adafactor (a relative
    step), the method's default for the AdamW kinds (1e-4 for LoRA); a value set here always wins."""
    text_encoder_lr: float = 0.0
    """0 = the UNet's learning rate (when the text encoder is trained)."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear", "polynomial"] = "constant_with_warmup"
    """How the learning rate changes over the steps. schedulefree_adamw needs no schedule: constant or
    constant_with_warmup (both mean the optimizer's own warmup of `warmup_steps`)."""
    warmup_steps: int = -1
    """-1 = 5% of the steps."""
    optimizer: Optimizer = "adamw"
    """adamw; adamw8bit (bitsandbytes, CUDA only: less memory); prodigy (prodigyopt: finds its own step size, no
    learning rate to tune); schedulefree_adamw (schedulefree: no schedule to tune, samples and the result use its
    averaged weights); adafactor (factored second moments: a full fine-tune in less memory)."""
    weight_decay: float = 1e-2
    """Decoupled weight decay of the optimizer."""
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 = off."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """auto = bf16 on GPUs that have it, else fp16 on GPUs, fp32 on the CPU. Trained LoRA weights stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, ~30% slower. true forces it; false lets
    `memory` turn it on when nothing faster fits."""
    memory: Literal["auto", "max_speed", "lowest"] = "auto"
    """How the memory levers below are chosen when left at auto: auto = the fastest combination whose estimate fits
    the GPU's free memory (or `memory_budget_gb`), max_speed = none of them, lowest = the combination with the lowest
    estimate. A lever set to on or off (or gradient_checkpointing true) is never changed."""
    memory_budget_gb: float = 0.0
    """Device memory the run may use, in GiB; 0 = the free memory of the training GPU when training starts (on a
    CPU nothing is checked)."""
    offload_encoders: Literal["auto", "on", "off"] = "auto"
    """Keep the VAE and text encoders in CPU memory; they visit the GPU only to encode (until latents and captions
    are cached) and for sample images. Not with a trained text encoder."""
    fp8_base: Literal["auto", "on", "off"] = "auto"
    """Store the frozen UNet's linear and convolution weights in float8 (one scale per output channel), upcast layer
    by layer for compute: half the UNet's memory in bf16. LoRA methods only; LoRA weights stay fp32."""
    fused_backward: Literal["auto", "on", "off"] = "auto"
    """Full fine-tunes: step the optimizer for each weight as soon as its gradient is ready and free the gradient,
    so all gradients never exist at once. Needs gradient_accumulation 1 and max_grad_norm 0 (no global clipping)."""
    compile: bool = False
    """torch.compile the UNet's training forward: a minute or more of compiling at the start, then faster steps on a
    GPU (sample images use the uncompiled UNet)."""
    compile_mode: Literal["reduce-overhead", "default", "max-autotune"] = "reduce-overhead"
    """With `compile`: reduce-overhead replays each step as CUDA graphs (fastest; one graph per bucket shape, so
    best with few buckets), default fuses kernels only, max-autotune also searches kernel configs (long compile)."""
    compile_scope: Literal["unet", "blocks"] = "unet"
    """With `compile`: unet compiles the whole training forward as one graph (with reduce-overhead the whole step
    replays as CUDA graphs; a full-size SDXL takes minutes to compile), blocks only the UNet's repeated transformer
    blocks (regional compilation: one compile per block shape, a fraction of the time; the rest of the UNet runs
    eager). Compiled code is cached on disk (TORCHINDUCTOR_CACHE_DIR), so a later run of the same model and size
    compiles much faster."""
    cache_latents: bool = True
    """Encode each image with the VAE once instead of every step (off automatically with random crops)."""
    cache_text_embeddings: bool = True
    """Encode each caption once while the text encoder is frozen."""
    min_snr_gamma: float = 5.0
    """0 disables min-SNR weighting."""
    noise_offset: float = 0.0
    """Offset noise (e.g. 0.05) so the model learns very dark and very bright images."""
    seed: int = 42
    """Seeds everything: adapter initialisation, data order, noise. Same seed, same run."""


@dataclass
class OutputConfig:
    dir: str = "output"
    """Parent folder of run folders."""
    name: str = "finetune"
    """Run name: the run folder and the result's file name."""
    overwrite: bool = False
    """Replace an existing run and result of the same name (never done without this)."""
    export_path: str = ""
    """Where the result goes; empty = `<dir>/<name>/<name>.safetensors`."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0 = only at the end and on stop)."""
    keep_checkpoints: int = 2
    """Newest resumable checkpoints kept; older ones are deleted."""
    save_every: int = 0
    """Also export the result every N steps (0 = only at the end)."""
    sample_every: int = 0
    """Sample images every N steps (and always at the end when `sample_prompts` are set); 0 = only at the end."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts for the sample images."""
    sample_steps: int = 20
    """Sampling steps per sample image."""
    sample_seed: int = 1234
    """Seed of the sample images (fixed, so successive samples are comparable)."""
    sample_guidance: float = 7.0
    """Guidance scale of the sample images."""
    validation_every: int = 0
    """Validation loss every N steps (with held-out images); 0 = only at the end."""
    tensorboard: bool = True
    """TensorBoard logs in the run folder's tensorboard/: losses, learning rates, validation loss, DDPO reward, sample
    images. Needs the tensorboard package (pip install tensorboard); without it they are skipped with a log line."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    full: FullConfig = field(default_factory=FullConfig)
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    ddpo: DDPOConfig = field(default_factory=DDPOConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    # ---- (de)serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "Config":
        return _build(cls, data, prefix="", source=source)

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError("config file not found", "pass the path of a .toml or .json config", where=str(path))
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ConfigError("the file is not UTF-8 text", "save it as UTF-8", where=str(path)) from None
        try:
            data = toml_reader.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
        except (toml_reader.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot parse the file ({exc})", "fix the syntax", where=str(path)) from None
        return cls.from_dict(data, source=str(path))

    # ---- defaults that depend on the data ---------------------------------------------------------------
    def resolve_defaults(self, num_images: int) -> "Config":
        """Return a copy with `steps`, `learning_rate` and `warmup_steps` filled in."""
        cfg = dataclasses.replace(self, train=dataclasses.replace(self.train))
        t = cfg.train
        if t.steps <= 0:
            t.steps = DDPO_DEFAULT_EPOCHS * ddpo_steps_per_epoch(cfg) if t.method == "ddpo" else default_steps(num_images)
        if t.learning_rate <= 0:
            t.learning_rate = OPTIMIZER_LEARNING_RATES.get(t.optimizer, DEFAULT_LEARNING_RATES[t.method])
        if t.text_encoder_lr <= 0:
            t.text_encoder_lr = t.learning_rate / 2 if t.method == "lora" else t.learning_rate
        if t.warmup_steps < 0:
            t.warmup_steps = max(0, round(0.05 * t.steps))
        return cfg

    def validate(self) -> None:
        validate(self)


FP8_METHODS = ("lora", "ddpo")
"""Methods whose UNet is frozen under a trained adapter: its weights may be stored in fp8."""

DEFAULT_LEARNING_RATES: dict[str, float] = {
    "lora": 1e-4,
    "full": 2e-6,
    "textual_inversion": 5e-3,
    "controlnet": 1e-5,
    "ddpo": 3e-4,
}


OPTIMIZER_LEARNING_RATES: dict[str, float] = {"prodigy": 1.0, "adafactor": 1e-2}
"""Optimizers whose own default learning rate replaces the method's (the libraries' defaults)."""


def learning_rate_origin(cfg: "Config") -> str:
    """Where the run's learning rate comes from, as the plan prints it."""
    t = cfg.train
    if t.learning_rate > 0:
        return "set"
    return f"{t.optimizer}'s default" if t.optimizer in OPTIMIZER_LEARNING_RATES else f"{t.method}'s default"


def default_steps(num_images: int) -> int:
    """About 100 steps per image, clamped to 400-1200 (what LoRA trainers' users settle on)."""
    return int(min(1200, max(400, 100 * max(1, num_images))))


DDPO_DEFAULT_EPOCHS = 50


def ddpo_steps_per_epoch(cfg: "Config") -> int:
    """Optimizer steps one DDPO epoch (sampling `samples_per_epoch` images, then training on them) takes."""
    d, t = cfg.ddpo, cfg.train
    return d.inner_epochs * d.samples_per_epoch // (t.batch_size * t.gradient_accumulation)


def fill_template(text: str, trigger: str, class_noun: str) -> str:
    """Replace {trigger} and {class} and collapse the spaces an empty value leaves."""
    out = text.replace("{trigger}", trigger).replace("{class}", class_noun)
    return " ".join(out.split())


# ---- validation ------------------------------------------------------------------------------------------
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
    _check(d.resolution >= 64 and d.resolution % 8 == 0, "data.resolution",
           f"must be a multiple of 8 and at least 64, got {d.resolution}", "use e.g. 512 (SD1.x), 768 (SD2) or 1024 (SDXL)")
    _check(d.bucket_step > 0 and d.bucket_step % 8 == 0, "data.bucket_step",
           f"must be a positive multiple of 8, got {d.bucket_step}", "use 64")
    _check(d.bucket_step <= d.resolution, "data.bucket_step", f"must not exceed data.resolution ({d.resolution})",
           "use 64")
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
    _check(lo.dropout == 0 or lo.algorithm == "lora", "lora.dropout", f"is for algorithm lora, not {lo.algorithm}",
           "set lora.dropout to 0")
    _check(lo.lokr_factor == -1 or lo.lokr_factor >= 1, "lora.lokr_factor", f"must be -1 or at least 1, got "
           f"{lo.lokr_factor}", "use -1 (balanced), or e.g. 8")
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


def ddpo_prompts(cfg: DDPOConfig) -> list[str]:
    """`prompts` followed by the non-empty lines of `prompt_file`."""
    prompts = [p.strip() for p in cfg.prompts if p.strip()]
    path = Path(cfg.prompt_file).expanduser() if cfg.prompt_file else None
    if path is not None and path.is_file():
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts


# ---- building dataclasses from plain dicts, with field names in errors ----------------------------------
def _build(cls: type, data: Any, *, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or source
    if not isinstance(data, dict):
        raise ConfigError(f"expected a table of settings, got {type(data).__name__}", "see the README's config example", where=where)
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}", f"known ones: {', '.join(sorted(names))}", where=where)
    values: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, prefix=key + ".", source=source)
        else:
            values[name] = _coerce(hint, value, key)
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{value!r} is not allowed", f"use one of {', '.join(map(repr, allowed))}", where=where)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", "write true or false", where=where)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"expected a whole number, got {value!r}", "write e.g. 16", where=where)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}", "write e.g. 1e-4", where=where)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected text, got {value!r}", "quote the value", where=where)
        return value
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"expected a list of texts, got {value!r}", 'write e.g. ["a photo of sks dog"]', where=where)
        return list(value)
    return value
