"""Loading base models: single files and diffusers folders give the same modules, tokenizers and training scheduler;
overrides, a separate VAE, the sampling pipeline, and one clear ModelError for each thing a user can get wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from scripts.tiny_models import tiny_pipeline_dir, tiny_single_file
from trainers.config import ModelConfig
from trainers.errors import ModelError
from trainers.export.checkpoint import (
    VAE_PREFIX,
    text_encoders_to_original,
    unet_to_original,
    vae_to_original,
)
from trainers.models.families import SD1, SD2, SDXL, detect_family
from trainers.models.from_original import read_config
from trainers.models.loading import build_pipeline, load_base_model
from trainers.models.original_configs import (
    text_encoder_config_from_original,
    unet_config_from_original,
    vae_config_from_original,
)

TINY = {"sd1": (SD1, "epsilon"), "sd2v": (SD2, "v_prediction"), "sdxl": (SDXL, "epsilon")}


def load(base: str, **fields):
    return load_base_model(ModelConfig(base=str(base), **fields))


def assert_same_modules(a, b) -> None:
    for mine, theirs in [(a.unet, b.unet), (a.vae, b.vae), *zip(a.text_encoders, b.text_encoders, strict=True)]:
        left, right = mine.state_dict(), theirs.state_dict()
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left)


@pytest.fixture(scope="module", params=sorted(TINY))
def loaded(request):
    name = request.param
    return name, load(tiny_pipeline_dir(name)), load(tiny_single_file(name))


def test_single_file_and_folder_load_the_same_model(loaded):
    name, from_folder, from_file = loaded
    family, prediction_type = TINY[name]
    for base in (from_folder, from_file):
        assert base.family is family and base.prediction_type == prediction_type
        assert base.noise_scheduler.config.prediction_type == prediction_type
        assert base.noise_scheduler.config.beta_schedule == "scaled_linear"
        assert [len(t) for t in base.tokenizers] == [49408] * len(family.text_encoder_specs)
        assert [t.pad_token for t in base.tokenizers] == [s.pad_token for s in family.text_encoder_specs]
        assert base.unet.dtype == torch.float32 and not base.unet.training
    assert from_file.single_file == tiny_single_file(name).resolve() and from_folder.single_file is None
    assert from_file.unet.config.block_out_channels == from_folder.unet.config.block_out_channels
    assert_same_modules(from_folder, from_file)


def test_dtype_and_prediction_type_override():
    base = load_base_model(ModelConfig(base=str(tiny_single_file("sd1")), prediction_type="v_prediction"),
                           dtype=torch.float16)
    assert base.prediction_type == base.noise_scheduler.config.prediction_type == "v_prediction"
    assert {p.dtype for p in base.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in base.text_encoders[0].parameters()} == {torch.float16}
    folder = load(tiny_pipeline_dir("sd2v"), prediction_type="epsilon")
    assert folder.noise_scheduler.config.prediction_type == "epsilon"


def test_family_that_contradicts_the_file_is_refused():
    with pytest.raises(ModelError, match="this is a Stable Diffusion 1.x model, but model.family says 'sdxl'"):
        load(tiny_single_file("sd1"), family="sdxl")
    assert load(tiny_single_file("sd1"), family="sd1").family is SD1


def test_ckpt_with_only_tensors_loads(tmp_path):
    state = load_file(tiny_single_file("sd1"))
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 10}, path)
    assert_same_modules(load(path), load(tiny_single_file("sd1")))


def test_separate_vae_from_file_and_folder(tmp_path):
    other = load(tiny_pipeline_dir("sd1", seed=1)).vae
    vae_only = {k.removeprefix(VAE_PREFIX): v for k, v in load_file(tiny_single_file("sd1", seed=1)).items()
                if k.startswith(VAE_PREFIX)}
    save_file(vae_only, tmp_path / "vae.safetensors")
    for vae in (str(tmp_path / "vae.safetensors"), str(tiny_pipeline_dir("sd1", seed=1)),
                str(tiny_pipeline_dir("sd1", seed=1) / "vae")):
        base = load(tiny_single_file("sd1"), vae=vae)
        assert all(torch.equal(a, b) for a, b in zip(base.vae.state_dict().values(), other.state_dict().values()))
    with pytest.raises(ModelError, match="model.vae"):
        load(tiny_single_file("sd1"), vae=str(tmp_path))


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_pipeline_shares_the_modules_and_generates(name):
    base = load(tiny_pipeline_dir(name))
    pipeline = build_pipeline(base, scheduler="euler")
    assert pipeline.unet is base.unet and pipeline.vae is base.vae and pipeline.text_encoder is base.text_encoders[0]
    assert pipeline.scheduler.config.prediction_type == base.prediction_type
    image = pipeline("a red disc", num_inference_steps=2, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    with pytest.raises(ValueError, match="unknown scheduler"):
        build_pipeline(base, scheduler="nope")


# ---- what a user can get wrong -----------------------------------------------------------------------------
def expect_error(base, *fragments):
    with pytest.raises(ModelError) as error:
        load(base)
    message = str(error.value)
    assert all(fragment in message for fragment in fragments), message
    return message


def test_missing_file(tmp_path, monkeypatch):
    expect_error(tmp_path / "nope.safetensors", "file or folder not found", str(tmp_path / "nope.safetensors"))
    expect_error(tmp_path / "models" / "sub" / "x", "not found")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    expect_error("models/typo", "file or folder not found", "models/typo")  # a path, not a hub id


def test_empty_base():
    with pytest.raises(ModelError, match="model.base: no base model given"):
        load("  ")


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    expect_error(tmp_path, "not a diffusers model", "model_index.json", str(tmp_path))


def test_diffusers_folder_with_missing_weights(tmp_path):
    folder = shutil.copytree(tiny_pipeline_dir("sd1"), tmp_path / "model")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    expect_error(folder, "cannot load its unet", str(folder))


def test_folder_without_tokenizer_gets_the_shipped_one(tmp_path):
    folder = shutil.copytree(tiny_pipeline_dir("sd1"), tmp_path / "model")
    shutil.rmtree(folder / "tokenizer")
    assert len(load(folder).tokenizers[0]) == 49408


@pytest.mark.parametrize("cut", [0, 5, 0.5])
def test_truncated_or_corrupt_safetensors(tmp_path, cut):
    data = tiny_single_file("sd1").read_bytes()
    path = tmp_path / "broken.safetensors"
    path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    expect_error(path, "not a readable .safetensors file", "truncated or corrupt", str(path))


def test_corrupt_ckpt(tmp_path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"PK\x03\x04 definitely not a zip archive" * 10)
    expect_error(path, "not a readable checkpoint", str(path))


class Payload:
    """Stands for the arbitrary objects old training scripts pickled beside the weights."""


def test_ckpt_needing_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callbacks": Payload()}, path)
    expect_error(path, "arbitrary Python objects", "convert it to .safetensors", str(path))


def test_unknown_suffix(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    expect_error(path, "unknown checkpoint type '.onnx'")


def test_unknown_architecture(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, path)
    expect_error(path, "not a model this trainer supports", "Stable Diffusion 1.x, 2.x", str(path))


def test_file_missing_a_part(tmp_path):
    state = {k: v for k, v in load_file(tiny_single_file("sd1")).items() if not k.startswith(VAE_PREFIX)}
    save_file(state, tmp_path / "no_vae.safetensors")
    expect_error(tmp_path / "no_vae.safetensors", "the file has no VAE", "model.vae")
    state = load_file(tiny_single_file("sd1"))
    del state["model.diffusion_model.out.2.bias"]
    save_file(state, tmp_path / "damaged.safetensors")
    expect_error(tmp_path / "damaged.safetensors", "UNet weights do not fit", "1 missing")


def test_hub_id_that_cannot_be_fetched_offline():
    expect_error("someone/not-a-local-model", "could not fetch the hub model", "someone/not-a-local-model",
                 "local file")


def test_sd2_base_config_used_for_epsilon_files(tmp_path):
    """An SD2 file without v-prediction's spread reads as epsilon (SD2-base) with the matching scheduler."""
    state = load_file(tiny_single_file("sd2v"))
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    state[probe] = torch.zeros_like(state[probe])
    save_file(state, tmp_path / "sd2-base.safetensors")
    base = load(tmp_path / "sd2-base.safetensors")
    assert base.family is SD2 and base.prediction_type == "epsilon"
    assert json.loads((SD2.config_dir_for("epsilon") / "unet" / "config.json").read_text())["sample_size"] == 64


