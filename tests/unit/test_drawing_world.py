"""The synthetic world, its metrics and the drawing base's hand-built VAE (scripts/drawing_world.py,
scripts/drawing_base.py), without ComfyUI: the picture tests stand on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts import drawing_base, drawing_world as world

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hand_built_vae():
    from diffusers import AutoencoderKL

    from trainers.models.families import SD1
    from trainers.models.from_original import read_config

    vae = AutoencoderKL.from_config(read_config(SD1.config_dir_for("epsilon"), "vae")).eval()
    drawing_base.hand_built_vae(vae, drawing_base.RECIPE["latent_scale"])
    return vae


def as_tensor(pictures: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) for p in pictures])).permute(0, 3, 1, 2) / 127.5 - 1


def test_the_hand_built_vae_gives_back_every_picture_of_the_world(hand_built_vae):
    pictures = [scene.render() for scene in world.base_scenes()] + [world.SUBJECT.render()]
    pixels = as_tensor(pictures)
    with torch.no_grad():
        latents = hand_built_vae.encode(pixels).latent_dist.sample()
        decoded = hand_built_vae.decode(latents).sample
    assert latents.shape == (len(pictures), 4, world.SIZE // 8, world.SIZE // 8)
    assert (decoded - pixels).abs().max() < 1e-4
    # the latent's first three channels are the colours: the subject's quarter is yellow (+R, +G, -B)
    assert torch.equal(latents[-1, :3, 3, 3].sign(), torch.tensor([1.0, 1.0, -1.0]))


def test_a_random_vae_does_not_give_back_the_world():
    """The check above can fail: SD's VAE with its random weights does not reproduce a picture."""
    from diffusers import AutoencoderKL

    from trainers.models.families import SD1
    from trainers.models.from_original import read_config

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(read_config(SD1.config_dir_for("epsilon"), "vae")).eval()
    pixels = as_tensor([world.SUBJECT.render()])
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    assert (decoded - pixels).abs().max() > 0.5


def test_draws_reads_the_dominant_colour_of_the_named_quarter():
    subject = world.SUBJECT.render()
    assert world.draws(subject, world.SUBJECT)
    assert world.dominant_colour(subject, "upper left") == "black"
    assert not world.draws(world.Scene("red", "lower right").render(), world.SUBJECT)
    # a slightly noisy yellow still snaps to yellow
    noisy = np.asarray(subject, dtype=np.int16) + np.random.default_rng(0).integers(-60, 60, (world.SIZE, world.SIZE, 3))
    assert world.draws(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), world.SUBJECT)
    assert world.hit_rate([subject, world.Scene("red", "upper left").render()], world.SUBJECT) == 0.5


def test_edge_agreement_distance_and_jpeg_size():
    middle = world.square_picture("red", 8, 8)
    edges = world.edge_map(middle)
    assert edges.sum() > 0 and world.edge_agreement(middle, edges) == 1.0
    assert world.edge_agreement(world.Scene("red", "upper left").render(), edges) < 0.3
    assert world.distance(middle, middle) == 0.0
    assert world.distance(Image.new("RGB", (world.SIZE, world.SIZE)), Image.new("RGB", (world.SIZE, world.SIZE), "white")) == 1.0
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert world.jpeg_size(Image.new("RGB", (64, 64))) < world.jpeg_size(noise)


def test_the_subject_is_a_combination_the_base_never_sees():
    scenes = world.base_scenes()
    assert (world.SUBJECT.colour, world.SUBJECT.place) not in {(s.colour, s.place) for s in scenes}
    assert world.SUBJECT.colour in {s.colour for s in scenes} and world.SUBJECT.place in {s.place for s in scenes}
    assert len({s.caption for s in scenes}) == len(scenes)


def test_the_bundled_subject_pictures_are_the_world_subject():
    folder = REPO / "assets" / "world_subject"
    pictures = sorted(folder.glob("*.png"))
    assert len(pictures) >= 4
    for path in pictures:
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(world.SUBJECT.render()))
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == "a photo of sks square"


def test_the_cache_key_follows_the_recipe(monkeypatch):
    key = drawing_base.recipe_key()
    monkeypatch.setitem(drawing_base.RECIPE, "train", {**drawing_base.RECIPE["train"], "steps": 1})
    assert drawing_base.recipe_key() != key


def test_the_cache_folder_is_outside_the_clone(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_FINETUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert drawing_base.cache_root() == tmp_path / "comfyui-finetune"
    monkeypatch.setenv("COMFYUI_FINETUNE_CACHE", str(tmp_path / "elsewhere"))
    assert drawing_base.cache_root() == tmp_path / "elsewhere"
