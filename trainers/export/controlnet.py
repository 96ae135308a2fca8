"""A trained ControlNet as one .safetensors file in the original (ControlNet 1.1) layout.

ComfyUI also reads diffusers-layout ControlNets, but only for the UNet shapes it has a table entry for (full-size
SD1.5, SDXL...); the original layout (`input_blocks`, `zero_convs`, `input_hint_block`, `middle_block_out`) is
recognised from the tensors themselves, for any UNet shape, by ComfyUI and by AUTOMATIC1111's ControlNet extension.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import ModelError
from ..io import atomic_path, refuse_existing
from ..models.families import UNET_PREFIX
from .checkpoint import unet_to_original

_CONTROL_PREFIXES = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


def controlnet_to_original(state: Mapping[str, torch.Tensor],
                           unet_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Original-layout keys for a diffusers ControlNetModel state dict; `unet_config` is the UNet it was made from
    (the shared encoder half is numbered as in that UNet)."""
    shared = {k: v for k, v in state.items() if not k.startswith(_CONTROL_PREFIXES)}
    out = {k[len(UNET_PREFIX):]: v for k, v in unet_to_original(shared, unet_config).items()}
    hint_blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("controlnet_cond_embedding.blocks."))
    for key, value in state.items():
        if not key.startswith(_CONTROL_PREFIXES):
            continue
        parts = key.split(".")
        if parts[0] == "controlnet_mid_block":
            out["middle_block_out.0." + parts[-1]] = value
        elif parts[0] == "controlnet_down_blocks":
            out[f"zero_convs.{parts[1]}.0.{parts[-1]}"] = value
        elif parts[1] == "conv_in":  # the hint encoder: convs at even indices, SiLUs between them
            out[f"input_hint_block.0.{parts[-1]}"] = value
        elif parts[1] == "blocks":
            out[f"input_hint_block.{2 * (int(parts[2]) + 1)}.{parts[-1]}"] = value
        elif parts[1] == "conv_out":
            out[f"input_hint_block.{2 * (hint_blocks + 1)}.{parts[-1]}"] = value
        else:
            raise ModelError(f"the ControlNet has a part the single-file layout has no place for ({key})",
                             "this is a bug: please report it", where="controlnet")
    return out


def save_controlnet(path: Path, state: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any],
                    metadata: dict[str, str], *, overwrite: bool = False, dtype: torch.dtype = torch.float16) -> Path:
    """Write the ControlNet atomically, in `dtype` (fp16 halves the file; ControlNet weights are well inside its
    range)."""
    path = Path(path)
    refuse_existing(path, overwrite)
    original = controlnet_to_original(state, unet_config)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in original.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
