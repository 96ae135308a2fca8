"""The drawing base: a tiny SD1.5 checkpoint that draws the synthetic world of `scripts/drawing_world.py`, so that
what a fine-tune learns shows in the pictures ComfyUI generates with it (random weights draw noise).

    python scripts/drawing_base.py --comfy DIR     # build (or reuse) and link into DIR/models/checkpoints/

How it is made:
- the VAE is built by hand (`hand_built_vae`), not trained: every layer passes the picture's three colour channels
  through unchanged, so decode(encode(x)) == x for the world's pure colours on its 8-pixel grid. A random VAE
  would turn any latent into noise, and training the full-size VAE ComfyUI requires costs far more than this base
  is allowed to cost;
- the text encoder is the random full-size CLIP-L ComfyUI requires: different prompts still give different
  embeddings, which is all the conditioning needs;
- the UNet is the smallest that ComfyUI still detects as SD1.5 (one level of 320 channels, 26 M parameters),
  trained from random weights by the pack's own full fine-tune (`python -m trainers train`) on every scene of
  the world but the subject (`drawing_world.base_scenes`).

The result is cached outside the clone, in `$COMFYUI_FINETUNE_CACHE`, else `$XDG_CACHE_HOME/comfyui-finetune`,
else `~/.cache/comfyui-finetune`, in a folder keyed by a hash of the recipe (its numbers, this file, the training
pictures and captions, and torch's version): a machine builds it once. `build_report.json` beside it says what
the build cost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from scripts import drawing_world as world  # noqa: E402
from scripts import tiny_models  # noqa: E402

COMFY_NAME = "drawing-base-sd15.safetensors"
RECIPE = {
    "format": 1,
    # one level: ComfyUI detects SD1.5 by model_channels 320 and context_dim 768, whatever the depth
    "unet": {"block_out_channels": [320], "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D"]},
    "latent_scale": 5.0,
    "train": {"steps": 600, "batch_size": 16, "learning_rate": 5e-4, "seed": 0},
}
LATENT_GROUPS = 32
"""GroupNorm groups of SD's VAE: each colour channel gets whole groups of its own (see `_layout`)."""


