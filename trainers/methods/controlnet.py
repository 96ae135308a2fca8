"""ControlNet training: a ControlNet copied from the base UNet's encoder (`ControlNetModel.from_unet`) learns to steer
the frozen UNet with a control map (edges, depth...) of each training image.

Control maps are made from the training images by a preprocessor (trainers/preprocess.py), or read from a folder of
ready-made maps with the same file stems. Either way a map goes through the crop and flip of its image, so the two
stay aligned. Exported as one .safetensors file that ComfyUI's ControlNet loader reads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel

from ..data.buckets import resize_to_cover
from ..data.dataset import TrainingDataset
from ..data.images import IMAGE_EXTENSIONS, image_size, load_image, pil_to_uint8_tensor
from ..errors import DataError
from ..export.controlnet import save_controlnet
from ..models.families import PromptEmbeds
from ..preprocess import control_map
from .base import MappedDataset, Method, RunSummary

ASPECT_TOLERANCE = 0.02
HINT_CHANNELS = (16, 32, 96, 256)
"""The hint encoder's widths in every released ControlNet (and in ComfyUI's loader): 8× down, for SD's VAE."""


class PairedMaps:
    """Control maps from a folder, matched to training images by file stem; each is scaled to cover its image's
    bucket (as the dataset scales the image) and cached."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.by_stem = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def check(self, dataset: TrainingDataset) -> None:
        """Every training image must have a map of the same aspect ratio (before any step is trained)."""
        missing = [item.name for item in dataset.items if item.path is None or item.path.stem not in self.by_stem]
        if missing:
            raise DataError(f"{len(missing)} training image(s) have no control map of the same name, e.g. "
                            f"{missing[0]}", "put one map per image in the folder, named like the image "
                            "(img_01.png for img_01.jpg), or leave controlnet.control_folder empty to make maps",
                            where=str(self.folder))
        for item in dataset.items:
            path = self.by_stem[item.path.stem]
            map_w, map_h = image_size(path)
            width, height = item.size or image_size(item.path)
            if abs(map_w / map_h - width / height) > ASPECT_TOLERANCE * width / height:
                raise DataError(f"the control map is {map_w}×{map_h} but its image {item.path.name} is "
                                f"{width}×{height} (another aspect ratio)", "make the map from the image itself, at "
                                "its size", where=str(path))

    def for_example(self, dataset: TrainingDataset, example: dict[str, Any]) -> torch.Tensor:
        item = example["item"]
        target_h, target_w = example["target_size"]
        key = (id(dataset), item)
        if key not in self._cache:
            path = self.by_stem[dataset.items[item].path.stem]
            self._cache[key] = pil_to_uint8_tensor(resize_to_cover(load_image(path), (target_w, target_h)))
        resized = self._cache[key]
        if example["flipped"]:
            resized = resized.flip(-1)  # the dataset reports the crop as seen in the flipped image
        top, left = example["crop_top_left"]
        return resized[:, top:top + target_h, left:left + target_w].float() / 255


def generated_map(preprocessor: str, example: dict[str, Any]) -> torch.Tensor:
    """The preprocessor's map of the example's (already cropped and flipped) pixels, (3, H, W) in [0, 1]."""
    image = (example["pixels"].float() + 1) / 2
    return control_map(image.permute(1, 2, 0).unsqueeze(0), preprocessor)[0].permute(2, 0, 1)


class ControlNetMethod(Method):
    name = "controlnet"

    def setup(self) -> None:
        self.freeze_all()
        opts = self.cfg.controlnet
        unet = self.base.unet
        # The hint encoder halves the map's size once per block after the first: as often as the VAE does.
        vae_levels = len(self.base.vae.config.block_out_channels)
        self.controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=HINT_CHANNELS[:vae_levels]).to(unet.device, torch.float32)
        self.controlnet.requires_grad_(True)
        if self.cfg.train.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
        self.controlnet_forward = self.controlnet
        self.paired = PairedMaps(Path(opts.control_folder).expanduser()) if opts.control_folder else None

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.controlnet.parameters()), "lr": self.cfg.train.learning_rate}]

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        return {"controlnet": self.controlnet}

    def wrap(self, wrapped: dict[str, torch.nn.Module]) -> None:
        self.controlnet_forward = wrapped["controlnet"]

    def prepare_dataset(self, dataset: TrainingDataset) -> MappedDataset:
        if self.paired is not None:
            self.paired.check(dataset)
            return MappedDataset(dataset, lambda ex: {**ex, "control": self.paired.for_example(dataset, ex)})
        preprocessor = self.cfg.controlnet.preprocessor
        return MappedDataset(dataset, lambda ex: {**ex, "control": generated_map(preprocessor, ex)})

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,
                batch: dict[str, Any]) -> torch.Tensor:
        added = self.base.family.added_cond_kwargs(
            embeds, batch.get("original_size"), batch.get("crop_top_left"), batch.get("target_size"))
        control = torch.stack(batch["control"]).to(noisy.device, torch.float32)
        down, mid = self.controlnet_forward(
            noisy, timesteps, encoder_hidden_states=embeds.hidden_states, controlnet_cond=control,
            conditioning_scale=self.cfg.controlnet.conditioning_scale, added_cond_kwargs=added, return_dict=False)
        dtype = noisy.dtype
        return self.unet_forward(noisy, timesteps, encoder_hidden_states=embeds.hidden_states,
                                 added_cond_kwargs=added, down_block_additional_residuals=[d.to(dtype) for d in down],
                                 mid_block_additional_residual=mid.to(dtype)).sample

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"controlnet.{k}": v for k, v in self.controlnet.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.controlnet.load_state_dict({k.removeprefix("controlnet."): v for k, v in state.items()})

    def export(self, path: Path, run: RunSummary, *, overwrite: bool) -> Path:
        opts = self.cfg.controlnet
        family_architecture = self.base.family.modelspec_architecture(self.base.prediction_type)
        metadata = {
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{family_architecture}/controlnet",
            "modelspec.title": self.cfg.output.name,
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(run.finished_at)),
            "finetune_control": "paired maps" if opts.control_folder else opts.preprocessor,
            "ss_steps": str(run.steps_done),
            "finetune_config": self.cfg.to_json(),
        }
        return save_controlnet(path, self.controlnet.state_dict(), self.base.unet.config, metadata,
                               overwrite=overwrite)
