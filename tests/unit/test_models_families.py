"""Model families: recognising them from single files and configs, the shipped config folders and tokenizer,
prompt encoding exactly as diffusers' pipelines do it, and SDXL's size conditioning."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from scripts.tiny_models import tiny_pipeline_dir, tiny_single_file
from trainers.errors import ModelError
from trainers.models.families import (
    CLIP_TOKENIZER_DIR,
    CONFIGS,
    FAMILIES,
    SD1,
    SD2,
    SDXL,
    PromptEmbeds,
    detect_family,
    family_from_unet_config,
)
from trainers.models.single_file import CheckpointFile

TINY = {"sd1": (SD1, "epsilon"), "sd2v": (SD2, "v_prediction"), "sdxl": (SDXL, "epsilon")}
PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def shapes(path) -> dict[str, tuple[int, ...]]:
    file = CheckpointFile(path)
    return {key: file.shape_of(key) for key in file}


# ---- single files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TINY))
def test_detects_family_and_prediction_type_of_tiny_single_files(name):
    assert detect_family(CheckpointFile(tiny_single_file(name)), where="f") == TINY[name]


@pytest.mark.parametrize("name", sorted(TINY))
def test_detects_family_from_shapes_alone(name):
    family, _ = detect_family(shapes(tiny_single_file(name)), where="f")
    assert family is TINY[name][0]


def test_sd2_prediction_type_follows_comfyui_rule_on_output_block_11():
    state = shapes(tiny_single_file("sd2v"))
    width = state[PROBE][0]
    assert detect_family({**state, PROBE: torch.zeros(width)}, where="f") == (SD2, "epsilon")
    assert detect_family({**state, PROBE: torch.full((width,), 0.5)}, where="f") == (SD2, "epsilon")
    spread = torch.linspace(-0.3, 0.3, width)
    assert detect_family({**state, PROBE: spread}, where="f") == (SD2, "v_prediction")


def test_sdxl_v_pred_marker_means_v_prediction():
    state = shapes(tiny_single_file("sdxl"))
    assert detect_family({**state, "v_pred": torch.tensor([])}, where="f") == (SDXL, "v_prediction")


def test_full_size_widths_alone_decide_without_text_encoders():
    unet = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    attn = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert detect_family({**unet, attn: (320, 768)}, where="f")[0] is SD1
    assert detect_family({**unet, attn: (320, 1024)}, where="f")[0] is SD2
    sdxl = {**unet, attn: (640, 2048), "model.diffusion_model.label_emb.0.0.weight": (1280, 2816)}
    assert detect_family(sdxl, where="f")[0] is SDXL


@pytest.mark.parametrize("state, found", [
    ({"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (1536, 1536)}, "another architecture"),
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "no Stable Diffusion UNet"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "a LoRA"),
    ({}, "no tensors"),
])
def test_other_architectures_are_refused_naming_the_file_and_the_families(state, found):
    with pytest.raises(ModelError) as error:
        detect_family(state, where="/models/other.safetensors")
    message = str(error.value)
    assert message.startswith("/models/other.safetensors: ")
    assert found in message and "Stable Diffusion 1.x, 2.x" in message and "SDXL" in message


def test_text_encoder_that_does_not_fit_the_unet_is_refused():
    state = shapes(tiny_single_file("sd1"))
    state = {k: (v[0], 1024) if k.endswith("attn2.to_k.weight") else v for k, v in state.items()}
    with pytest.raises(ModelError, match="width 32 beside a UNet expecting 1024"):
        detect_family(state, where="f")


def test_sdxl_refiner_layout_is_refused():
    state = shapes(tiny_single_file("sdxl"))
    refiner = {k: v for k, v in state.items() if not k.startswith("conditioner.embedders.0.")}
    refiner = {k.replace("embedders.1.", "embedders.0."): v for k, v in refiner.items()}
    with pytest.raises(ModelError, match="not a model this trainer supports"):
        detect_family(refiner, where="f")


# ---- diffusers configs and the shipped folders -------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TINY))
def test_family_from_tiny_unet_config(name):
    config = UNet2DConditionModel.load_config(tiny_pipeline_dir(name), subfolder="unet")
    assert family_from_unet_config(config, where="d") is TINY[name][0]


@pytest.mark.parametrize("family, prediction_type, folder", [
    (SD1, "epsilon", "sd15"), (SD2, "v_prediction", "sd21-v"), (SD2, "epsilon", "sd21-base"),
    (SDXL, "epsilon", "sdxl-base")])
def test_shipped_folders_hold_the_real_configs(family, prediction_type, folder):
    directory = family.config_dir_for(prediction_type)
    assert directory == CONFIGS / folder
    unet = UNet2DConditionModel.load_config(directory, subfolder="unet")
    assert family_from_unet_config(unet, where="d") is family
    assert unet["cross_attention_dim"] == family.context_dim
    # diffusers takes the prediction type from here and nowhere else
    assert DDPMScheduler.from_pretrained(directory, subfolder="scheduler").config.prediction_type == prediction_type
    index = json.loads((directory / "model_index.json").read_text())
    assert index["_class_name"] == family.pipeline_class_name
    for spec in family.text_encoder_specs:
        text = json.loads((directory / spec.subfolder / "config.json").read_text())
        assert text["architectures"] == [spec.model_class.__name__] and text["vocab_size"] == 49408


def test_configs_tree_is_small_with_one_tokenizer_copy():
    files = [p for p in CONFIGS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 3_000_000
    assert [p.parent for p in files if p.name == "vocab.json"] == [CLIP_TOKENIZER_DIR]


@pytest.mark.parametrize("family, pads", [(SD1, ["<|endoftext|>"]), (SD2, ["!"]), (SDXL, ["<|endoftext|>", "!"])])
def test_tokenizers_are_the_real_clip_bpe(family, pads):
    tokenizers = family.load_tokenizers()
    assert [t.pad_token for t in tokenizers] == pads
    for tokenizer in tokenizers:
        assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
        ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
        assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert ids[7] == tokenizer.pad_token_id == (0 if tokenizer.pad_token == "!" else 49407)
    assert family.load_tokenizers()[0] is not tokenizers[0]  # fresh each time: callers may add tokens


def test_family_facts():
    assert {name: f.default_resolution for name, f in FAMILIES.items()} == {"sd1": 512, "sd2": 768, "sdxl": 1024}
    assert SD1.kohya_text_encoder_prefixes == ("lora_te",) and SD2.kohya_text_encoder_prefixes == ("lora_te",)
    assert SDXL.kohya_text_encoder_prefixes == ("lora_te1", "lora_te2")
    assert SD1.modelspec_architecture("epsilon") == "stable-diffusion-v1"
    assert SD2.modelspec_architecture("v_prediction") == "stable-diffusion-v2-768-v"
    assert SD2.modelspec_architecture("epsilon") == "stable-diffusion-v2-512"
    assert SDXL.modelspec_architecture("epsilon") == "stable-diffusion-xl-v1-base"


# ---- conditioning --------------------------------------------------------------------------------------------
PROMPTS = ["a photo of a cat", "a red disc on a table, studio light"]


@pytest.mark.parametrize("name", ["sd1", "sd2v"])
def test_encode_prompts_matches_diffusers_pipeline(name):
    family = TINY[name][0]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir(name))
    embeds = family.encode_prompts([pipe.text_encoder], [pipe.tokenizer], PROMPTS)
    expected, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    assert embeds.pooled is None and embeds.hidden_states.shape == (2, 77, 32)
    torch.testing.assert_close(embeds.hidden_states, expected, rtol=0, atol=0)


def test_sdxl_encode_prompts_matches_diffusers_pipeline():
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir("sdxl"))
    embeds = SDXL.encode_prompts([pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2], PROMPTS)
    expected, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    assert embeds.hidden_states.shape == (2, 77, 32 + 48) and embeds.pooled.shape == (2, 32)
    torch.testing.assert_close(embeds.hidden_states, expected, rtol=0, atol=0)
    torch.testing.assert_close(embeds.pooled, pooled, rtol=0, atol=0)


def test_sdxl_time_ids_and_none_for_others():
    embeds = PromptEmbeds(torch.zeros(2, 77, 64), torch.ones(2, 32, dtype=torch.float16))
    added = SDXL.added_cond_kwargs(embeds, [(480, 640), (512, 512)], [(0, 16), (8, 0)], [(448, 576), (512, 512)])
    assert added["text_embeds"] is embeds.pooled
    assert added["time_ids"].dtype == torch.float16
    assert added["time_ids"].tolist() == [[480, 640, 0, 16, 448, 576], [512, 512, 8, 0, 512, 512]]
    assert SD1.added_cond_kwargs(embeds, None, None, None) is None
    with pytest.raises(ValueError):
        SDXL.added_cond_kwargs(PromptEmbeds(torch.zeros(1, 77, 64)), [(1, 1)], [(0, 0)], [(1, 1)])


def test_prompt_embeds_index_cat_and_move():
    hidden, pooled = torch.arange(3.0).reshape(3, 1, 1).expand(3, 77, 4), torch.arange(3.0).reshape(3, 1)
    embeds = PromptEmbeds(hidden, pooled)
    assert len(embeds) == 3
    assert embeds[1].hidden_states.shape == (1, 77, 4) and embeds[1].pooled.tolist() == [[1.0]]
    assert embeds[-1].pooled.tolist() == [[2.0]]
    joined = PromptEmbeds.cat([embeds[2], embeds[0:2]])
    assert joined.pooled.flatten().tolist() == [2.0, 0.0, 1.0]
    assert joined.hidden_states[:, 0, 0].tolist() == [2.0, 0.0, 1.0]
    half = joined.to(dtype=torch.float16)
    assert half.hidden_states.dtype == half.pooled.dtype == torch.float16
    assert PromptEmbeds.cat([PromptEmbeds(hidden[:1])] * 2).pooled is None
