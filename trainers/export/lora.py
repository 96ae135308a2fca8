"""LoRA files: kohya's key layout (what ComfyUI, AUTOMATIC1111 and Forge load), diffusers' layout, and reading back.

kohya layout: `lora_unet_<diffusers module path, "." -> "_">` and `lora_te_` / `lora_te1_` / `lora_te2_` +
`text_model_encoder_layers_<i>_<module>`, each with `.lora_down.weight`, `.lora_up.weight` and a scalar `.alpha`;
a convolution's down is a k x k conv and its up a 1x1 conv (LoCon). LoHa and LoKr modules carry LyCORIS's
`.hada_w1_a`... / `.lokr_w1`... weights instead of down/up, under the same module names; a DoRA module adds
`.dora_scale` beside down/up (see `_dora_scale`). ComfyUI maps these names through
`comfy.lora.model_lora_keys_unet` / `model_lora_keys_clip`. diffusers' own `convert_state_dict_to_kohya` is not used:
it writes alpha = rank and names SD1's text encoder `lora_te1`.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..io import atomic_path, refuse_existing
from ..models.families import FAMILIES
from ..runfolder import family_from_metadata

UNET_PREFIX = "lora_unet"


def kohya_lora_state(unet: torch.nn.Module | None = None, text_encoders: list | tuple = (), *,
                     te_prefixes: tuple[str, ...], dtype: torch.dtype = torch.float16,
                     adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapters of `unet` and `text_encoders` under kohya's names; `te_prefixes` pairs with `text_encoders`
    (("lora_te",) for SD1/SD2, ("lora_te1", "lora_te2") for SDXL). Modules without the adapter add nothing."""
    from ..adapters import lora_layers  # peft: only needed to write, not to read, a LoRA

    if len(text_encoders) > len(te_prefixes):
        raise ValueError(f"{len(text_encoders)} text encoders but only the prefixes {te_prefixes}")
    state: dict[str, torch.Tensor] = {}
    if unet is not None:
        for path, layer in lora_layers(unet, adapter_name).items():
            _put_layer(state, f"{UNET_PREFIX}_{_flat(path)}", layer, adapter_name, dtype)
    for prefix, text_encoder in zip(te_prefixes, text_encoders):
        for path, layer in lora_layers(text_encoder, adapter_name).items():
            # transformers 5 dropped `text_model.` from CLIPTextModel's module paths (not from ...WithProjection's);
            # kohya names always carry it.
            if not path.startswith("text_model."):
                path = "text_model." + path
            _put_layer(state, f"{prefix}_{_flat(path)}", layer, adapter_name, dtype)
    return state


def save_lora(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str], *, overwrite: bool = False) -> Path:
    """Write `state` with `metadata` as one .safetensors file, atomically; an existing file is kept unless `overwrite`."""
    path = Path(path)
    refuse_existing(path, overwrite)
    not_text = sorted(key for key, value in metadata.items() if not isinstance(value, str))
    if not_text:
        raise TypeError(f"safetensors metadata values must be strings: {', '.join(not_text)}")
    with atomic_path(path) as tmp:
        save_file({key: value.contiguous() for key, value in state.items()}, str(tmp), metadata=metadata)
    return path


