"""kohya LoRA export: key layout, weights that reproduce the adapted model, files, metadata, family detection.

ComfyUI itself loading these files is tested in tests/integration/test_comfy_lora.py.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

from tests.unit.test_adapters import randomize_lora, tiny_text_encoder, tiny_unet, unet_inputs
from trainers.adapters import add_text_encoder_lora, add_unet_lora, lora_layers
from trainers.config import Config, LoraConfig
from trainers.errors import ConfigError
from trainers.export.lora import kohya_lora_state, lora_family, save_lora, save_peft_lora
from trainers.export.metadata import checkpoint_metadata, lora_metadata

LOCON = LoraConfig(rank=4, alpha=2, targets="all", conv_rank=2, conv_alpha=3)
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def adapted_sd1(cfg: LoraConfig = LOCON):
    unet, te = tiny_unet("sd1"), tiny_text_encoder()
    add_unet_lora(unet, cfg)
    add_text_encoder_lora(te, cfg)
    randomize_lora(unet, te)
    return unet, te


def adapted_sdxl(cfg: LoraConfig = LOCON):
    unet = tiny_unet("sdxl")
    tes = [tiny_text_encoder(32), tiny_text_encoder(48, with_projection=True, seed=1)]
    add_unet_lora(unet, cfg)
    for te in tes:
        add_text_encoder_lora(te, cfg)
    randomize_lora(unet, *tes)
    return unet, tes


def modules_of(state: dict[str, torch.Tensor]) -> set[str]:
    return {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in state}


# ---- key layout ------------------------------------------------------------------------------------------
def test_sd1_keys_name_every_adapted_module_the_kohya_way():
    unet, te = adapted_sd1()
    state = kohya_lora_state(unet, [te], te_prefixes=("lora_te",))
    expected = {"lora_unet_" + name.replace(".", "_") for name in lora_layers(unet)}
    expected |= {"lora_te_text_model_" + name.replace(".", "_") for name in lora_layers(te)}
    assert modules_of(state) == expected
    assert len(state) == 3 * len(expected)
    assert {key[len(module):] for module in expected for key in state if key.startswith(module + ".")} == set(SUFFIXES)
    assert not [key for key in state if re.search(r"lora_A|lora_B|base_layer|default|\.processor", key)]
    for module in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
                   "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
                   "lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_down_blocks_0_resnets_0_conv1",
                   "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_1_mlp_fc2"):
        assert module in expected


def test_shapes_alpha_and_dtype_follow_kohya():
    unet, te = adapted_sd1()
    state = kohya_lora_state(unet, [te], te_prefixes=("lora_te",))
    to_k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    assert state[f"{to_k}.lora_down.weight"].shape == (4, 32) and state[f"{to_k}.lora_up.weight"].shape == (64, 4)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert state[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert state[f"{conv}.lora_up.weight"].shape == (32, 2, 1, 1)
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 1x1 conv: linear rank, 4-D
    assert state[f"{proj_in}.lora_down.weight"].shape == (4, 32, 1, 1)
    assert state[f"{to_k}.alpha"].ndim == 0 and state[f"{to_k}.alpha"].item() == 2.0
    assert state[f"{conv}.alpha"].item() == 3.0 and state[f"{proj_in}.alpha"].item() == 2.0
    assert {v.dtype for k, v in state.items() if not k.endswith(".alpha")} == {torch.float16}
    down = lora_layers(unet)["down_blocks.0.resnets.0.conv1"].lora_A["default"].weight
    torch.testing.assert_close(state[f"{conv}.lora_down.weight"], down.detach().half(), rtol=0, atol=0)


def test_sdxl_text_encoders_get_te1_and_te2_with_text_model_in_the_name():
    unet, tes = adapted_sdxl(LoraConfig(rank=4, alpha=4, targets="attention"))
    state = kohya_lora_state(unet, tes, te_prefixes=("lora_te1", "lora_te2"), dtype=torch.float32)
    modules = modules_of(state)
    te1 = {m for m in modules if m.startswith("lora_te1_")}
    te2 = {m for m in modules if m.startswith("lora_te2_")}
    # transformers names CLIPTextModel's layers without `text_model.` but ...WithProjection's with it
    assert not any(n.startswith("text_model.") for n in lora_layers(tes[0]))
    assert all(n.startswith("text_model.") for n in lora_layers(tes[1]))
    assert len(te1) == len(te2) == 8
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in te1
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in te2
    assert state["lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight"].shape == (4, 48)
    assert all(m.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for m in modules)


def test_modules_without_the_adapter_export_nothing():
    unet, _ = adapted_sd1()
    plain_te = tiny_text_encoder()
    state = kohya_lora_state(unet, [plain_te], te_prefixes=("lora_te",))
    assert state and not any(key.startswith("lora_te") for key in state)
    assert kohya_lora_state(None, [plain_te], te_prefixes=("lora_te",)) == {}


def test_exported_weights_merged_into_the_base_reproduce_the_adapted_unet():
    """Apply the file the way ComfyUI does (W += alpha / rank * up @ down) and compare with peft's forward."""
    base = tiny_unet("sdxl")
    unet = copy.deepcopy(base)
    add_unet_lora(unet, LOCON)
    randomize_lora(unet)
    inputs = unet_inputs(unet)
    expected = unet(**inputs).sample
    state = kohya_lora_state(unet, te_prefixes=(), dtype=torch.float32)
    merged = base.state_dict()
    by_flat_name = {key[:-len(".weight")].replace(".", "_"): key for key in merged if key.endswith(".weight")}
    for module in modules_of(state):
        name = by_flat_name[module[len("lora_unet_"):]]
        down, up = state[f"{module}.lora_down.weight"], state[f"{module}.lora_up.weight"]
        rank, alpha = down.shape[0], state[f"{module}.alpha"].item()
        delta = (up.flatten(1) @ down.flatten(1)).reshape(merged[name].shape)
        merged[name] = merged[name] + alpha / rank * delta
    base.load_state_dict(merged)
    assert (base(**inputs).sample - expected).abs().max() < 1e-5
    assert (expected - tiny_unet("sdxl")(**inputs).sample).abs().max() > 1e-2  # the adapter does change it


