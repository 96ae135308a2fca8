"""Turns dataset batches into what the UNet consumes, caching the frozen parts (VAE latents, text embeddings)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .diffusion import encode_latents
from .levers import encoders_on_device
from .models.families import PromptEmbeds
from .models.loading import BaseModel


class BatchPreparer:
    """VAE latents cached per (image, flip) when pixels never change between epochs; text embeddings cached per
    caption string while the text encoders are frozen (caption dropout and tag shuffling simply produce more keys)."""

    def __init__(self, base: BaseModel, *, cache_latents: bool, cache_text: bool, max_cached_captions: int = 8192):
        self.base = base
        self.cache_latents = cache_latents
        self.cache_text = cache_text
        self.max_cached_captions = max_cached_captions
        self._latents: dict[tuple[str, int, bool], torch.Tensor] = {}
        self._embeds: OrderedDict[str, PromptEmbeds] = OrderedDict()
        self.text_encoders = list(base.text_encoders)

    def latents(self, batch: dict[str, Any], *, namespace: str = "train") -> torch.Tensor:
        """`namespace` keeps instance and class (prior) images apart in the cache."""
        if not self.cache_latents:
            with encoders_on_device(self.base):
                return encode_latents(self.base.vae, batch["pixels"])
        keys = [(namespace, int(i), bool(f)) for i, f in zip(batch["item"], batch["flipped"])]
        missing = [n for n, key in enumerate(keys) if key not in self._latents]
        if missing:
            with encoders_on_device(self.base):
                fresh = encode_latents(self.base.vae, batch["pixels"][missing])
            for n, latent in zip(missing, fresh):
                self._latents[keys[n]] = latent
        device = next(self.base.unet.parameters()).device  # the VAE's may be parked in CPU memory
        return torch.stack([self._latents[key].to(device) for key in keys])

    def prompt_embeds(self, captions: list[str], *, grad: bool = False) -> PromptEmbeds:
        family, tokenizers = self.base.family, self.base.tokenizers
        if grad:
            return family.encode_prompts(self.text_encoders, tokenizers, list(captions))
        if not self.cache_text:
            with torch.no_grad(), encoders_on_device(self.base):
                return family.encode_prompts(self.text_encoders, tokenizers, list(captions))
        missing = list(dict.fromkeys(c for c in captions if c not in self._embeds))
        if missing:
            with torch.no_grad(), encoders_on_device(self.base):
                fresh = family.encode_prompts(self.text_encoders, tokenizers, missing)
            for n, caption in enumerate(missing):
                self._embeds[caption] = fresh[n : n + 1]
        for caption in captions:
            self._embeds.move_to_end(caption)
        while len(self._embeds) > self.max_cached_captions:
            self._embeds.popitem(last=False)
        return PromptEmbeds.cat([self._embeds[c] for c in captions])
