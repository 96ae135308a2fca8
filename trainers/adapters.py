"""Trainable adapters on the UNet and the text encoders, injected with peft: LoRA, LoHa, LoKr and DoRA.

peft scales a LoRA as `W x + (lora_alpha / r) * B(A(x))`, starts `A` random (Kaiming-uniform) and `B` at zero:
the same scale and the same start as kohya's `lora_down`/`lora_up`, so its weights export to kohya's layout as they are.

LoHa and LoKr come from peft too, not from lycoris-lora: peft's layers live inside the UNet like its LoRA layers, so
accelerate, checkpoints, resume and gradient sync treat all three alike, while lycoris-lora hooks the forward of
modules from a network object outside the model. peft's LoHa and LoKr weights are LyCORIS's own (`hada_w1_a`...,
`lokr_w1`...), with the same alpha / rank scale, so the export writes them under LyCORIS's names as they are
(export/lora.py).

DoRA is peft's LoRA with `use_dora`: `W' = m * (W + dW) / ||W + dW||`, the norm per output row and treated as a
constant in backward (the DoRA paper's section 4.3), `m` (one value per output row) trained beside the LoRA. ComfyUI
and Forge read a `dora_scale` of one value per output row as that magnitude but divide by the base weight's row norm
`||W||`; the export converts (export/lora.py), so the file loads as exactly what was trained.
"""

from __future__ import annotations

import re

import torch
from peft import LoHaConfig, LoKrConfig, PeftConfig
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from peft.tuners.tuners_utils import cast_adapter_dtype

from .config import LoraConfig
from .errors import ConfigError

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
_PROJECTIONS = ("proj_in", "proj_out", "time_emb_proj")
_CONVOLUTIONS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")

UNET_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": _ATTENTION,
    "attention_ff": _ATTENTION + _FEED_FORWARD,
    "all_linear": _ATTENTION + _FEED_FORWARD + _PROJECTIONS,
    "all": _ATTENTION + _FEED_FORWARD + _PROJECTIONS + _CONVOLUTIONS,
}
"""Module-name endings adapted in the UNet, per `lora.targets`. Only "all" adapts convolutions (LoCon):
the others skip a listed module that is a Conv2d (SD1's 1x1 proj_in/proj_out)."""

_TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_ENCODER_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": _TEXT_ATTENTION,
    "attention_ff": _TEXT_ATTENTION + ("fc1", "fc2"),
    "all_linear": _TEXT_ATTENTION + ("fc1", "fc2"),
    "all": _TEXT_ATTENTION + ("fc1", "fc2"),
}


def add_unet_lora(unet: torch.nn.Module, cfg: LoraConfig, adapter_name: str = "default") -> None:
    """Inject a trainable LoRA into `unet` (fp32 even on a half-precision base) and freeze everything else.

    Spatial (k x k) convolutions get `conv_rank`/`conv_alpha`; 1x1 convolutions are linear maps and get `rank`/`alpha`,
    as in kohya's LoCon.
    """
    names = _target_names(unet, UNET_TARGETS[cfg.targets], with_conv=cfg.targets == "all")
    spatial = [re.escape(name) for name in names if _is_spatial_conv(unet.get_submodule(name))]
    config = adapter_config(cfg, cfg.rank, cfg.alpha, names, rank_pattern={name: cfg.conv_rank for name in spatial},
                            alpha_pattern={name: cfg.conv_alpha for name in spatial})
    _inject(unet, config, adapter_name)


def add_text_encoder_lora(text_encoder: torch.nn.Module, cfg: LoraConfig, adapter_name: str = "default") -> None:
    """Inject a trainable LoRA into a CLIP text encoder and freeze everything else.

    With `text_encoder_rank` set, alpha follows the rank so that alpha / rank (the adapter's scale) stays the UNet's.
    """
    rank = cfg.text_encoder_rank or cfg.rank
    names = _target_names(text_encoder, TEXT_ENCODER_TARGETS[cfg.targets], with_conv=False)
    config = adapter_config(cfg, rank, cfg.alpha * rank / cfg.rank, names)
    _inject(text_encoder, config, adapter_name)