def cache_root() -> Path:
    if os.environ.get("COMFYUI_FINETUNE_CACHE"):
        return Path(os.environ["COMFYUI_FINETUNE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "comfyui-finetune"


def recipe_key() -> str:
    """A hash of what makes the base: the recipe's numbers, this file, the training set (captions and pixels) and
    torch's version. Changes to the metrics in drawing_world.py keep the cached base."""
    digest = hashlib.sha256(json.dumps({**RECIPE, "torch": torch.__version__}, sort_keys=True).encode())
    digest.update(Path(__file__).read_bytes())
    for scene in world.base_scenes():
        digest.update(scene.caption.encode())
        digest.update(scene.render().tobytes())
    return digest.hexdigest()[:16]


def drawing_base() -> Path:
    """The base's checkpoint file, built on first use (minutes on a CPU) and reused after."""
    params = {"recipe": recipe_key()}
    return tiny_models.cached("drawing-base", params, _build, root=cache_root()) / COMFY_NAME


def install_into(comfyui_dir: Path) -> Path:
    return tiny_models.link(drawing_base(), Path(comfyui_dir) / "models" / "checkpoints" / COMFY_NAME)


# ---- the hand-built VAE ------------------------------------------------------------------------------------
def _layout(channels: int) -> torch.Tensor:
    """How a feature map of `channels` carries the colours: (channels x 3), colour c in the c-th run of whole
    GroupNorm groups as +s, -s, +s, ... Each group then has mean 0 and the colour's own spread, so the norms
    before the last activations keep the sign of every colour, and silu(n) - silu(-n) = n undoes the activation."""
    group = channels // LATENT_GROUPS
    layout = torch.zeros(channels, 3)
    for colour in range(3):
        for i in range(group):
            layout[colour * group + i, colour] = 1.0 if i % 2 == 0 else -1.0
    return layout


def _remap(out_channels: int, in_channels: int) -> torch.Tensor:
    return _layout(out_channels) @ _layout(in_channels).T / (in_channels // LATENT_GROUPS)


@torch.no_grad()
def hand_built_vae(vae: torch.nn.Module, latent_scale: float) -> None:
    """Set SD's VAE (diffusers' AutoencoderKL) to carry the colours straight through: every resnet and attention
    adds nothing (their last layer is zero), shortcuts and resamplers copy, the encoder averages 2 x 2 pixels per
    halving and the decoder repeats them. Latent channels 0-2 are the colours (+-latent_scale), channel 3 is 0."""
    for parameter in vae.parameters():
        parameter.zero_()
    for module in vae.modules():
        kind = module.__class__.__name__
        if isinstance(module, torch.nn.GroupNorm):
            module.weight.fill_(1.0)
        elif kind == "ResnetBlock2D" and module.conv_shortcut is not None:
            shortcut = module.conv_shortcut
            shortcut.weight[:, :, 0, 0] = _remap(shortcut.out_channels, shortcut.in_channels)
        elif kind == "Downsample2D":  # stride 2 over a 3 x 3 window padded right/bottom: average the top-left 2 x 2
            module.conv.weight[:, :, :2, :2] = torch.eye(module.conv.out_channels)[:, :, None, None] / 4
        elif kind == "Upsample2D":
            module.conv.weight[:, :, 1, 1] = torch.eye(module.conv.out_channels)
    encoder, decoder = vae.encoder, vae.decoder
    encoder.conv_in.weight[:, :, 1, 1] = _layout(encoder.conv_in.out_channels)
    _read_colours(encoder.conv_out, scale=latent_scale)
    encoder.conv_out.bias[4:] = -30.0  # log-variance at its floor: encoding is deterministic
    vae.quant_conv.weight[:, :, 0, 0] = torch.eye(vae.quant_conv.out_channels)
    vae.post_quant_conv.weight[:, :, 0, 0] = torch.eye(vae.post_quant_conv.out_channels)
    decoder.conv_in.weight[:, :3, 1, 1] = _layout(decoder.conv_in.out_channels) / latent_scale
    _read_colours(decoder.conv_out, scale=1.0)


def _read_colours(conv: torch.nn.Conv2d, *, scale: float) -> None:
    """The last convolution after norm + SiLU: each +-pair gives silu(n) - silu(-n) = n; a group has group/2 pairs."""
    group = conv.in_channels // LATENT_GROUPS
    conv.weight[:3, :, 1, 1] = _layout(conv.in_channels).T * (2 * scale / group)


# ---- building ----------------------------------------------------------------------------------------------
def _build(folder: Path) -> None:
    started = time.monotonic()
    start = folder / "start.safetensors"
    _write_start(start)
    images = _write_world(folder / "world")
    config = _write_config(folder, start, images)
    subprocess.run([sys.executable, "-m", "trainers", "train", str(config)], cwd=REPO, check=True)
    for scratch in (start, folder / "runs"):
        _remove(scratch)
    report = {"seconds": round(time.monotonic() - started), "recipe": RECIPE, "scenes": len(world.base_scenes()),
              "cpu_count": os.cpu_count(), "torch": torch.__version__}
    (folder / "build_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _write_start(path: Path) -> None:
    from trainers.export.checkpoint import save_single_file

    base = tiny_models.random_model("sd1", unet=RECIPE["unet"], text={}, vae={})
    hand_built_vae(base.vae, RECIPE["latent_scale"])
    save_single_file(path, base, dtype=torch.float32, metadata={"modelspec.title": "drawing base (untrained)"})


def _write_world(folder: Path) -> Path:
    folder.mkdir()
    for index, scene in enumerate(world.base_scenes()):
        scene.render().save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(scene.caption, encoding="utf-8")
    return folder


def _write_config(folder: Path, start: Path, images: Path) -> Path:
    train = RECIPE["train"]
    config = {
        "model": {"base": str(start)},
        "data": {"folder": str(images), "resolution": world.SIZE, "buckets": False, "bucket_step": world.SIZE,
                 "caption_dropout": 0.1},
        "train": {"method": "full", "steps": train["steps"], "batch_size": train["batch_size"],
                  "learning_rate": train["learning_rate"], "lr_scheduler": "constant", "warmup_steps": 0,
                  "weight_decay": 0.0, "mixed_precision": "no", "seed": train["seed"]},
        "full": {"ema": False},
        "output": {"dir": str(folder / "runs"), "name": "drawing-base", "export_path": str(folder / COMFY_NAME),
                   "tensorboard": False},
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfy", type=Path, required=True, help="the ComfyUI folder (the one holding models/)")
    args = parser.parse_args(argv)
    print(install_into(args.comfy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
