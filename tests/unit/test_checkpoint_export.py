"""Single-file export: diffusers -> original layout -> diffusers' own `from_single_file` gives back every tensor,
for SD1-, SD2- and SDXL-shaped models; full-size key names; atomic, non-overwriting writes; fp8 storage."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from scripts.tiny_models import tiny_pipeline_dir, tiny_single_file
from trainers.config import ModelConfig
from trainers.errors import ConfigError
from trainers.export.checkpoint import save_single_file, text_encoders_to_original, unet_to_original, vae_to_original
from trainers.models.families import SD1, SD2, SDXL, detect_family
from trainers.models.from_original import read_config
from trainers.models.loading import load_base_model

PIPELINES = {"sd1": StableDiffusionPipeline, "sd2v": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def load(path, **fields):
    return load_base_model(ModelConfig(base=str(path), **fields))


def assert_equal_states(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    left, right = expected.state_dict(), actual.state_dict()
    assert left.keys() == right.keys()
    different = [k for k in left if not torch.equal(left[k], right[k])]
    assert not different


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_round_trip_through_diffusers_from_single_file(name, tmp_path):
    folder = tiny_pipeline_dir(name)
    base = load(folder)
    path = save_single_file(tmp_path / "model.safetensors", base, dtype=torch.float32)
    pipe = PIPELINES[name].from_single_file(str(path), config=str(folder), local_files_only=True)
    assert_equal_states(base.unet, pipe.unet)
    assert_equal_states(base.vae, pipe.vae)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if name == "sdxl" else [])
    for mine, theirs in zip(base.text_encoders, encoders, strict=True):
        assert_equal_states(mine, theirs)
    assert detect_family(load_file(path), where=str(path)) == (base.family, base.prediction_type)


@pytest.mark.parametrize("family, prediction_type", [(SD1, "epsilon"), (SD2, "v_prediction"), (SDXL, "epsilon")])
def test_full_size_unet_and_vae_keys_invert_diffusers_conversion(family, prediction_type):
    """Without memory: the shipped full-size configs on the meta device, converted there and back."""
    folder = family.config_dir_for(prediction_type)
    unet_config, vae_config = read_config(folder, "unet"), read_config(folder, "vae")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
    original = unet_to_original(unet.state_dict(), unet.config)
    assert convert_ldm_unet_checkpoint(original, unet_config).keys() == unet.state_dict().keys()
    original_vae = vae_to_original(vae.state_dict())
    assert original_vae["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    back = convert_ldm_vae_checkpoint(original_vae, vae_config)
    assert back.keys() == vae.state_dict().keys()
    assert back["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)


def test_full_size_key_names_are_the_original_ones():
    with init_empty_weights():
        sd1 = UNet2DConditionModel.from_config(read_config(SD1.config_dir, "unet"))
        sdxl = UNet2DConditionModel.from_config(read_config(SDXL.config_dir, "unet"))
        vae = AutoencoderKL.from_config(read_config(SD1.config_dir, "vae"))
    keys = set(unet_to_original(sd1.state_dict(), sd1.config)) | set(vae_to_original(vae.state_dict()))
    for key in ("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.3.0.op.weight",
                "input_blocks.4.0.skip_connection.weight", "middle_block.1.proj_in.weight", "middle_block.2.emb_layers.1.bias",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.11.1.proj_out.weight",
                "time_embed.2.weight", "out.2.weight"):
        assert "model.diffusion_model." + key in keys
    for key in ("encoder.down.0.downsample.conv.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                "decoder.up.3.block.2.conv2.weight", "decoder.up.1.upsample.conv.weight", "decoder.norm_out.bias",
                "encoder.mid.block_2.conv1.weight", "decoder.mid.attn_1.proj_out.weight"):
        assert "first_stage_model." + key in keys
    assert len(sd1.state_dict()) == 686 == sum(k.startswith("model.diffusion_model.") for k in keys)
    xl = unet_to_original(sdxl.state_dict(), sdxl.config)
    for key in ("label_emb.0.2.weight", "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
                "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.0.skip_connection.weight"):
        assert "model.diffusion_model." + key in xl


def test_sd2_text_encoder_gets_the_layer_diffusers_drops(tmp_path):
    base = load(tiny_pipeline_dir("sd2v"))
    state = text_encoders_to_original(SD2, [base.text_encoders[0].state_dict()])
    layers = base.text_encoders[0].config.num_hidden_layers
    last = f"cond_stage_model.model.transformer.resblocks.{layers}."
    assert state[last + "attn.in_proj_weight"].shape == (3 * 32, 32)
    assert not state[last + "attn.in_proj_weight"].any() and not state[last + "mlp.c_proj.bias"].any()
    assert torch.equal(state["cond_stage_model.model.text_projection"], torch.eye(32))
    # q, k and v are merged in OpenCLIP's order
    q = base.text_encoders[0].encoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"][:32], q)

    # from a file, that layer is kept as it was
    original = load_file(tiny_single_file("sd2v"))
    original[last + "mlp.c_fc.weight"] = torch.randn_like(original[last + "mlp.c_fc.weight"])
    save_file(original, tmp_path / "sd2.safetensors")
    exported = save_single_file(tmp_path / "out.safetensors", load(tmp_path / "sd2.safetensors"), dtype=torch.float32)
    assert torch.equal(load_file(exported)[last + "mlp.c_fc.weight"], original[last + "mlp.c_fc.weight"])


def test_given_states_replace_the_base_ones(tmp_path):
    base = load(tiny_pipeline_dir("sd1"))
    unet_state = {k: v + 1 for k, v in base.unet.state_dict().items()}
    te_state = {k: v * 2 for k, v in base.text_encoders[0].state_dict().items()}
    path = save_single_file(tmp_path / "m.safetensors", base, unet_state=unet_state, text_encoder_states=[te_state],
                            metadata={"ss_output_name": "m"}, dtype=torch.float32)
    reloaded = load(path)
    assert torch.equal(reloaded.unet.conv_in.weight, base.unet.conv_in.weight + 1)
    assert torch.equal(reloaded.text_encoders[0].final_layer_norm.weight, base.text_encoders[0].final_layer_norm.weight * 2)
    assert_equal_states(base.vae, reloaded.vae)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"ss_output_name": "m"}


def test_refuses_to_overwrite_and_leaves_no_partial_files(tmp_path):
    base = load(tiny_pipeline_dir("sd1"))
    path = save_single_file(tmp_path / "m.safetensors", base)
    before = path.read_bytes()
    with pytest.raises(ConfigError) as error:
        save_single_file(path, base)
    assert str(path) in str(error.value) and "overwrite" in str(error.value)
    assert path.read_bytes() == before
    save_single_file(path, base, dtype=torch.float32, overwrite=True)
    assert path.stat().st_size > len(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_fp16_default_and_fp8_storage(tmp_path):
    base = load(tiny_pipeline_dir("sd1"))
    half = load_file(save_single_file(tmp_path / "half.safetensors", base))
    assert {v.dtype for v in half.values()} == {torch.float16}
    fp8 = load_file(save_single_file(tmp_path / "fp8.safetensors", base, dtype=torch.float8_e4m3fn))
    assert {v.dtype for k, v in fp8.items() if v.ndim >= 2} == {torch.float8_e4m3fn}
    assert {v.dtype for k, v in fp8.items() if v.ndim < 2} == {torch.float16}
    reloaded = load(tmp_path / "fp8.safetensors")
    expected = base.unet.conv_in.weight.to(torch.float8_e4m3fn).float()
    assert torch.equal(reloaded.unet.conv_in.weight, expected)


def test_sdxl_v_prediction_carries_the_marker(tmp_path):
    base = load(tiny_pipeline_dir("sdxl"), prediction_type="v_prediction")
    path = save_single_file(tmp_path / "v.safetensors", base)
    assert "v_pred" in load_file(path)
    assert load(path).prediction_type == "v_prediction"
    sd1 = load(tiny_pipeline_dir("sd1"), prediction_type="v_prediction")
    assert "v_pred" not in load_file(save_single_file(tmp_path / "sd1.safetensors", sd1))
