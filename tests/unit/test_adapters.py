"""LoRA injection with peft: which modules are adapted, ranks and scales, frozen base, fp32 adapters, state round trip.

The tiny builders here are shared with test_export_lora.py: SD1-shaped (conv 1x1 proj_in/out) and SDXL-shaped
(linear projections, text-time embedding, a second text encoder with projection) models of a few hundred k params.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainers.adapters import (TEXT_ENCODER_TARGETS, UNET_TARGETS, add_text_encoder_lora, add_unet_lora,
                               load_lora_state, lora_layers, lora_parameters, lora_state)
from trainers.config import LoraConfig
from trainers.errors import ConfigError


def tiny_unet(family: str = "sd1", context_dim: int = 32, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    common = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  cross_attention_dim=context_dim, attention_head_dim=8)
    if family == "sd1":
        return UNet2DConditionModel(**common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return UNet2DConditionModel(**common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                                transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16)


def tiny_text_encoder(width: int = 32, *, with_projection: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=100, max_position_embeddings=16, projection_dim=16,
                            bos_token_id=98, eos_token_id=99, pad_token_id=99)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def unet_inputs(unet: UNet2DConditionModel, batch: int = 1, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    inputs = {"sample": torch.randn(batch, 4, 8, 8, generator=generator), "timestep": torch.tensor([500] * batch),
              "encoder_hidden_states": torch.randn(batch, 5, unet.config.cross_attention_dim, generator=generator)}
    if unet.config.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 16, generator=generator),
                                       "time_ids": torch.randn(batch, 6, generator=generator)}
    return inputs


def randomize_lora(*modules: torch.nn.Module, seed: int = 3, std: float = 0.2) -> None:
    """Non-zero up weights, so that an adapter changes the output (peft starts them at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in lora_parameters(module):
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def kinds(module: torch.nn.Module) -> dict[str, str]:
    return {name: type(layer.base_layer).__name__ for name, layer in lora_layers(module).items()}


# ---- which modules ---------------------------------------------------------------------------------------
def test_attention_targets_only_the_attention_projections():
    unet = tiny_unet("sd1")
    add_unet_lora(unet, LoraConfig(rank=4, alpha=4, targets="attention"))
    names = set(lora_layers(unet))
    # 3 transformer blocks (down 0, mid, up 1 x2) x 2 attentions x 4 projections
    transformer_blocks = [n for n, _ in unet.named_modules() if n.endswith("transformer_blocks.0")]
    assert len(names) == len(transformer_blocks) * 2 * 4 == 32
    assert {n.rsplit(".attn", 1)[1].split(".", 1)[1] for n in names} == {"to_q", "to_k", "to_v", "to_out.0"}


def test_each_wider_target_adds_what_it_names():
    counts = {}
    for targets in UNET_TARGETS:
        unet = tiny_unet("sd1")
        add_unet_lora(unet, LoraConfig(rank=4, alpha=4, targets=targets))
        counts[targets] = kinds(unet)
    ff = set(counts["attention_ff"]) - set(counts["attention"])
    assert ff and all(n.endswith(("ff.net.0.proj", "ff.net.2")) for n in ff)
    linear = set(counts["all_linear"]) - set(counts["attention_ff"])
    # SD1's proj_in/proj_out are 1x1 convolutions: only "all" adapts them.
    assert linear and all(n.endswith("time_emb_proj") for n in linear)
    conv = {n: k for n, k in counts["all"].items() if n not in counts["all_linear"]}
    assert set(conv.values()) == {"Conv2d"}
    endings = {n.rsplit(".", 1)[-1] for n in conv}
    assert endings == {"proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "conv"}
    assert any("downsamplers.0.conv" in n for n in conv) and any("upsamplers.0.conv" in n for n in conv)


def test_all_linear_adapts_linear_projections_of_an_sdxl_shaped_unet():
    unet = tiny_unet("sdxl")
    add_unet_lora(unet, LoraConfig(rank=4, alpha=4, targets="all_linear"))
    found = kinds(unet)
    assert set(found.values()) == {"Linear"}
    assert any(n.endswith("proj_in") for n in found) and any(n.endswith("proj_out") for n in found)


def test_conv_layers_get_conv_rank_and_1x1_layers_the_linear_rank():
    unet = tiny_unet("sd1")
    add_unet_lora(unet, LoraConfig(rank=6, alpha=3, targets="all", conv_rank=2, conv_alpha=1))
    for name, layer in lora_layers(unet).items():
        base = layer.base_layer
        spatial = isinstance(base, torch.nn.Conv2d) and base.kernel_size != (1, 1)
        rank, alpha = (2, 1) if spatial else (6, 3)
        assert (layer.r["default"], layer.lora_alpha["default"]) == (rank, alpha), name
        assert layer.scaling["default"] == pytest.approx(alpha / rank)
        down, up = layer.lora_A["default"], layer.lora_B["default"]
        if isinstance(base, torch.nn.Conv2d):
            assert (down.kernel_size, down.stride, down.padding) == (base.kernel_size, base.stride, base.padding)
            assert up.kernel_size == (1, 1)


def test_text_encoder_targets_and_rank_override_keep_the_scale():
    te = tiny_text_encoder()
    add_text_encoder_lora(te, LoraConfig(rank=8, alpha=4, targets="attention", text_encoder_rank=2))
    names = set(lora_layers(te))
    assert {n.rsplit(".", 1)[-1] for n in names} == set(TEXT_ENCODER_TARGETS["attention"])
    assert len(names) == 2 * 4
    layer = next(iter(lora_layers(te).values()))
    assert layer.r["default"] == 2 and layer.scaling["default"] == pytest.approx(4 / 8)

    wide = tiny_text_encoder()
    add_text_encoder_lora(wide, LoraConfig(rank=4, alpha=4, targets="attention_ff"))
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(wide)} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


# ---- behaviour -------------------------------------------------------------------------------------------
def test_injection_starts_as_identity_with_kohya_initialisation():
    unet = tiny_unet("sd1")
    inputs = unet_inputs(unet)
    before = unet(**inputs).sample
    add_unet_lora(unet, LoraConfig(rank=4, alpha=8, targets="all", conv_rank=2, conv_alpha=2))
    torch.testing.assert_close(unet(**inputs).sample, before, rtol=0, atol=0)
    for layer in lora_layers(unet).values():
        down = layer.lora_A["default"].weight
        fan_in = down[0].numel()
        # kaiming_uniform_(a=sqrt(5)) draws from +-1/sqrt(fan_in); up starts at zero (kohya does the same).
        assert 0 < down.abs().max() <= 1 / math.sqrt(fan_in)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_adapted_layer_computes_w_x_plus_alpha_over_rank_up_down_x():
    unet = tiny_unet("sd1")
    add_unet_lora(unet, LoraConfig(rank=4, alpha=2, targets="all", conv_rank=2, conv_alpha=3))
    randomize_lora(unet)
    layers = lora_layers(unet)
    linear = layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    x = torch.randn(3, 32)
    expected = linear.base_layer(x) + (2 / 4) * linear.lora_B["default"](linear.lora_A["default"](x))
    torch.testing.assert_close(linear(x), expected)
    conv = layers["down_blocks.0.downsamplers.0.conv"]
    image = torch.randn(1, 32, 8, 8)
    expected = conv.base_layer(image) + (3 / 2) * conv.lora_B["default"](conv.lora_A["default"](image))
    torch.testing.assert_close(conv(image), expected)
    assert expected.shape == (1, 32, 4, 4)


def test_only_adapters_train_and_stay_fp32_on_a_half_precision_base():
    unet = tiny_unet("sd1").to(torch.bfloat16)
    te = tiny_text_encoder().to(torch.float16)
    cfg = LoraConfig(rank=4, alpha=4, targets="all")
    add_unet_lora(unet, cfg)
    add_text_encoder_lora(te, cfg)
    for module, base_dtype in ((unet, torch.bfloat16), (te, torch.float16)):
        params = lora_parameters(module)
        trainable = [p for p in module.parameters() if p.requires_grad]
        assert params and {id(p) for p in trainable} == {id(p) for p in params}
        assert {p.dtype for p in params} == {torch.float32}
        assert {p.dtype for p in module.parameters() if not p.requires_grad} == {base_dtype}
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in unet_inputs(unet).items()}
    loss = unet(**inputs).sample.float().pow(2).mean()
    loss.backward()
    ups = [layer.lora_B["default"].weight for layer in lora_layers(unet).values()]
    assert all(p.grad is not None for p in lora_parameters(unet))
    assert all(p.grad.abs().sum() > 0 for p in ups)  # up starts at zero, so only its gradient is non-zero


