"""Masked loss: masks come from `photo.mask.png` or the alpha channel, follow crops, flips and buckets, and weight
the loss so that the UNet's prediction gets no gradient where the mask (scaled to the latent) is zero."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from trainers.config import DataConfig
from trainers.data.dataset import TrainingDataset, collate
from trainers.data.scan import scan_dataset
from trainers.diffusion import denoising_loss, latent_mask
from trainers.errors import DataError
from trainers.loop import train

from train_helpers import make_images, read_events, tiny_config


def test_the_prediction_gets_no_gradient_where_the_latent_mask_is_zero():
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, generator=generator, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    pixels = torch.ones(2, 1, 64, 64)
    pixels[0, :, :, :32] = 0  # sample 0: left half of the latent masked out
    pixels[1, :, :4, :] = 0  # sample 1: half of the first latent row (a position half inside learns at half weight)
    mask = latent_mask(pixels, pred)
    timesteps, scheduler = torch.tensor([10, 900]), DDPMScheduler()

    loss = denoising_loss(pred, target, timesteps, scheduler, 0.0, mask)
    (gradient,) = torch.autograd.grad(loss.sum(), pred)

    assert mask[0, 0, :, :4].eq(0).all() and mask[1, 0, 0].eq(0.5).all()
    assert gradient[0, :, :, :4].eq(0).all() and gradient[0, :, :, 4:].ne(0).all() and gradient[1].ne(0).all()
    weights = mask.expand_as(pred)
    by_hand = ((pred - target) ** 2 * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))
    torch.testing.assert_close(loss, by_hand)
    (unmasked,) = torch.autograd.grad(denoising_loss(pred, target, timesteps, scheduler, 0.0).sum(), pred)
    assert unmasked.ne(0).all()


def disc_mask(size: tuple[int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    width, height = size
    mask.paste(255, (width // 4, height // 5, width // 2 + 7, height - 3))
    return mask


@pytest.fixture
def masked_folder(tmp_path):
    """photo_0: a mask file (its pixels are the mask itself, so the two can be compared after any crop or flip);
    photo_1: a transparent PNG; photo_2: neither."""
    folder = tmp_path / "masked"
    folder.mkdir()
    mask = disc_mask((96, 64))
    mask.convert("RGB").save(folder / "photo_0.png")
    mask.save(folder / "photo_0.mask.png")
    rgba = Image.new("RGBA", (64, 64), (200, 10, 10, 255))
    rgba.putalpha(disc_mask((64, 64)))
    rgba.save(folder / "photo_1.png")
    Image.new("RGB", (64, 64), (0, 90, 0)).save(folder / "photo_2.png")
    return folder


def dataset(folder, **data) -> TrainingDataset:
    cfg = DataConfig(folder=str(folder), resolution=48, bucket_step=16, min_bucket_side=16, masked_loss=True, **data)
    scan = scan_dataset(cfg, seed=0)
    return TrainingDataset(scan.items, cfg, seed=0)


def test_mask_files_are_not_training_images_and_masks_follow_crops_flips_and_buckets(masked_folder):
    data = dataset(masked_folder, crop="random", flip=True)
    assert [item.path.name for item in data.items] == ["photo_0.png", "photo_1.png", "photo_2.png"]
    flips = set()
    for epoch in range(6):
        data.set_epoch(epoch)
        example = data[0]
        flips.add(example["flipped"])
        assert example["mask"].shape[1:] == example["pixels"].shape[1:] != (48, 48)  # its bucket is not square
        torch.testing.assert_close(example["mask"][0], (example["pixels"][0] + 1) / 2, rtol=0, atol=1.5 / 255)
    assert flips == {True, False}


def test_the_alpha_channel_is_the_mask_and_an_image_without_either_learns_whole(masked_folder):
    data = dataset(masked_folder)
    alpha, whole = data[1]["mask"], data[2]["mask"]
    expected = torch.from_numpy(np.array(disc_mask((64, 64)).resize((48, 48), Image.Resampling.LANCZOS))) / 255
    torch.testing.assert_close(alpha[0], expected.float(), rtol=0, atol=1.5 / 255)
    assert whole.eq(1).all()
    assert collate([data[1], data[2]])["mask"].shape == (2, 1, 48, 48)


def test_unmasked_share_learns_whole_images_on_that_share_of_steps(masked_folder):
    assert dataset(masked_folder, unmasked_share=1.0)[0]["mask"].eq(1).all()
    assert dataset(masked_folder, unmasked_share=0.0)[0]["mask"].eq(0).any()


def test_a_mask_of_another_size_names_the_mask_file(masked_folder):
    Image.new("L", (64, 80), 255).save(masked_folder / "photo_2.mask.png")
    with pytest.raises(DataError, match="save the mask at the image's size") as caught:
        dataset(masked_folder)[2]
    assert caught.value.where.endswith("photo_2.mask.png")


def test_a_masked_run_trains_and_validates(tmp_path, masked_folder):
    cfg = tiny_config(tmp_path, masked_folder, steps=2, data={"masked_loss": True, "validation_fraction": 0.34})
    result = train(cfg)
    assert result.status == "succeeded"
    assert [e for e in read_events(result.run_dir) if e["event"] == "validation"]