# ---- full-size layouts, read off shapes only (meta tensors: no memory) -------------------------------------
@pytest.mark.parametrize("family, prediction_type", [(SD1, "epsilon"), (SD2, "v_prediction"), (SDXL, "epsilon")])
def test_configs_read_off_full_size_files_are_the_real_ones(family, prediction_type):
    folder = family.config_dir_for(prediction_type)
    unet_config, vae_config = read_config(folder, "unet"), read_config(folder, "vae")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        encoders = [spec.model_class(spec.model_class.config_class.from_dict(read_config(folder, spec.subfolder)))
                    for spec in family.text_encoder_specs]
    state = {**unet_to_original(unet.state_dict(), unet.config), **vae_to_original(vae.state_dict()),
             **text_encoders_to_original(family, [e.state_dict() for e in encoders])}
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    assert detect_family(shapes, where="f")[0] is family

    inferred = unet_config_from_original(shapes, family, unet_config, where="f")
    with init_empty_weights():
        rebuilt = UNet2DConditionModel.from_config(inferred)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    for name in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim",
                 "use_linear_projection", "attention_head_dim", "transformer_layers_per_block", "mid_block_type"):
        assert plain(inferred[name]) == plain(unet.config[name]), name
    assert "reverse_transformer_layers_per_block" not in inferred
    assert vae_config_from_original(shapes, vae_config, where="f") == {**vae_config, "mid_block_add_attention": True}
    for spec, encoder in zip(family.text_encoder_specs, encoders):
        expected = read_config(folder, spec.subfolder)
        found = text_encoder_config_from_original(shapes, spec, expected, where="f")
        assert {k: found[k] for k in expected} == expected


def plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value
