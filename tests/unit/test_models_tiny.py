"""The tiny-model factory: deterministic from a seed, built once even when two processes ask at the same time,
installed into a ComfyUI folder by link."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from scripts import tiny_models


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, monkeypatch):
    cached = load_file(tiny_models.tiny_pipeline_dir("sd1") / "unet" / "diffusion_pytorch_model.safetensors")
    monkeypatch.setattr(tiny_models, "CACHE", tmp_path)
    rebuilt = tiny_models.tiny_pipeline_dir("sd1")
    assert rebuilt.parent == tmp_path
    again = load_file(rebuilt / "unet" / "diffusion_pytorch_model.safetensors")
    assert again.keys() == cached.keys() and all(torch.equal(again[k], cached[k]) for k in cached)
    other = load_file(tiny_models.tiny_pipeline_dir("sd1", seed=1) / "unet" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(other["conv_in.weight"], cached["conv_in.weight"])
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["pipeline"] * 2


def test_concurrent_requests_build_once(tmp_path, monkeypatch):
    """Two callers at once (separate lock-file handles, as two processes would have): one builds, both get it."""
    monkeypatch.setattr(tiny_models, "CACHE", tmp_path)
    builds = []

    def build(folder: Path) -> None:
        builds.append(folder)
        time.sleep(0.5)
        (folder / "model.txt").write_text("built")

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: tiny_models.cached("thing", {"seed": 3}, build), range(2)))
    assert len(builds) == 1 and results[0] == results[1]
    assert (results[0] / "model.txt").read_text() == "built"
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [results[0].name]


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_models, "CACHE", tmp_path)

    def build(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        tiny_models.cached("thing", {"seed": 0}, build)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_tiny_blip_captions_offline():
    from transformers import BlipForConditionalGeneration, BlipProcessor

    folder = tiny_models.tiny_blip_dir()
    model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
    inputs = processor(images=Image.new("RGB", (64, 48), (200, 20, 20)), return_tensors="pt")
    caption = processor.batch_decode(model.generate(**inputs, max_new_tokens=6), skip_special_tokens=True)[0]
    assert isinstance(caption, str) and len(caption.split()) <= 6


def test_install_into_links_checkpoint_and_blip(tmp_path, capsys):
    installed = tiny_models.install_into(tmp_path)
    checkpoint = tmp_path / "models" / "checkpoints" / "tiny-sd15.safetensors"
    assert installed == {"sd1": checkpoint, "blip": tmp_path / "models" / "blip" / "tiny-blip"}
    assert checkpoint.resolve() == tiny_models.comfy_checkpoint("sd1").resolve()
    assert (installed["blip"] / "config.json").is_file()
    assert tiny_models.main(["--comfy", str(tmp_path), "--family", "sd1"]) == 0
    assert f"sd1: {checkpoint}" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["tiny-sd15.safetensors"]


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown tiny model family 'sd3'"):
        tiny_models.tiny_pipeline_dir("sd3")
