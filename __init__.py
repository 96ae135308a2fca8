"""comfyui-finetune: fine-tune Stable Diffusion inside ComfyUI. Registers the nodes and serves web/."""

import importlib.util

WEB_DIRECTORY = "./web"

# Outside ComfyUI (the CLI, tests of trainers/) there is nothing to register.
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401
