"""One module per training method; `METHODS` maps `train.method` to its class."""

from __future__ import annotations

import importlib

from .base import Method, RunSummary

_METHOD_MODULES = {
    "lora": ("lora", "LoraMethod"),
    "full": ("full", "FullMethod"),
    "textual_inversion": ("textual_inversion", "TextualInversionMethod"),
    "controlnet": ("controlnet", "ControlNetMethod"),
    "ddpo": ("ddpo", "DDPOMethod"),
}


def method_class(name: str) -> type[Method]:
    from ..errors import ConfigError

    if name not in _METHOD_MODULES:
        raise ConfigError(f"method {name!r} is not available", f"use one of {', '.join(_METHOD_MODULES)}",
                          where="train.method")
    module, cls = _METHOD_MODULES[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


__all__ = ["Method", "RunSummary", "method_class"]
