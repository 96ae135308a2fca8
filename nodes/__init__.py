"""The pack's nodes. Each family lives in its own module; a family whose optional dependency is missing is
skipped with one log line, so ComfyUI always starts."""

from __future__ import annotations

import importlib
import logging

from comfy_api.v0_0_2 import ComfyExtension, io

log = logging.getLogger("comfyui-finetune")

# module name -> what it needs beyond ComfyUI (shown in the log line when it cannot load)
NODE_MODULES = {
    "dataset": "Pillow",
    "caption": "transformers",
    "train": "diffusers, peft, transformers, accelerate, safetensors",
    "apply": "safetensors",
    "controlnet": "",
    "train_more": "diffusers, peft, transformers, accelerate, safetensors",
}


def load_node_classes() -> list[type[io.ComfyNode]]:
    classes: list[type[io.ComfyNode]] = []
    disabled: dict[str, tuple[list[str], str]] = {}  # one log line per missing package, naming every family it stops
    for name, needs in NODE_MODULES.items():
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ImportError as exc:
            disabled.setdefault(str(exc), ([], needs))[0].append(name)
            continue
        classes.extend(module.NODES)
    for reason, (names, needs) in disabled.items():
        log.warning("comfyui-finetune: %s nodes disabled: %s (install %s: pip install -r requirements.txt)",
                    ", ".join(names), reason, needs or "the pack's requirements")
    return classes


class FinetuneExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return load_node_classes()


async def comfy_entrypoint() -> FinetuneExtension:
    # ComfyUI 0.3.75 never calls ComfyExtension.on_load, so the dashboard's routes are added here (once).
    from . import routes

    routes.register()
    return FinetuneExtension()
