"""From a loaded base model to a method ready to train: devices, dtypes, the method's trainable parameters, gradient
checkpointing, the batch preparer (caches) and the memory levers. The loop and the memory instrument share it."""

from __future__ import annotations

import torch

from .batches import BatchPreparer
from .config import Config
from .levers import apply_levers
from .methods import Method, method_class
from .models.loading import BaseModel


def setup_method(cfg: Config, base: BaseModel, device: torch.device, weight_dtype: torch.dtype, *,
                 static_pixels: bool) -> Method:
    """The method on `device` with its trainable parameters made; `static_pixels`: the dataset's pixels never change
    between epochs (the VAE latents can be cached)."""
    vae_dtype = torch.float32 if weight_dtype == torch.float16 else weight_dtype  # fp16 VAEs overflow (black images)
    base.vae.to(device)
    if base.vae.dtype != vae_dtype:
        base.vae.to(dtype=vae_dtype)
    base.unet.to(device)
    for te in base.text_encoders:
        te.to(device)
    if device.type == "cuda":
        base.unet.to(memory_format=torch.channels_last)  # cuDNN's convolutions run NHWC: no layout copies each step
        torch.backends.cudnn.benchmark = True  # a few fixed shapes per run: measuring conv algorithms once pays
    method: Method = method_class(cfg.train.method)(cfg, base)
    method.setup()
    if cfg.train.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if method.trains_text_encoder:
            for te in base.text_encoders:
                te.gradient_checkpointing_enable()
    method.prep = BatchPreparer(base, cache_latents=cfg.train.cache_latents and static_pixels,
                                cache_text=cfg.train.cache_text_embeddings and not method.trains_text_encoder)
    apply_levers(cfg, method, device)
    return method