def adapter_config(cfg: LoraConfig, rank: int, alpha: float, names: list[str], *, rank_pattern=None,
                   alpha_pattern=None) -> PeftConfig:
    """peft's config for `cfg.algorithm`, every kind starting as the identity (the base model unchanged)."""
    common = {"r": rank, "target_modules": names, "rank_pattern": rank_pattern or {},
              "alpha_pattern": alpha_pattern or {}}
    if cfg.algorithm == "loha":
        # use_effective_conv2d off: convolutions keep the plain (out, in*k*k) factors every LyCORIS loader reads.
        return LoHaConfig(alpha=alpha, use_effective_conv2d=False, init_weights=True, **common)
    if cfg.algorithm == "lokr":
        return LoKrConfig(alpha=alpha, decompose_factor=cfg.lokr_factor, decompose_both=False,
                          use_effective_conv2d=False, init_weights=True, **common)
    return PeftLoraConfig(lora_alpha=alpha, lora_dropout=cfg.dropout, init_lora_weights=True,
                          use_dora=cfg.algorithm == "dora", **common)


def lora_layers(module: torch.nn.Module, adapter_name: str = "default") -> dict[str, LoraLayer | LycorisLayer]:
    """The adapted layers of `module` (LoRA, LoHa, LoKr or DoRA) that carry `adapter_name`, by their module path."""
    return {name: layer for name, layer in module.named_modules() if _carries(layer, adapter_name)}


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every adapter weight in `module` (all adapters), each once, for the optimizer (peft lists a DoRA layer's
    `lora_magnitude_vector` twice in its `adapter_layer_names`)."""
    weights = [p for layer in module.modules() if isinstance(layer, (LoraLayer, LycorisLayer))
               for attribute in layer.adapter_layer_names for p in getattr(layer, attribute).parameters()]
    return list({id(p): p for p in weights}.values())


def lora_state(module: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights only (copies), keyed by peft's names without the adapter name."""
    if not lora_layers(module, adapter_name):
        return {}
    state = get_peft_model_state_dict(module, adapter_name=adapter_name)
    return {key: value.detach().clone() for key, value in state.items()}


def load_lora_state(module: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Put weights from `lora_state` back; a checkpoint made with other LoRA settings is refused by name."""
    expected = {key: tuple(value.shape) for key, value in lora_state(module, adapter_name).items()}
    given = {key: tuple(value.shape) for key, value in state.items()}
    differences = [f"{key} is missing" for key in sorted(set(expected) - set(given))]
    differences += [f"{key} is not in this run" for key in sorted(set(given) - set(expected))]
    differences += [f"{key} has shape {given[key]}, this run {expected[key]}"
                    for key in sorted(set(given) & set(expected)) if given[key] != expected[key]]
    if differences:
        raise ConfigError(
            f"the checkpoint's LoRA does not match this run's LoRA settings ({len(differences)} differences, "
            f"first: {differences[0]})",
            "resume with the rank, targets and text-encoder settings the checkpoint was made with, or start a new run",
            where="lora")
    set_peft_model_state_dict(module, state, adapter_name=adapter_name)


def _carries(layer: torch.nn.Module, adapter_name: str) -> bool:
    if isinstance(layer, LoraLayer):
        return adapter_name in layer.lora_A
    return isinstance(layer, LycorisLayer) and adapter_name in layer._available_adapters


def _target_names(module: torch.nn.Module, endings: tuple[str, ...], *, with_conv: bool) -> list[str]:
    kinds = (torch.nn.Linear, torch.nn.Conv2d) if with_conv else (torch.nn.Linear,)
    return [name for name, child in module.named_modules()
            if isinstance(child, kinds) and any(name == e or name.endswith("." + e) for e in endings)]


def _is_spatial_conv(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _inject(model: torch.nn.Module, config: PeftLoraConfig, adapter_name: str) -> None:
    # diffusers' and transformers' `add_adapter` both inject through peft, register the config on the model (so
    # their own LoRA loading, fusing and saving work afterwards) and leave only the adapter trainable.
    model.add_adapter(config, adapter_name=adapter_name)
    cast_adapter_dtype(model, adapter_name=adapter_name)
