"""comfyui-finetune: fine-tune Stable Diffusion inside ComfyUI. Registers the nodes and serves web/."""

from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = "./web"