# ---- files -----------------------------------------------------------------------------------------------
def test_save_and_read_round_trip(tmp_path):
    unet, te = adapted_sd1()
    state = kohya_lora_state(unet, [te], te_prefixes=("lora_te",))
    metadata = {"ss_network_dim": "4", "modelspec.title": "tiny"}
    path = save_lora(tmp_path / "out" / "tiny.safetensors", state, metadata)
    assert path == tmp_path / "out" / "tiny.safetensors"
    assert [p.name for p in path.parent.iterdir()] == ["tiny.safetensors"]  # no temp file left behind
    read = load_file(path)
    with safe_open(path, "pt") as f:
        read_metadata = f.metadata()
    assert read_metadata == metadata
    assert read.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(read[key], state[key], rtol=0, atol=0)


def test_existing_file_is_refused_unless_overwrite(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_lora(path, {"a.alpha": torch.tensor(1.0)}, {})
    with pytest.raises(ConfigError, match="already exists") as info:
        save_lora(path, {"a.alpha": torch.tensor(2.0)}, {})
    assert str(path) in str(info.value) and "output.overwrite" in str(info.value)
    assert load_file(path)["a.alpha"].item() == 1.0
    save_lora(path, {"a.alpha": torch.tensor(2.0)}, {}, overwrite=True)
    assert load_file(path)["a.alpha"].item() == 2.0


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_peft_format_loads_back_through_diffusers(tmp_path, family):
    if family == "sd1":
        unet, te = adapted_sd1()
        tes, loader = [te], StableDiffusionLoraLoaderMixin
        fresh_unet, fresh_tes = tiny_unet("sd1"), [tiny_text_encoder()]
    else:
        unet, tes = adapted_sdxl()
        loader = StableDiffusionXLLoraLoaderMixin
        fresh_unet = tiny_unet("sdxl")
        fresh_tes = [tiny_text_encoder(32), tiny_text_encoder(48, with_projection=True, seed=1)]
    folder = save_peft_lora(tmp_path / "peft", unet, tes)
    assert [p.name for p in folder.iterdir()] == ["pytorch_lora_weights.safetensors"]
    with pytest.raises(ConfigError, match="already exists"):
        save_peft_lora(folder, unet, tes)

    state, alphas, metadata = loader.lora_state_dict(folder, return_lora_metadata=True)
    loader.load_lora_into_unet(state, alphas, fresh_unet, metadata=metadata)
    for prefix, fresh in zip(("text_encoder", "text_encoder_2"), fresh_tes):
        loader.load_lora_into_text_encoder(state, alphas, fresh, prefix=prefix, metadata=metadata)
    inputs = unet_inputs(unet)
    torch.testing.assert_close(fresh_unet(**inputs).sample, unet(**inputs).sample, rtol=0, atol=0)
    ids = torch.tensor([[98, 5, 17, 99]])
    for fresh, te in zip(fresh_tes, tes):
        torch.testing.assert_close(fresh(ids).last_hidden_state, te(ids).last_hidden_state, rtol=0, atol=0)


# ---- metadata --------------------------------------------------------------------------------------------
def run_config(**lora) -> Config:
    return Config.from_dict({
        "model": {"base": "/models/base.safetensors"},
        "data": {"folder": "/data/sks_dog", "resolution": 768, "trigger_word": "sks", "class_noun": "dog"},
        "train": {"steps": 800, "learning_rate": 1e-4, "text_encoder_lr": 5e-5, "batch_size": 2, "seed": 11,
                  "noise_offset": 0.05},
        "lora": {"rank": 16, "alpha": 8, "train_text_encoder": True, **lora},
        "output": {"name": "sks_dog"},
    })


RUN = dict(steps_done=640, num_images=12, tag_frequency={"sks": 12, "dog": 10}, started_at=1_700_000_000.5,
           finished_at=1_700_000_600.25, base_model_name="base.safetensors")


def test_lora_metadata_has_kohya_and_modelspec_values():
    cfg = run_config(targets="all", conv_rank=4, conv_alpha=2)
    meta = lora_metadata(cfg, family_name="sd2", prediction_type="v_prediction", **RUN)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("16", "8.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0"}
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["ss_v_parameterization"]) == ("sd_v2", "True", "True")
    assert (meta["ss_steps"], meta["ss_max_train_steps"], meta["ss_num_train_images"]) == ("640", "800", "12")
    assert meta["ss_resolution"] == "(768, 768)" and meta["ss_seed"] == "11"
    assert (meta["ss_unet_lr"], meta["ss_text_encoder_lr"], meta["ss_learning_rate"]) == ("0.0001", "5e-05", "0.0001")
    assert json.loads(meta["ss_tag_frequency"]) == {"sks_dog": {"sks": 12, "dog": 10}}
    assert float(meta["ss_training_started_at"]) == 1_700_000_000.5
    assert float(meta["ss_training_finished_at"]) == 1_700_000_600.25
    assert meta["ss_output_name"] == "sks_dog" and meta["ss_sd_model_name"] == "base.safetensors"
    assert meta["ss_batch_size_per_device"] == "2" and meta["ss_lr_scheduler"] == "constant_with_warmup"
    assert meta["ss_min_snr_gamma"] == "5.0" and meta["ss_noise_offset"] == "0.05"
    assert meta["ss_training_comment"] == "trigger word: sks, class: dog"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.resolution"] == "768x768"
    assert meta["modelspec.title"] == "sks_dog" and meta["modelspec.trigger_phrase"] == "sks"
    assert meta["modelspec.date"] == "2023-11-14T22:23:20Z"
    assert Config.from_dict(json.loads(meta["finetune_config"])) == cfg
    assert (meta["finetune_trigger_word"], meta["finetune_class_noun"]) == ("sks", "dog")


