"""Memory levers: each one trades a little speed for device memory, and each is a `train` setting.

- `offload_encoders`: the VAE and the text encoders live in CPU memory and visit the device only to encode (the
  first epoch, until latents and embeddings are cached) and to sample images.
- `fp8_base`: the frozen UNet's linear and convolution weights are stored in float8 (e4m3, one scale per output
  channel) and upcast layer by layer for compute; LoRA weights stay fp32.
- `offload_unet` (experimental until a GPU run proves it trains): the UNet's blocks live in CPU memory and each
  visits the device for its own forward and backward, by diffusers' group offloading.
- `fused_backward` (full fine-tunes): each parameter's optimizer step runs as soon as its gradient is complete, and
  the gradient is freed at once, so the gradients of the whole UNet never exist together.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .config import Config

FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8).max


def apply_levers(cfg: Config, method: Any, device: torch.device) -> None:
    """Turn on the levers the (resolved) config asks for, after the method has made its trainable parameters."""
    t = cfg.train
    if t.offload_encoders == "on" and not method.trains_text_encoder:
        park_encoders(method.base)
    if t.fp8_base == "on":
        store_frozen_weights_in_fp8(method.base.unet)
    if t.offload_unet:
        offload_unet_blocks(method.base.unet, device)


def offload_unet_blocks(unet: torch.nn.Module, device: torch.device) -> None:
    """diffusers' group offloading, one block per group: a hook moves each block's weights to `device` before its
    forward and back to CPU memory after; on CUDA the next block is copied on a side stream while one computes.
    The hooks move weights by assigning `param.data`, which autograd can see in backward (as with layerwise casting,
    see `_Fp8Layer`): the reason this stays experimental until a GPU run shows LoRA training with it."""
    unet.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                              num_blocks_per_group=1, use_stream=device.type == "cuda")


# ---- encoders off the device -----------------------------------------------------------------------------------
def park_encoders(base: Any) -> None:
    base.encoders_parked = True
    for module in (base.vae, *base.text_encoders):
        if next(module.parameters()).is_meta:  # the memory instrument's shape-only model: nothing to copy
            module.to_empty(device="cpu")
        else:
            module.to("cpu")


@contextlib.contextmanager
def encoders_on_device(base: Any) -> Iterator[None]:
    """The VAE and text encoders on the UNet's device for the block (a no-op unless they are parked)."""
    if not base.encoders_parked:
        yield
        return
    device = next(base.unet.parameters()).device
    modules = (base.vae, *base.text_encoders)
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---- frozen weights in fp8 ---------------------------------------------------------------------------------------
class _Fp8Layer(torch.autograd.Function):
    """A frozen linear or convolution whose weight is stored in fp8.

    Why not diffusers' `enable_layerwise_casting`: its hooks upcast the weight in place before the forward and cast
    it back to fp8 after, so autograd's saved weight is fp8 by the time backward runs and the backward fails
    ("expected scalar type BFloat16 but found Float8_e4m3fn"). Here autograd saves nothing but the fp8 weight (the
    input is not needed: the weight gets no gradient), and backward upcasts it again for the input's gradient.
    """

    @staticmethod
    def forward(ctx, x, weight8, scale, bias, conv: tuple | None):
        weight = _upcast(weight8, scale, _compute_dtype(x))
        ctx.save_for_backward(weight8, scale)
        ctx.conv, ctx.input_shape, ctx.input_dtype = conv, x.shape, x.dtype
        x = x.to(weight.dtype)
        bias = None if bias is None else bias.to(weight.dtype)
        return F.linear(x, weight, bias) if conv is None else F.conv2d(x, weight, bias, *conv)

    @staticmethod
    def backward(ctx, grad):
        weight8, scale = ctx.saved_tensors
        weight = _upcast(weight8, scale, grad.dtype)
        if ctx.conv is None:
            grad_x = grad @ weight
        else:
            stride, padding, dilation, groups = ctx.conv
            grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad, stride, padding, dilation, groups)
        return grad_x.to(ctx.input_dtype), None, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    if kind in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _upcast(weight8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight8.to(dtype) * scale.to(dtype).view(-1, *([1] * (weight8.dim() - 1)))


def _fp8_forward(module: torch.nn.Module):
    conv = None
    if isinstance(module, torch.nn.Conv2d):
        conv = (module.stride, module.padding, module.dilation, module.groups)

    def forward(x):
        return _Fp8Layer.apply(x, module.weight, module.weight_scale, module.bias, conv)

    return forward


def store_frozen_weights_in_fp8(model: torch.nn.Module) -> int:
    """Every frozen Linear/Conv2d (string padding modes excepted) of `model` keeps its weight in fp8 from now on.
    Returns the number of layers converted. The weight becomes a buffer under the same name (it is not trained), so
    `model.parameters()` still starts with a weight of the compute dtype."""
    converted = 0
    for module in model.modules():
        kind_ok = isinstance(module, torch.nn.Linear) or (
            isinstance(module, torch.nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str))
        weight = getattr(module, "weight", None)
        if not kind_ok or not isinstance(weight, torch.nn.Parameter) or weight.requires_grad:
            continue
        with torch.no_grad():
            rows = weight.detach().float().flatten(1)
            scale = (rows.abs().amax(dim=1) / _FP8_MAX).clamp(min=1e-12)
            weight8 = (rows / scale[:, None]).to(FP8).view_as(weight)
        del module.weight
        module.register_buffer("weight", weight8)
        module.register_buffer("weight_scale", scale.to(weight.dtype))
        module.forward = _fp8_forward(module)
        converted += 1
    return converted


# ---- optimizer in backward ----------------------------------------------------------------------------------------
class FusedBackwardOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by a post-accumulate-grad hook the moment that parameter's gradient is
    complete; the gradient is then freed. The loop's `step()` and `zero_grad()` become no-ops, and its state dict is
    that of the per-parameter optimizers (for resumable checkpoints). Gradient clipping over all parameters is not
    possible this way (no moment has all gradients): the config check refuses it with this lever."""

    def __init__(self, groups: list[dict[str, Any]], make: Any):
        self._inner: list[torch.optim.Optimizer] = []
        self._hooks = []
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for param in group["params"]:
                inner = make([{"params": [param], **options}])
                self._inner.append(inner)
                self._hooks.append(param.register_post_accumulate_grad_hook(self._step_one(inner)))
        super().__init__([p for g in groups for p in g["params"]], {})
        self.param_groups = [g for inner in self._inner for g in inner.param_groups]

    @staticmethod
    def _step_one(inner: torch.optim.Optimizer):
        def hook(param: torch.Tensor) -> None:
            inner.step()
            inner.zero_grad(set_to_none=True)

        return hook

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"inner": [inner.state_dict() for inner in self._inner]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for inner, state in zip(self._inner, state_dict["inner"], strict=True):
            inner.load_state_dict(state)
