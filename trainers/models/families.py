"""The model families (SD1.x, SD2.x, SDXL): the one place that knows how they differ.

A family says which text encoders it has and how their outputs condition the UNet, where its shipped
config-only diffusers folder is, how its single files are laid out, and how to recognise one of its files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import ModelError

CONFIGS = Path(__file__).resolve().parent / "configs"
CLIP_TOKENIZER_DIR = CONFIGS / "clip_tokenizer"
UNET_PREFIX = "model.diffusion_model."
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True, eq=False)
class PromptEmbeds:
    """What the UNet gets from the text side, for a batch of prompts."""

    hidden_states: torch.Tensor
    """(B, 77, context_dim)"""
    pooled: torch.Tensor | None = None
    """SDXL's `text_embeds` (B, 1280); None for SD1/SD2."""

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PromptEmbeds":
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return PromptEmbeds(self.hidden_states.to(device=device, dtype=dtype), pooled)

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def __getitem__(self, index: int | slice | torch.Tensor | list[int]) -> "PromptEmbeds":
        """A sub-batch; an integer index keeps the batch dimension (a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        pooled = None if self.pooled is None else self.pooled[index]
        return PromptEmbeds(self.hidden_states[index], pooled)

    @staticmethod
    def cat(parts: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        hidden = torch.cat([p.hidden_states for p in parts])
        if any(p.pooled is None for p in parts):
            return PromptEmbeds(hidden)
        return PromptEmbeds(hidden, torch.cat([p.pooled for p in parts]))


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family: its diffusers class and folder, and where it lives in a single file."""

    subfolder: str
    model_class: type
    original_prefix: str
    layout: str
    """"clip" (OpenAI CLIP in transformers' layout) or "open_clip" (OpenCLIP's resblocks, merged q/k/v)."""
    pad_token: str
    drops_last_layer: bool = False
    """SD2 conditions on OpenCLIP's penultimate layer: the file keeps all 24 layers, diffusers only the 23 it uses."""

    @property
    def tokenizer_subfolder(self) -> str:
        return self.subfolder.replace("text_encoder", "tokenizer")

    def width_in(self, state: Mapping[str, Any]) -> int | None:
        """The encoder's hidden width as stored in a single file, or None when it is not in the file."""
        for key in self.token_embedding_keys():
            if key in state:
                return key_shape(state, key)[1]
        return None

    def token_embedding_keys(self) -> tuple[str, ...]:
        if self.layout == "open_clip":
            return (self.original_prefix + "token_embedding.weight",)
        return (self.original_prefix + "text_model.embeddings.token_embedding.weight",
                self.original_prefix + "embeddings.token_embedding.weight")


CLIP_L_SD1 = TextEncoderSpec("text_encoder", CLIPTextModel, "cond_stage_model.transformer.", "clip", "<|endoftext|>")
OPEN_CLIP_H = TextEncoderSpec("text_encoder", CLIPTextModel, "cond_stage_model.model.", "open_clip", "!",
                              drops_last_layer=True)
CLIP_L_SDXL = TextEncoderSpec("text_encoder", CLIPTextModel, "conditioner.embedders.0.transformer.", "clip",
                              "<|endoftext|>")
OPEN_CLIP_BIGG = TextEncoderSpec("text_encoder_2", CLIPTextModelWithProjection, "conditioner.embedders.1.model.",
                                 "open_clip", "!")


