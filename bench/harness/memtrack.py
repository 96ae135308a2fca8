"""The memory instrument: the peak device memory of real training steps, counted without a GPU.

The model is built on the meta device (shapes and dtypes, no storage) and set up by the loop's own
`setup_method` (devices, LoRA or full fine-tune, gradient checkpointing, caches, memory levers) and optimizer;
then steps run through the method's own `compute_loss`, backward, optimizer step and `zero_grad`, while
`torch.distributed._tools.mem_tracker.MemTracker` counts every storage that is alive. What a meta device lacks, two
stand-ins give:

- `CudaAutocast` casts like CUDA's autocast (meta tensors have no autocast key): matrix products and convolutions
  in the low-precision dtype, normalisations, softmax and losses in fp32, as in ATen's CUDA autocast lists.
- Attention runs the flash-attention kernel's memory layout (inputs, output and a fp32 log-sum-exp per query saved,
  no attention matrix), what CUDA picks for these head sizes; the meta device would otherwise take the math path
  and count a full attention matrix per layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker
from torch.overrides import TorchFunctionMode

from trainers.config import Config
from trainers.optimizers import make_optimizer
from trainers.model_setup import setup_method
from trainers.models.families import PromptEmbeds

_LOW = {F.linear, F.conv2d, F.conv_transpose2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
        torch.bmm, torch.baddbmm, torch.addmm, torch.mm, torch.Tensor.bmm, torch.Tensor.baddbmm}
_FP32 = {F.group_norm, F.layer_norm, F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax, F.mse_loss,
         torch.Tensor.pow, torch.pow, torch.rsqrt, torch.exp, F.cosine_similarity, torch.norm}


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's casts, for tensors that have no autocast of their own (meta)."""

    def __init__(self, dtype: torch.dtype | None):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _flash_attention(*[_cast(a, self.dtype) for a in args],
                                    **{k: _cast(v, self.dtype) for k, v in kwargs.items()})
        target = self.dtype if func in _LOW else torch.float32 if func in _FP32 else None
        if target is not None and self.dtype is not None:
            args = tuple(_cast(a, target) for a in args)
            kwargs = {k: _cast(v, target) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _cast(value: Any, dtype: torch.dtype | None) -> Any:
    if dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype \
            and value.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return value.to(dtype)
    return value


def _flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    if attn_mask is not None:  # the flash kernel takes no mask: CUDA's memory-efficient kernel saves the same
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, True, dropout_p,
                                                                      is_causal, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                      scale=scale)[0]


class _Tracker(MemTracker):
    """MemTracker without its per-module accounting: only the device total is read here, and the per-module hooks
    cost ~50x in time and fail on frozen parameters (it hooks the gradient of every parameter)."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    def _pre_fw_hook(self, *args): pass

    def _post_fw_hook(self, *args): pass

    def _pre_bw_hook(self, *args): pass

    def _post_bw_hook(self, *args): pass

    def device_bytes(self, kind: str, device: str) -> int:
        snapshot = self.get_tracker_snapshot(kind)
        return int(next(stats["Total"] for dev, stats in snapshot.items() if torch.device(dev).type == device))

    def restart_peak(self) -> None:
        """The peak from now on (MemTracker keeps one peak per device since it was entered; it restarts it so on
        entry, the same two fields)."""
        self._peak_mem_snap = self.get_tracker_snapshot()
        self._peak_mem = {dev: snap["Total"] for dev, snap in self._peak_mem_snap.items()}


@dataclass
class Measured:
    peak_bytes: int
    trainable_params: int
    forward_bytes: int = 0
    """The last step's peak during the forward pass (the activations saved for backward at their most)."""
    backward_bytes: int = 0
    """The last step's peak during backward, the optimizer step and zero_grad (the gradients at their most)."""


