"""The typed training config: one dataclass per concern, loaded from TOML or JSON, saved beside every output.

Every field has a default a user can trust; `resolve_defaults` fills the ones that depend on the data
(steps, learning rate) and `validate` (config_checks.py) rejects bad values with the field's dotted name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from . import toml_reader
from .errors import ConfigError

Method = Literal["lora", "full", "textual_inversion", "controlnet", "ddpo"]
METHODS: tuple[str, ...] = get_args(Method)
METHODS_WITHOUT_IMAGES: tuple[str, ...] = ("ddpo",)
"""Methods that make their own training data (DDPO samples from the model) and need no image folder."""
Optimizer = Literal["auto", "adamw", "adamw8bit", "prodigy", "schedulefree_adamw", "adafactor"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
Algorithm = Literal["lora", "loha", "lokr", "dora"]
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
    very small files), dora (LoRA with the weight split into magnitude and direction, each row's magnitude trained
    too). LoRA, LoHa and LoKr are written in the kohya/LyCORIS layout that ComfyUI, A1111 and Forge load; DoRA
    adds `dora_scale` per output row, as ComfyUI and Forge read it."""
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
    """Dropout on the LoRA path, 0-1 (algorithms lora and dora only)."""
    lokr_factor: int = -1
    """LoKr: the size of the Kronecker product's first (small) factor per side; -1 = the most balanced split of
    each layer's width (LyCORIS's default); e.g. 8 or 16 for smaller files."""
    train_text_encoder: bool = False
    """Also put LoRA on the text encoder(s) (CLIP-L; both for SDXL)."""
    text_encoder_rank: int = 0
    """0 = same as rank."""
    format: Literal["kohya", "peft"] = "kohya"
    """kohya (loads in ComfyUI, A1111, Forge) or peft (diffusers' `load_lora_weights`; not for a DoRA with a trained
    text encoder, whose magnitudes diffusers does not load back)."""


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
    optimizer: Optimizer = "auto"
    """auto = adamw, or adamw8bit where `memory` needs its smaller state to fit (a CUDA GPU with bitsandbytes);
    adamw; adamw8bit (bitsandbytes, CUDA only: less memory); prodigy (prodigyopt: finds its own step size, no
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
    by layer for compute: half the UNet's memory in bf16. LoRA methods only, not with lora.algorithm dora (it reads
    the base weights' norms); LoRA weights stay fp32."""
    fused_backward: Literal["auto", "on", "off"] = "auto"
    """Full fine-tunes: step the optimizer for each weight as soon as its gradient is ready and free the gradient,
    so all gradients never exist at once. Needs gradient_accumulation 1 and max_grad_norm 0 (no global clipping)."""
    offload_unet: bool = False
    """Experimental (not yet proven on a GPU): keep the UNet's blocks in CPU memory and move each one to the GPU
    just before it runs, the next one prefetched on a CUDA stream (diffusers' group offloading). Much less GPU memory
    for the weights, slower steps; `memory` never turns it on by itself. LoRA methods only (the UNet's own weights stay frozen)."""
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
        from .config_checks import validate  # it imports this module's dataclasses

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
