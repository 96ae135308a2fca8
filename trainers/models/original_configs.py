"""diffusers configs read off the tensor shapes of a single file in the original layout.

The shipped config of the family supplies what shapes cannot tell (activation, norm groups, scaling factor,
sample size); the shapes decide the rest, so fine-tunes with a trimmed UNet (KOALA, Vega, miniature test models)
load as well as the full-size ones. Attention head counts follow the families' conventions: 8 heads in SD1.x's
UNet, 64-wide heads in SD2.x/SDXL's UNet and in every CLIP text encoder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import ModelError
from .families import UNET_PREFIX, Family, TextEncoderSpec, key_shape

VAE_PREFIX = "first_stage_model."
CLIP_HEAD_WIDTH = 64


def _indices(keys: list[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) at the start of `keys`."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in keys if (m := regex.match(key))})


def _unsupported(where: str, what: str) -> ModelError:
    return ModelError(f"the UNet has a layout this trainer cannot convert ({what})",
                      "use a standard SD1.x, SD2.x or SDXL checkpoint, or a diffusers folder of this model", where=where)


# ---- UNet --------------------------------------------------------------------------------------------------
def unet_config_from_original(state: Mapping[str, Any], family: Family, base: Mapping[str, Any], *,
                              where: str) -> dict[str, Any]:
    keys = [k[len(UNET_PREFIX):] for k in state if k.startswith(UNET_PREFIX)]

    def shape(key: str) -> tuple[int, ...]:
        return key_shape(state, UNET_PREFIX + key)

    def depth(block: str) -> int:
        return len(_indices(keys, re.escape(block) + r"\.transformer_blocks\.(\d+)\."))

    levels: list[list[tuple[int, int]]] = [[]]  # per level: (channels, transformer depth) of each resnet
    for n in _indices(keys, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{n}.0.op.weight" in keys:
            levels.append([])
        else:
            levels[-1].append((shape(f"input_blocks.{n}.0.out_layers.3.weight")[0], depth(f"input_blocks.{n}.1")))
    layers = {len(level) for level in levels}
    if len(layers) != 1 or not levels[0]:
        raise _unsupported(where, f"{sorted(layers)} resnets per level")
    layers_per_block = layers.pop()
    channels = [level[0][0] for level in levels]
    down_depths = [[d for _, d in level] for level in levels]
    outputs = _indices(keys, r"output_blocks\.(\d+)\.")
    up_depths = [[depth(f"output_blocks.{n}.1") for n in outputs[i:i + layers_per_block + 1]]
                 for i in range(0, len(outputs), layers_per_block + 1)]
    if len(up_depths) != len(levels):
        raise _unsupported(where, f"{len(outputs)} output blocks for {len(levels)} levels")

    mid_depth = depth("middle_block.1") if "middle_block.1.proj_in.weight" in keys else None
    if mid_depth is None and any(k.startswith("middle_block.") for k in keys):
        raise _unsupported(where, "a middle block without attention")
    # diffusers gives the middle block the depth of the last level (which may itself have no attention)
    transformer_layers = [_one_or_list(d) or 1 for d in down_depths]
    if mid_depth is not None and not any(down_depths[-1]):
        transformer_layers[-1] = mid_depth
    elif mid_depth is not None and transformer_layers[-1] != mid_depth:
        raise _unsupported(where, f"a middle block of depth {mid_depth} after a level of depth {transformer_layers[-1]}")
    mirrored = [[_one_or_list(d) or 1] * (layers_per_block + 1) for d in reversed(down_depths)]

    proj_in = next(k for k in keys if k.endswith("proj_in.weight"))
    cross = next(k for k in keys if k.endswith("attn2.to_k.weight"))
    config = dict(base)
    config.update(
        in_channels=shape("input_blocks.0.0.weight")[1], out_channels=shape("out.2.weight")[0],
        block_out_channels=channels, layers_per_block=layers_per_block,
        down_block_types=["CrossAttnDownBlock2D" if any(d) else "DownBlock2D" for d in down_depths],
        up_block_types=["CrossAttnUpBlock2D" if any(d) else "UpBlock2D" for d in up_depths],
        mid_block_type=None if mid_depth is None else "UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=_one_or_list(transformer_layers),
        cross_attention_dim=shape(cross)[1], use_linear_projection=len(shape(proj_in)) == 2,
        attention_head_dim=_one_or_list([family.unet_attention_heads(c) for c in channels]))
    if [[d or 1 for d in level] for level in up_depths] != mirrored:
        config["reverse_transformer_layers_per_block"] = [[d or 1 for d in level] for level in up_depths]
    if "label_emb.0.0.weight" in keys:
        config["projection_class_embeddings_input_dim"] = shape("label_emb.0.0.weight")[1]
    return config


def _one_or_list(values: list[int]) -> Any:
    """A single value when all are equal (0 counts as "any": a block without attention), else the list."""
    if any(isinstance(v, list) for v in values):
        return list(values)
    distinct = set(values) - {0}
    if len(distinct) <= 1:
        return distinct.pop() if distinct else 0
    return list(values)


# ---- VAE ---------------------------------------------------------------------------------------------------
def vae_config_from_original(state: Mapping[str, Any], base: Mapping[str, Any], *, prefix: str = VAE_PREFIX,
                             where: str) -> dict[str, Any]:
    keys = [k[len(prefix):] for k in state if k.startswith(prefix)]
    if "encoder.conv_in.weight" not in keys:
        raise ModelError("the file has no VAE (first_stage_model.*)",
                         "use a full checkpoint, or name a separate VAE in model.vae", where=where)

    def shape(key: str) -> tuple[int, ...]:
        return key_shape(state, prefix + key)

    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    config = dict(base)
    config.update(
        in_channels=shape("encoder.conv_in.weight")[1], out_channels=shape("decoder.conv_out.weight")[0],
        latent_channels=shape("decoder.conv_in.weight")[1],
        block_out_channels=[shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels],
        layers_per_block=len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")),
        down_block_types=["DownEncoderBlock2D"] * len(levels), up_block_types=["UpDecoderBlock2D"] * len(levels),
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in keys)
    return config


# ---- text encoders -----------------------------------------------------------------------------------------
def text_encoder_config_from_original(state: Mapping[str, Any], spec: TextEncoderSpec,
                                      base: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """`base` (the shipped CLIPTextConfig as a dict) with the sizes found in the file."""
    embedding = next((k for k in spec.token_embedding_keys() if k in state), None)
    if embedding is None:
        raise ModelError(f"the file has no text encoder under {spec.original_prefix}",
                         "use a full checkpoint that includes its text encoder(s)", where=where)
    root = embedding[: embedding.index("token_embedding")].removesuffix("embeddings.")
    keys = [k[len(root):] for k in state if k.startswith(root)]
    vocab, hidden = key_shape(state, embedding)
    config = dict(base)
    if spec.layout == "open_clip":
        layers = len(_indices(keys, r"transformer\.resblocks\.(\d+)\.")) - int(spec.drops_last_layer)
        config.update(intermediate_size=key_shape(state, root + "transformer.resblocks.0.mlp.c_fc.weight")[0],
                      max_position_embeddings=key_shape(state, root + "positional_embedding")[0])
        if root + "text_projection" in state and not spec.drops_last_layer:
            config["projection_dim"] = key_shape(state, root + "text_projection")[1]
    else:
        layers = len(_indices(keys, r"encoder\.layers\.(\d+)\."))
        config.update(intermediate_size=key_shape(state, root + "encoder.layers.0.mlp.fc1.weight")[0],
                      max_position_embeddings=key_shape(state, root + "embeddings.position_embedding.weight")[0])
    config.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=max(1, hidden // CLIP_HEAD_WIDTH))
    return config
