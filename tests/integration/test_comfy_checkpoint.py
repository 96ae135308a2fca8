"""ComfyUI loads our single files: the tiny checkpoints of scripts/tiny_models.py and what `save_single_file` writes,
recognised as the right model class with no missing or unexpected keys. And diffusers' own `from_single_file`,
given the shipped config folder, loads the tiny SD1 checkpoint offline with every tensor as the file holds it.

ComfyUI runs in this process through `comfy.sd.load_checkpoint_guess_config`, on the CPU.
"""

from __future__ import annotations

import ast
import logging
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from scripts import tiny_models
from tests.integration.test_comfy_lora import Captured, import_comfy
from trainers.config import ModelConfig
from trainers.export.checkpoint import save_single_file, unet_to_original
from trainers.models.families import SD1
from trainers.models.from_original import read_config
from trainers.models.loading import load_base_model
from trainers.models.original_configs import unet_config_from_original
from trainers.models.single_file import CheckpointFile

# keys ComfyUI itself treats as optional (its own SD1/SD2/SDXL files leave them out)
OPTIONAL_CLIP_KEYS = (".logit_scale", ".transformer.text_projection.weight")
UNET_KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@contextmanager
def captured_log():
    """Every record (debug included) logged while loading."""
    lines: list[str] = []
    handler, root = Captured(lines), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def key_problems(lines: list[str]) -> list[str]:
    problems = []
    for line in lines:
        lower = line.lower()
        if lower.startswith("clip missing:"):
            missing = ast.literal_eval(line.split(":", 1)[1].strip())
            if any(not key.endswith(OPTIONAL_CLIP_KEYS) for key in missing):
                problems.append(line)
        elif "missing" in lower or "unexpected" in lower or "left over" in lower:
            problems.append(line)
    return problems


def load_in_comfyui(path: Path):
    comfy = import_comfy()
    with captured_log() as lines:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True, model_options={"dtype": torch.float32},
            te_model_options={"dtype": torch.float32})
    assert model is not None and clip is not None and vae is not None
    return model, clip, lines


def model_class(model) -> tuple[str, str]:
    return type(model.model.model_config).__name__, model.model.model_type.name


def test_tiny_sd1_checkpoint_loads_cleanly():
    model, _, lines = load_in_comfyui(tiny_models.comfy_checkpoint("sd1"))
    assert model_class(model) == ("SD15", "EPS")
    assert not key_problems(lines), key_problems(lines)


@pytest.mark.parametrize("family, dtype, expected", [
    ("sd1", torch.float16, ("SD15", "EPS")),
    pytest.param("sd2v", torch.float16, ("SD20", "V_PREDICTION"), marks=pytest.mark.slow),
    pytest.param("sdxl", torch.float8_e4m3fn, ("KOALA_700M", "EPS"), marks=pytest.mark.slow),
])
def test_exported_checkpoint_loads_cleanly(family, dtype, expected, tmp_path):
    """Written from diffusers modules alone (no original file to borrow from), with a changed UNet."""
    base = load_base_model(ModelConfig(base=str(tiny_models.comfy_checkpoint(family))))
    base.single_file = None
    unet_state = dict(base.unet.state_dict())
    changed = next(k for k in unet_state if k.endswith("attn2.to_k.weight"))
    unet_state[changed] = to_k = unet_state[changed] + 0.25
    (original_key,) = unet_to_original({changed: to_k}, base.unet.config)
    path = save_single_file(tmp_path / f"{family}.safetensors", base, unet_state=unet_state, dtype=dtype)
    del base, unet_state

    model, clip, lines = load_in_comfyui(path)
    assert model_class(model) == expected
    assert not key_problems(lines), key_problems(lines)
    loaded = model.model.diffusion_model.state_dict()[original_key.removeprefix("model.diffusion_model.")]
    assert torch.equal(loaded, to_k.to(dtype).float())


def test_diffusers_loads_tiny_sd1_checkpoint_with_the_shipped_config_offline():
    path = tiny_models.comfy_checkpoint("sd1")
    file = CheckpointFile(path)
    shapes = unet_config_from_original(file, SD1, read_config(SD1.config_dir, "unet"), where=str(path))
    overrides = {k: shapes[k] for k in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types")}
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(SD1.config_dir), subfolder="unet",
                                                 local_files_only=True, torch_dtype=torch.float32, **overrides)
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(SD1.config_dir), local_files_only=True, torch_dtype=torch.float32, unet=unet,
        tokenizer=SD1.load_tokenizers()[0], safety_checker=None, feature_extractor=None)
    assert pipe.scheduler.config.prediction_type == "epsilon" and len(pipe.tokenizer) == 49408

    raw = {"model.diffusion_model." + UNET_KEY: pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k,
           "first_stage_model.decoder.conv_out.weight": pipe.vae.decoder.conv_out,
           "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight":
               pipe.text_encoder.encoder.layers[11].mlp.fc2}
    for key, module in raw.items():
        assert torch.equal(module.weight, file[key].float())

    ours = load_base_model(ModelConfig(base=str(path)))
    for mine, theirs in [(ours.unet, pipe.unet), (ours.vae, pipe.vae), (ours.text_encoders[0], pipe.text_encoder)]:
        left, right = mine.state_dict(), theirs.state_dict()
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.slow
def test_sd2_prompt_encoding_matches_comfyui():
    """ComfyUI runs OpenCLIP-H's 24 layers and takes the penultimate one; diffusers' 23-layer encoder gives the same."""
    path = tiny_models.comfy_checkpoint("sd2v")
    ours = load_base_model(ModelConfig(base=str(path)))
    prompt = "a photo of a cat, watercolor"
    with torch.no_grad():
        expected = ours.family.encode_prompts(ours.text_encoders, ours.tokenizers, [prompt]).hidden_states
    _, clip, _ = load_in_comfyui(path)
    cond = clip.encode_from_tokens(clip.tokenize(prompt))
    assert cond.shape == expected.shape == (1, 77, 1024)
    assert float((cond.float() - expected).norm() / expected.norm()) < 1e-4
