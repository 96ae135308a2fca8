"""A tiny ControlNet for the tiny ComfyUI SD1 checkpoint: nothing is downloaded, everything is built here.

    python scripts/tiny_controlnet.py --comfy DIR     # install into DIR/models/controlnet

A diffusers `ControlNetModel` made from the checkpoint's own UNet (as ControlNet training starts), with its zero
convolutions and hint encoder set to random values so that the control image visibly changes what is sampled,
saved in the original single-file layout that ComfyUI recognises for any UNet shape. Cached under
`.cache/tiny_models/` like the other tiny models.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import tiny_models  # noqa: E402
from trainers.export.controlnet import save_controlnet  # noqa: E402
from trainers.models.families import detect_family  # noqa: E402
from trainers.models.from_original import unet_from_original  # noqa: E402
from trainers.models.single_file import CheckpointFile  # noqa: E402

COMFY_NAME = "tiny-controlnet-sd15.safetensors"
ZERO_CONV_STD = 0.05
"""Spread given to the zero convolutions: enough to steer the tiny model, small enough to keep its images finite."""
HINT_GAIN = 4.0
"""The hint encoder is re-initialised to keep its signal's size through its eight convolutions (the default init
shrinks it to nothing) and scaled so that two different control images give clearly different images."""
_CODE = (Path(__file__), REPO / "trainers" / "export" / "controlnet.py")


def tiny_controlnet(seed: int = 0) -> Path:
    """The ControlNet file for `tiny_models.comfy_checkpoint("sd1")`, built once and then reused."""
    checkpoint = tiny_models.comfy_checkpoint("sd1")
    code = hashlib.sha256(b"".join(path.read_bytes() for path in _CODE)).hexdigest()[:16]
    params = {"seed": seed, "checkpoint": checkpoint.parent.name, "code": code}

    def build(folder: Path) -> None:
        from diffusers import ControlNetModel

        file = CheckpointFile(checkpoint)
        family, prediction_type = detect_family(file, where=file.where)
        unet = unet_from_original(file, family, family.config_dir_for(prediction_type), torch.float32)
        controlnet = ControlNetModel.from_unet(unet)
        for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            torch.nn.init.normal_(conv.weight, std=ZERO_CONV_STD)
        hint_encoder = controlnet.controlnet_cond_embedding
        for conv in hint_encoder.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        with torch.no_grad():
            hint_encoder.conv_out.weight *= HINT_GAIN
        save_controlnet(folder / COMFY_NAME, controlnet.state_dict(), unet.config,
                        {"modelspec.title": "random ControlNet for tests"})

    return tiny_models.cached("controlnet-sd1", params, build) / COMFY_NAME


def install_into(comfyui_dir: Path) -> str:
    """Link (or copy) the tiny ControlNet into models/controlnet/; returns its name in ComfyUI's ControlNet lists."""
    tiny_models.link(tiny_controlnet(), Path(comfyui_dir) / "models" / "controlnet" / COMFY_NAME)
    return COMFY_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfy", type=Path, required=True, help="the ComfyUI folder (the one holding models/)")
    args = parser.parse_args(argv)
    print(Path(args.comfy) / "models" / "controlnet" / install_into(args.comfy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