def test_lora_state_round_trip_restores_outputs():
    cfg = LoraConfig(rank=4, alpha=4, targets="all", conv_rank=2, conv_alpha=2)
    unet = tiny_unet("sdxl")
    add_unet_lora(unet, cfg)
    randomize_lora(unet, seed=5)
    inputs = unet_inputs(unet)
    expected = unet(**inputs).sample
    state = lora_state(unet)
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert "default" not in "".join(state)
    assert len(state) == 2 * len(lora_layers(unet))

    other = tiny_unet("sdxl")
    add_unet_lora(other, cfg)
    load_lora_state(other, state)
    torch.testing.assert_close(other(**inputs).sample, expected, rtol=0, atol=0)
    randomize_lora(unet, seed=9)
    torch.testing.assert_close(other(**inputs).sample, expected, rtol=0, atol=0)  # a copy, not a view


def test_loading_a_state_made_with_other_settings_names_the_lora_section():
    unet = tiny_unet("sd1")
    add_unet_lora(unet, LoraConfig(rank=4, alpha=4, targets="attention"))
    state = lora_state(unet)
    wider = tiny_unet("sd1")
    add_unet_lora(wider, LoraConfig(rank=4, alpha=4, targets="attention_ff"))
    with pytest.raises(ConfigError, match="lora: .*does not match") as info:
        load_lora_state(wider, state)
    assert "ff.net" in str(info.value)
    bigger = tiny_unet("sd1")
    add_unet_lora(bigger, LoraConfig(rank=8, alpha=4, targets="attention"))
    with pytest.raises(ConfigError, match=r"has shape \(4, 32\), this run \(8, 32\)"):
        load_lora_state(bigger, state)
