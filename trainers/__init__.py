"""comfyui-finetune's trainer: a small library and CLI for fine-tuning Stable Diffusion (SD1.x, SD2.x, SDXL).

It imports nothing from ComfyUI; the nodes in `nodes/` drive it, and so does `python -m trainers`.
"""

__version__ = "0.1.0"
