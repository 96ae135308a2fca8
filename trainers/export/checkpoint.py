"""Single-file checkpoints: diffusers modules -> the original ("LDM") layout that ComfyUI, AUTOMATIC1111 and
diffusers' own `from_single_file` load. diffusers converts only the other way; this is the inverse of its
`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` and
`convert_open_clip_checkpoint`.

The UNet's block numbering is derived from its config (levels, layers per block, which blocks have attention),
so full-size and miniature models convert alike; the names inside a transformer block are the same in both layouts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from ..errors import ModelError
from ..io import atomic_path, refuse_existing
from ..models.families import UNET_PREFIX, Family, TextEncoderSpec
from ..models.original_configs import VAE_PREFIX
from ..models.single_file import CheckpointFile

if TYPE_CHECKING:
    from ..models.loading import BaseModel

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

_RESNET_NAMES = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
                 "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}


# ---- UNet --------------------------------------------------------------------------------------------------
def unet_to_original(unet_state: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """`model.diffusion_model.*` keys for a diffusers UNet2DConditionModel state dict."""
    modules = _unet_module_map(unet_config)
    out = {}
    for key, value in unet_state.items():
        parts = key.split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth]) + "."
            if prefix in modules:
                rest = key[len(prefix):]
                if ".resnets." in prefix:
                    rest = _rename_start(rest, _RESNET_NAMES)
                out[UNET_PREFIX + modules[prefix] + rest] = value
                break
        else:
            raise ModelError(f"the UNet has a part the single-file layout has no place for ({key})",
                             "export this model as a diffusers folder instead", where="unet")
    return out


def _unet_module_map(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module prefix -> original module prefix, e.g. `down_blocks.1.attentions.0.` -> `input_blocks.4.1.`"""
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    levels = len(down_types)
    layers = config["layers_per_block"]
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * levels
    modules = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
               "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
               "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
               "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
               "mid_block.resnets.1.": "middle_block.2."}
    block = 1
    for level in range(levels):
        for j in range(layers[level]):
            modules[f"down_blocks.{level}.resnets.{j}."] = f"input_blocks.{block}.0."
            modules[f"down_blocks.{level}.attentions.{j}."] = f"input_blocks.{block}.1."
            block += 1
        if level < levels - 1:
            modules[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{block}.0.op."
            block += 1
    block = 0
    for level, up_type in enumerate(up_types):
        for j in range(layers[levels - 1 - level] + 1):
            modules[f"up_blocks.{level}.resnets.{j}."] = f"output_blocks.{block}.0."
            modules[f"up_blocks.{level}.attentions.{j}."] = f"output_blocks.{block}.1."
            block += 1
        if level < levels - 1:
            slot = 2 if "CrossAttn" in up_type else 1  # the upsampler follows the last resnet (and its attention)
            modules[f"up_blocks.{level}.upsamplers.0.conv."] = f"output_blocks.{block - 1}.{slot}.conv."
    return modules


def _rename_start(rest: str, names: Mapping[str, str]) -> str:
    for old, new in names.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


# ---- VAE ---------------------------------------------------------------------------------------------------
_VAE_ATTENTION_NAMES = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def vae_to_original(vae_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`first_stage_model.*` keys for a diffusers AutoencoderKL state dict (attention linears become 1x1 convs)."""
    up_levels = 1 + max((int(m.group(1)) for k in vae_state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))),
                        default=-1)
    out = {}
    for key, value in vae_state.items():
        new = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"decoder.up.{up_levels - 1 - int(m.group(1))}.block.{m.group(2)}.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{up_levels - 1 - int(m.group(1))}.upsample.", new)
        new = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                     lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", new)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        attention = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", new)
        if attention:
            new = f"{attention.group(1)}.mid.attn_1." + _rename_start(new[attention.end():], _VAE_ATTENTION_NAMES)
            if value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        out[VAE_PREFIX + new] = value
    return out


# ---- text encoders -----------------------------------------------------------------------------------------
_OPEN_CLIP_LAYER_NAMES = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.",
                          "mlp.fc2.": "mlp.c_proj.", "self_attn.out_proj.": "attn.out_proj."}
_OPEN_CLIP_TOP_NAMES = {"embeddings.token_embedding.weight": "token_embedding.weight",
                        "embeddings.position_embedding.weight": "positional_embedding",
                        "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def text_encoders_to_original(family: Family, states: list[Mapping[str, torch.Tensor]], *,
                              original: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The family's text encoders in the single-file layout. `original` (the base model's own file) supplies what
    diffusers' modules do not hold: the last OpenCLIP layer SD2 skips; without it that layer is written as an
    identity (all zeros: only its residual connections pass), which leaves the conditioning unchanged."""
    if len(states) != len(family.text_encoder_specs):
        raise ValueError(f"{family.label} has {len(family.text_encoder_specs)} text encoders, got {len(states)} states")
    out: dict[str, torch.Tensor] = {}
    for spec, state in zip(family.text_encoder_specs, states):
        flat = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
        if spec.layout == "clip":
            out.update({f"{spec.original_prefix}text_model.{k}": v for k, v in flat.items()})
        else:
            out.update(_open_clip(spec, flat, original or {}))
    return out


def _open_clip(spec: TextEncoderSpec, state: Mapping[str, torch.Tensor],
               original: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = spec.original_prefix
    out = {prefix + _OPEN_CLIP_TOP_NAMES[k]: v for k, v in state.items() if k in _OPEN_CLIP_TOP_NAMES}
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
        for key, value in state.items():
            if key.startswith(src) and not re.match(r"self_attn\.[qkv]_proj\.", key[len(src):]):
                out[dst + _rename_start(key[len(src):], _OPEN_CLIP_LAYER_NAMES)] = value
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    if spec.drops_last_layer:
        below, last = f"{prefix}transformer.resblocks.{layers - 1}.", f"{prefix}transformer.resblocks.{layers}."
        for key in [k for k in out if k.startswith(below)]:
            skipped = last + key[len(below):]
            out[skipped] = original[skipped] if skipped in original else torch.zeros_like(out[key])
        projection = prefix + "text_projection"
        embedding = state["embeddings.token_embedding.weight"]
        identity = torch.eye(embedding.shape[1], dtype=embedding.dtype)
        out[projection] = original[projection] if projection in original else identity
    return out


# ---- the whole model ---------------------------------------------------------------------------------------
def save_single_file(path: Path, base: "BaseModel", *, unet_state: Mapping[str, torch.Tensor] | None = None,
                     text_encoder_states: list[Mapping[str, torch.Tensor]] | None = None,
                     metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.float16,
                     overwrite: bool = False) -> Path:
    """Write `base` as one .safetensors file in the original layout, atomically, with the given UNet and text
    encoder weights in place of the base's own. An fp8 `dtype` stores matrices in fp8 and vectors in fp16."""
    path = Path(path)
    refuse_existing(path, overwrite)
    unet_state = unet_state if unet_state is not None else base.unet.state_dict()
    if text_encoder_states is None:
        text_encoder_states = [encoder.state_dict() for encoder in base.text_encoders]
    original = _original_tensors(base)
    state = unet_to_original(unet_state, base.unet.config)
    state.update(vae_to_original(base.vae.state_dict()))
    state.update(text_encoders_to_original(base.family, text_encoder_states, original=original))
    state = {key: _stored(value, dtype) for key, value in state.items()}
    if base.prediction_type == "v_prediction" and base.family.v_prediction_marker:
        state["v_pred"] = torch.tensor([])
        if base.zero_terminal_snr:
            state["ztsnr"] = torch.tensor([])
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=dict(metadata or {}))
    return path


def _original_tensors(base: "BaseModel") -> Mapping[str, torch.Tensor]:
    if base.single_file is None or not base.single_file.is_file():
        return {}
    return CheckpointFile(base.single_file)


def _stored(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not value.is_floating_point():
        return value.contiguous()
    if dtype in FP8_DTYPES and value.ndim < 2:
        dtype = torch.float16  # norms and biases lose too much in fp8
    return value.detach().to(device="cpu", dtype=dtype).contiguous()