def save_peft_lora(folder: Path, unet: torch.nn.Module | None, text_encoders: list | tuple = (), *,
                   adapter_name: str = "default", overwrite: bool = False) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` in diffusers' layout, with each adapter's peft config, so that
    `pipeline.load_lora_weights(folder)` restores the adapters exactly. Returns `folder`."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
    from peft import get_peft_model_state_dict

    from ..adapters import lora_layers

    folder = Path(folder)
    target = folder / LORA_WEIGHT_NAME_SAFE
    refuse_existing(target, overwrite)
    names = ("unet", "text_encoder", "text_encoder_2")
    kwargs = {}
    for name, module in zip(names, (unet, *text_encoders)):
        if module is not None and lora_layers(module, adapter_name):
            kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(module, adapter_name=adapter_name)
            kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config[adapter_name].to_dict()
    if not kwargs:
        raise ValueError(f"no adapter named {adapter_name!r} to save")
    loader = StableDiffusionXLLoraLoaderMixin if len(text_encoders) == 2 else StableDiffusionLoraLoaderMixin
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".saving-") as tmp:
        loader.save_lora_weights(tmp, safe_serialization=True, **kwargs)
        os.replace(Path(tmp) / LORA_WEIGHT_NAME_SAFE, target)
    return folder


ALGORITHM_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}


def lora_algorithm(state: dict[str, torch.Tensor]) -> str:
    """"lora", "loha", "lokr" or "dora", from the weights' names (a file from any trainer may mix them; the first
    LoHa or LoKr weight tells, else a `dora_scale`)."""
    for key in state:
        if ".hada_" in key:
            return "loha"
        if ".lokr_" in key:
            return "lokr"
    return "dora" if any(key.endswith(".dora_scale") for key in state) else "lora"


def lora_family(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> str | None:
    """"sd1", "sd2" or "sdxl": what the metadata says, else what the keys and shapes show; None if neither tells."""
    return family_from_metadata(metadata) or _family_from_keys(state)


# ---- helpers ---------------------------------------------------------------------------------------------
def _flat(module_path: str) -> str:
    return module_path.replace(".", "_")


def _put_layer(state: dict[str, torch.Tensor], key: str, layer, adapter_name: str, dtype: torch.dtype) -> None:
    if hasattr(layer, "lora_A"):
        weights = {"lora_down.weight": layer.lora_A[adapter_name].weight, "lora_up.weight": layer.lora_B[adapter_name].weight}
        alpha = layer.lora_alpha[adapter_name]
    else:
        weights, alpha = _lycoris_weights(layer, adapter_name), layer.alpha[adapter_name]
    for name, value in weights.items():
        state[f"{key}.{name}"] = value.detach().to(dtype).contiguous()
    state[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    if getattr(layer, "use_dora", {}).get(adapter_name):
        # fp32 whatever `dtype` is: one value scales a whole row, and fp16 would move every weight by up to 5e-4
        state[f"{key}.dora_scale"] = _dora_scale(layer, adapter_name)


def _dora_scale(layer, adapter_name: str) -> torch.Tensor:
    """The `dora_scale` that makes ComfyUI's loader compute peft's DoRA weight exactly (at strength 1).

    peft: `W' = m * (W + dW) / ||W + dW||`, norms per output row. ComfyUI's `weight_decompose`
    (comfy/weight_adapter/base.py, 0.3.75 to 0.33), given a `dora_scale` with one value per output row, computes
    `W' = (W + dW) * dora_scale / ||W||` with the base weight's norm; `dora_scale = m * ||W|| / ||W + dW||` makes
    the two equal. A strength s != 1 gives `W + s * (W' - W)` there: a straight blend towards the trained weight
    (not DoRA with a scaled update). The shape (out, 1, ...) is the one ComfyUI broadcasts against the weight."""
    base = layer.get_base_layer().weight.detach().float()
    merged = base + layer.get_delta_weight(adapter_name).detach().float()
    magnitude = layer.lora_magnitude_vector[adapter_name].weight.detach().float().flatten()
    scale = magnitude * _row_norms(base) / _row_norms(merged)
    return scale.reshape(-1, *[1] * (base.dim() - 1)).contiguous()


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.flatten(1).norm(dim=1)


def _lycoris_weights(layer, adapter_name: str) -> dict[str, torch.Tensor]:
    """A peft LoHa/LoKr layer's weights under LyCORIS's names (peft uses the same names and shapes). Loaders scale a
    LoKr by alpha / rank only when one factor is low-rank; peft scales always, so a LoKr of two full factors carries
    peft's scale in its first factor."""
    weights = {name: getattr(layer, name)[adapter_name] for name in layer.adapter_layer_names
               if adapter_name in getattr(layer, name)}
    if "lokr_w1" in weights and "lokr_w2" in weights:
        weights["lokr_w1"] = weights["lokr_w1"] * layer.scaling[adapter_name]
    return weights


# A text encoder's hidden width (SDXL's first encoder is SD1's CLIP-L, so only its second one tells).
_TEXT_WIDTH_FAMILIES = {768: "sd1", 1024: "sd2", 1280: "sdxl"}
_DOWN = r"\.(lora_down|lora_A|lora\.down|lora_linear_layer\.down)\.weight$"


def _family_from_keys(state: dict[str, torch.Tensor]) -> str | None:
    if any(key.startswith(("lora_te2_", "text_encoder_2.")) for key in state):
        return "sdxl"
    for key, value in state.items():
        if re.search(r"attn2[._](processor[._])?to_k" + _DOWN, key) and value.ndim == 2:
            # the width of the text features the UNet's cross-attention reads
            return next((name for name, family in FAMILIES.items() if family.context_dim == value.shape[1]), None)
    for key, value in state.items():
        if re.search(r"self_attn[._]q_proj" + _DOWN, key) and value.ndim == 2:
            return _TEXT_WIDTH_FAMILIES.get(value.shape[1])
    return None