@pytest.mark.parametrize(("family", "prediction", "architecture", "version"), [
    ("sd1", "epsilon", "stable-diffusion-v1", "sd_v1"),
    ("sd2", "epsilon", "stable-diffusion-v2-512", "sd_v2"),
    ("sdxl", "epsilon", "stable-diffusion-xl-v1-base", "sdxl_base_v1-0"),
])
def test_architecture_per_family_for_loras_and_checkpoints(family, prediction, architecture, version):
    cfg = run_config()
    lora = lora_metadata(cfg, family_name=family, prediction_type=prediction, **RUN)
    full = checkpoint_metadata(cfg, family_name=family, prediction_type=prediction, **RUN)
    assert lora["modelspec.architecture"] == architecture + "/lora"
    assert full["modelspec.architecture"] == architecture
    assert lora["ss_base_model_version"] == full["ss_base_model_version"] == version
    assert lora["modelspec.prediction_type"] == "epsilon" and lora["ss_v_parameterization"] == "False"
    assert "ss_network_args" not in lora and "ss_network_dim" not in full
    assert lora_family({}, lora) == family


def test_save_rejects_non_text_metadata(tmp_path):
    with pytest.raises(TypeError, match="ss_network_dim"):
        save_lora(tmp_path / "x.safetensors", {"a.alpha": torch.tensor(1.0)}, {"ss_network_dim": 16})


# ---- family detection ------------------------------------------------------------------------------------
def test_lora_family_from_metadata_then_from_keys():
    assert lora_family({}, {"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert lora_family({}, {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}) == "sd2"
    assert lora_family({}, {"ss_base_model_version": "sd_v1"}) == "sd1"
    to_k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    assert lora_family({to_k: torch.zeros(4, 768)}, {}) == "sd1"
    assert lora_family({to_k: torch.zeros(4, 1024)}, {}) == "sd2"
    assert lora_family({to_k: torch.zeros(4, 2048)}, {}) == "sdxl"
    assert lora_family({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight":
                        torch.zeros(4, 2048)}, {}) == "sdxl"
    assert lora_family({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                        torch.zeros(4, 1280)}, {}) == "sdxl"
    assert lora_family({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                        torch.zeros(4, 1024)}, {}) == "sd2"
    assert lora_family({to_k: torch.zeros(4, 320)}, {}) is None
    assert lora_family({}, {"ss_network_dim": "4"}) is None


def test_lora_family_of_our_own_export():
    unet, tes = adapted_sdxl(LoraConfig(rank=4, alpha=4, targets="attention"))
    assert lora_family(kohya_lora_state(unet, tes, te_prefixes=("lora_te1", "lora_te2")), {}) == "sdxl"