@dataclass(frozen=True, eq=False)
class Family:
    name: str
    label: str
    config_dirs: Mapping[str, Path]
    """Shipped config-only diffusers folder per prediction type."""
    default_prediction_type: str
    default_resolution: int
    context_dim: int
    text_encoder_specs: tuple[TextEncoderSpec, ...]
    kohya_text_encoder_prefixes: tuple[str, ...]
    pipeline_class_name: str
    architectures: Mapping[str, str]
    """modelspec architecture per prediction type."""
    unet_head_channels: int | None
    """Width of one attention head in the UNet; None: a fixed 8 heads (SD1.x)."""
    added_conditioning: bool = False
    """SDXL: pooled text embeddings and size/crop ids go into the UNet's `label_emb`."""
    v_prediction_marker: bool = False
    """Its single files say v-prediction with an empty `v_pred` tensor (ComfyUI's convention for SDXL; SD2.x files
    show it in their weights, and SD1.x files have no way to say it)."""
    pipeline_extras: Mapping[str, Any] = field(default_factory=dict)
    """Arguments the family's diffusers pipeline needs besides the model parts."""

    # ---- configs and tokenizers -------------------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        return self.config_dirs[self.default_prediction_type]

    def config_dir_for(self, prediction_type: str) -> Path:
        return self.config_dirs.get(prediction_type, self.config_dir)

    def modelspec_architecture(self, prediction_type: str) -> str:
        return self.architectures.get(prediction_type, self.architectures[self.default_prediction_type])

    def load_tokenizers(self) -> list[CLIPTokenizer]:
        """Fresh tokenizers (callers such as textual inversion add tokens to them) from the one shipped BPE copy."""
        return [CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, pad_token=spec.pad_token, model_max_length=77)
                for spec in self.text_encoder_specs]

    def unet_attention_heads(self, channels: int) -> int:
        if self.unet_head_channels is None:
            return 8
        return max(1, channels // self.unet_head_channels)

    # ---- conditioning -----------------------------------------------------------------------------------
    def encode_prompts(self, text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence[CLIPTokenizer],
                       prompts: list[str]) -> PromptEmbeds:
        """The final hidden states after the final layer norm, as diffusers' pipeline and ComfyUI use them (for
        SD2 diffusers' text encoder already stops at OpenCLIP's penultimate layer)."""
        (encoder,), (tokenizer,) = text_encoders, tokenizers
        return PromptEmbeds(encoder(_token_ids(tokenizer, prompts, encoder))[0])

    def added_cond_kwargs(self, embeds: PromptEmbeds, original_sizes: Any, crops_top_left: Any,
                          target_sizes: Any) -> dict[str, torch.Tensor] | None:
        return None


class SDXLFamily(Family):
    def encode_prompts(self, text_encoders, tokenizers, prompts):
        """Both encoders' penultimate hidden states side by side, and encoder 2's projected pooled output,
        as diffusers' SDXL pipeline (and ComfyUI) compute them."""
        hidden = []
        for encoder, tokenizer in zip(text_encoders, tokenizers, strict=True):
            out = encoder(_token_ids(tokenizer, prompts, encoder), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return PromptEmbeds(torch.cat(hidden, dim=-1), out.text_embeds)

    def added_cond_kwargs(self, embeds, original_sizes, crops_top_left, target_sizes):
        """`time_ids` per sample: original (h, w), crop top-left (y, x), target (h, w)."""
        if embeds.pooled is None or original_sizes is None or crops_top_left is None or target_sizes is None:
            raise ValueError("SDXL needs pooled embeddings and per-sample original sizes, crops and target sizes")
        rows = [[*map(int, o), *map(int, c), *map(int, t)]
                for o, c, t in zip(original_sizes, crops_top_left, target_sizes, strict=True)]
        time_ids = torch.tensor(rows, device=embeds.pooled.device, dtype=embeds.pooled.dtype)
        return {"text_embeds": embeds.pooled, "time_ids": time_ids}


def _token_ids(tokenizer: CLIPTokenizer, prompts: list[str], encoder: torch.nn.Module) -> torch.Tensor:
    """Padded to 77 tokens on the encoder's device (read off its weights: wrappers such as DDP have no `.device`)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(next(encoder.parameters()).device)


_NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
SD1 = Family(
    name="sd1", label="Stable Diffusion 1.x", config_dirs={"epsilon": CONFIGS / "sd15"},
    default_prediction_type="epsilon", default_resolution=512, context_dim=768, text_encoder_specs=(CLIP_L_SD1,),
    kohya_text_encoder_prefixes=("lora_te",), pipeline_class_name="StableDiffusionPipeline",
    architectures={"epsilon": "stable-diffusion-v1"}, unet_head_channels=None, pipeline_extras=_NO_SAFETY_CHECKER)
SD2 = Family(
    name="sd2", label="Stable Diffusion 2.x",
    config_dirs={"v_prediction": CONFIGS / "sd21-v", "epsilon": CONFIGS / "sd21-base"},
    default_prediction_type="v_prediction", default_resolution=768, context_dim=1024, text_encoder_specs=(OPEN_CLIP_H,),
    kohya_text_encoder_prefixes=("lora_te",), pipeline_class_name="StableDiffusionPipeline",
    architectures={"v_prediction": "stable-diffusion-v2-768-v", "epsilon": "stable-diffusion-v2-512"},
    unet_head_channels=64, pipeline_extras=_NO_SAFETY_CHECKER)
SDXL = SDXLFamily(
    name="sdxl", label="Stable Diffusion XL", config_dirs={"epsilon": CONFIGS / "sdxl-base"},
    default_prediction_type="epsilon", default_resolution=1024, context_dim=2048,
    text_encoder_specs=(CLIP_L_SDXL, OPEN_CLIP_BIGG), kohya_text_encoder_prefixes=("lora_te1", "lora_te2"),
    pipeline_class_name="StableDiffusionXLPipeline", architectures={"epsilon": "stable-diffusion-xl-v1-base"},
    unet_head_channels=64, added_conditioning=True, v_prediction_marker=True,
    pipeline_extras={"add_watermarker": False})

FAMILIES: dict[str, Family] = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}
SUPPORTED = "Stable Diffusion 1.x, 2.x (512 and 768-v) and SDXL"

# ComfyUI's rule for SD2.x files: a v-prediction model has a widely spread bias here; an epsilon one does not.
_SD2_V_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
_SD2_V_MIN_STD = 0.09


# ---- recognising a family ---------------------------------------------------------------------------------
def detect_family(state: Mapping[str, Any], *, where: str) -> tuple[Family, str]:
    """(family, prediction type) of a single-file state dict in the original layout.

    `state` maps keys to tensors or to shapes (tuples); with shapes only, SD2's prediction type cannot be read
    and is reported as epsilon. The family is the one whose text encoders the file holds, and the UNet must agree:
    its cross-attention width is the encoders' widths together (768 SD1, 1024 SD2, 768 + 1280 SDXL), and only
    SDXL has the size/crop embedding (`label_emb`). Without text encoders the width alone decides.
    """
    if not any(key.startswith(UNET_PREFIX + "input_blocks.") for key in state):
        raise _unknown(where, _what_it_looks_like(state))
    context = _cross_attention_width(state)
    has_adm = UNET_PREFIX + "label_emb.0.0.weight" in state
    family = _family_by_text_encoders(state) or _family_by_width(context)
    if family is None or has_adm != family.added_conditioning:
        raise _unknown(where, f"a UNet with cross-attention width {context}" + (" and a class embedding" if has_adm else ""))
    widths = [spec.width_in(state) for spec in family.text_encoder_specs]
    if None not in widths and context != sum(widths):
        raise _unknown(where, f"a {family.label} text encoder of width {sum(widths)} beside a UNet expecting {context}")
    return family, _prediction_type(family, state)


def _family_by_text_encoders(state: Mapping[str, Any]) -> Family | None:
    for family in (SDXL, SD2, SD1):  # SDXL's CLIP-L alone would not tell it from SD1
        if all(spec.width_in(state) is not None for spec in family.text_encoder_specs):
            return family
    return None


def _family_by_width(context: int | None) -> Family | None:
    return next((f for f in FAMILIES.values() if f.context_dim == context), None)


def _prediction_type(family: Family, state: Mapping[str, Any]) -> str:
    if "v_pred" in state:
        return "v_prediction"
    if family is SD2 and _SD2_V_PROBE in state:
        probe = state[_SD2_V_PROBE]
        if isinstance(probe, torch.Tensor) and torch.std(probe.float(), unbiased=False) > _SD2_V_MIN_STD:
            return "v_prediction"
    return "epsilon"


def _cross_attention_width(state: Mapping[str, Any]) -> int | None:
    for key in state:
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            return key_shape(state, key)[1]
    return None


def _what_it_looks_like(state: Mapping[str, Any]) -> str:
    keys = list(state)
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k for k in keys):
        return "a LoRA, not a base model"
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return "a diffusion model of another architecture (e.g. SD3, Flux)"
    if not keys:
        return "no tensors"
    return f"no Stable Diffusion UNet (first key {keys[0]!r})"


def _unknown(where: str, found: str) -> ModelError:
    return ModelError(f"not a model this trainer supports: found {found}",
                      f"use a full {SUPPORTED} checkpoint (.safetensors), a diffusers folder of one, or a hub id",
                      where=where)


def key_shape(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if hasattr(state, "shape_of"):  # a lazily read file: no need to load the tensor
        return state.shape_of(key)
    value = state[key]
    return tuple(value) if isinstance(value, (tuple, list, torch.Size)) else tuple(value.shape)


def family_from_unet_config(unet_config: Mapping[str, Any], *, where: str) -> Family:
    """The family of a diffusers UNet config: SDXL has the text-and-time embedding, SD2 linear projections in its
    transformers (and width 1024 at full size), SD1 neither."""
    if unet_config.get("addition_embed_type") == "text_time":
        return SDXL
    if unet_config.get("addition_embed_type") or unet_config.get("class_embed_type"):
        raise _unknown(where, f"a UNet with {unet_config.get('addition_embed_type') or unet_config.get('class_embed_type')} "
                              "class conditioning")
    if unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == SD2.context_dim:
        return SD2
    return SD1