def measure_training_peak(cfg: Config, base, *, device: str = "meta", steps: int = 2,
                          resolution: int | None = None) -> Measured:
    """Peak device bytes over `steps` steady training steps (latents and captions already cached, as after the first
    epoch) of `base` (built on `device`) with the config's method, batch size, precision and levers."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    method = setup_method(cfg, base, torch.device(device), dtype or torch.float32, static_pixels=True)
    optimizer = make_optimizer(cfg, method.parameter_groups())
    if device == "meta" and cfg.train.gradient_checkpointing:
        _recompute_under(base.unet, lambda: CudaAutocast(dtype))
    batch = _cached_batch(cfg, method, device, resolution or cfg.data.resolution)
    generator = torch.Generator().manual_seed(0)
    tracker = _Tracker()
    tracker.track_external(base.unet, base.vae, *base.text_encoders, optimizer)
    autocast = CudaAutocast(dtype) if device == "meta" else contextlib.nullcontext()
    phases = {}
    with tracker, autocast, _device_autocast(device, dtype):
        for _ in range(steps):
            phases = _step_phase_peaks(tracker, device, method, batch, generator, optimizer)
    peak = max(phases.values())  # the last step is the highest: the optimizer's states exist from the first step
    trainable = sum(p.numel() for g in method.parameter_groups() for p in g["params"])
    return Measured(peak, trainable, phases["forward"], phases["backward"])


def _step_phase_peaks(tracker: _Tracker, device: str, method, batch, generator, optimizer) -> dict[str, int]:
    tracker.restart_peak()
    loss, _ = method.compute_loss(batch, generator)
    forward = tracker.device_bytes("peak", device)
    tracker.restart_peak()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"forward": forward, "backward": tracker.device_bytes("peak", device)}


def _recompute_under(model: torch.nn.Module, context) -> None:
    """Checkpointed blocks recompute in the autograd engine's thread, outside the caller's function modes: run the
    recomputation under `context()` too (diffusers lets a model take its own checkpoint function)."""
    import torch.utils.checkpoint as checkpoint

    def run(function, *args, **kwargs):
        return checkpoint.checkpoint(function, *args, use_reentrant=False,
                                     context_fn=lambda: (contextlib.nullcontext(), context()), **kwargs)

    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = run


@contextlib.contextmanager
def _device_autocast(device: str, dtype: torch.dtype | None) -> Iterator[None]:
    if device == "meta" or dtype is None:
        yield
        return
    with torch.autocast(device, dtype=dtype):
        yield


def _cached_batch(cfg: Config, method, device: str, resolution: int) -> dict[str, Any]:
    """A batch whose latents and prompt embeddings sit in the preparer's caches, as they do after the first epoch
    (so the VAE and text encoders are not run: they cost no activations then)."""
    batch_size, base, prep = cfg.train.batch_size, method.base, method.prep
    latent_dtype = next(base.vae.parameters()).dtype
    side = resolution // 8
    channels = base.unet.config.in_channels
    captions = [f"caption {n}" for n in range(batch_size)]
    hidden = base.unet.config.cross_attention_dim
    for n, caption in enumerate(captions):
        prep._latents[("train", n, False)] = torch.zeros(channels, side, side, device=device, dtype=latent_dtype)
        pooled = (torch.zeros(1, base.text_encoders[-1].config.projection_dim, device=device, dtype=latent_dtype)
                  if base.family.name == "sdxl" else None)
        prep._embeds[caption] = PromptEmbeds(torch.zeros(1, 77, hidden, device=device, dtype=latent_dtype), pooled)
    prep.cache_latents = prep.cache_text = True
    size = torch.tensor([[resolution, resolution]] * batch_size)
    batch = {"item": list(range(batch_size)), "flipped": [False] * batch_size, "caption": captions,
             "pixels": None, "original_size": size, "crop_top_left": torch.zeros_like(size), "target_size": size}
    if cfg.dreambooth.enabled and cfg.dreambooth.prior_preservation:
        batch["prior"] = {**batch, "caption": captions}
        for n in range(batch_size):
            prep._latents[("prior", n, False)] = prep._latents[("train", n, False)]
    return batch
