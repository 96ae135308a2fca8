"""LoHa, LoKr and DoRA beside LoRA: they start as the identity, export in LyCORIS's layout with its metadata, scale as
ComfyUI's loader scales them, and a stopped run resumes exactly. (ComfyUI's own loading of the files is proved in
tests/integration/test_comfy_lora.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoKrConfig
from safetensors import safe_open

from trainers.adapters import add_text_encoder_lora, add_unet_lora, lora_layers, lora_parameters
from trainers.config import LoraConfig
from trainers.errors import ConfigError
from trainers.export.lora import _lycoris_weights, kohya_lora_state, lora_algorithm
from trainers.loop import train
from trainers.plan import make_plan

from train_helpers import make_images, read_events, stop_then_resume, tiny_config

ALGORITHMS = ("loha", "lokr", "dora")
OWN_WEIGHT = {"loha": ".hada_w1_a", "lokr": ".lokr_w1", "dora": ".dora_scale"}
NETWORK_ARGS = {"loha": {"algo": "loha"}, "lokr": {"algo": "lokr", "factor": "4"},
                "dora": {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("algorithms") / "images")


def progress_losses(run_dir) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if e["event"] == "progress"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_run_exports_lycoris_keys_and_metadata_and_resumes_exactly(tmp_path, images, algorithm):
    settings = {"lora": {"algorithm": algorithm, "targets": "all", "train_text_encoder": True, "lokr_factor": 4}}
    # two steps: the second, after the restart, is taken with the restored optimizer state and shows in the export
    straight = train(tiny_config(tmp_path / "a", images, steps=2, **settings))
    _, resumed = stop_then_resume(tiny_config(tmp_path / "b", images, steps=2, **settings), at_step=1)
    assert progress_losses(resumed.run_dir) == progress_losses(straight.run_dir)

    with safe_open(straight.outputs["model"], "pt") as exported, safe_open(resumed.outputs["model"], "pt") as again:
        keys, metadata = set(exported.keys()), exported.metadata()
        assert keys == set(again.keys())
        for key in keys:
            assert torch.equal(exported.get_tensor(key), again.get_tensor(key)), key
    assert lora_algorithm(dict.fromkeys(keys)) == algorithm
    low_rank_pairs = [key for key in keys if ".lora_down" in key or ".lora_up" in key]
    assert bool(low_rank_pairs) == (algorithm == "dora")  # DoRA is a LoRA with a magnitude beside it
    assert any(key.startswith("lora_te_") and OWN_WEIGHT[algorithm] in key for key in keys)
    assert any(key.startswith("lora_unet_") and "resnets" in key for key in keys)  # convolutions too
    assert metadata["ss_network_module"] == "lycoris.kohya"
    args = json.loads(metadata["ss_network_args"])
    assert args == {**NETWORK_ARGS[algorithm], "conv_dim": "8", "conv_alpha": "8.0"}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_an_injected_adapter_starts_as_the_identity_and_alone_trains(algorithm):
    layer = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Conv2d(32, 32, 3, padding=1))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.conv1 = layer[0], layer[1]

        def forward(self, x):
            return self.conv1(self.to_q(x).T.reshape(1, 32, 4, 4))

    from peft import inject_adapter_in_model

    from trainers.adapters import adapter_config

    model, x = Model(), torch.randn(16, 16)
    before = model(x)
    config = adapter_config(LoraConfig(algorithm=algorithm, rank=4, alpha=2), 4, 2.0, ["to_q", "conv1"])
    inject_adapter_in_model(config, model)
    assert len(lora_layers(model)) == 2
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(model)} and trainable


@pytest.mark.parametrize(("factor", "rank", "low_rank"), [(4, 64, False), (4, 1, True)])
def test_lokr_export_scales_as_loaders_do(factor, rank, low_rank):
    """ComfyUI and A1111 scale a LoKr by alpha / rank only when a factor is low-rank; peft always does."""
    from peft import inject_adapter_in_model

    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(64, 64))
    inject_adapter_in_model(LoKrConfig(r=rank, alpha=3.0, target_modules=["proj"], decompose_factor=factor,
                                       init_weights=False), model)
    layer = model.proj
    weights = _lycoris_weights(layer, "default")
    assert ("lokr_w2_a" in weights) == low_rank
    w2 = weights["lokr_w2_a"] @ weights["lokr_w2_b"] if low_rank else weights["lokr_w2"]
    loader_scale = 3.0 / weights["lokr_w2_b"].shape[0] if low_rank else 1.0
    loaded = torch.kron(weights["lokr_w1"], w2) * loader_scale
    torch.testing.assert_close(loaded, layer.get_delta_weight("default"), rtol=1e-6, atol=1e-7)


def test_kohya_state_of_a_text_encoder_loha_uses_its_alpha(tiny_sd1_text_encoder):
    add_text_encoder_lora(tiny_sd1_text_encoder, LoraConfig(algorithm="loha", rank=4, alpha=2))
    state = kohya_lora_state(None, [tiny_sd1_text_encoder], te_prefixes=("lora_te",))
    alphas = {float(value) for key, value in state.items() if key.endswith(".alpha")}
    assert alphas == {2.0}
    assert all(key.startswith("lora_te_text_model_encoder_layers_") for key in state)


@pytest.fixture
def tiny_sd1_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=100, max_position_embeddings=16))


@pytest.mark.parametrize(("sections", "field"), [
    ({"lora": {"algorithm": "loha", "dropout": 0.1}}, "lora.dropout"),
    ({"lora": {"algorithm": "lokr", "lokr_factor": 0}}, "lora.lokr_factor"),
    ({"lora": {"algorithm": "dora"}, "train": {"fp8_base": "on"}}, "train.fp8_base"),
    ({"lora": {"algorithm": "dora", "format": "peft", "train_text_encoder": True}}, "lora.format"),
])
def test_bad_algorithm_settings_name_the_field(tmp_path, images, sections, field):
    with pytest.raises(ConfigError) as caught:
        make_plan(tiny_config(tmp_path, images, **sections))
    assert caught.value.where == field


def test_the_memory_planner_leaves_fp8_base_weights_off_under_dora(tmp_path, images):
    from trainers.memory import known_shape, plan_for_config

    for algorithm, fp8 in (("lora", "on"), ("dora", "off")):
        cfg = tiny_config(tmp_path, images, lora={"algorithm": algorithm}, train={"memory": "lowest"})
        decided, _ = plan_for_config(cfg, known_shape("sd15"), available={"fused_backward"})
        assert decided.train.fp8_base == fp8, algorithm


def test_unet_targets_of_every_algorithm_are_the_same_modules(tmp_path):
    from diffusers import UNet2DConditionModel

    def targets(algorithm):
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=8, sample_size=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        add_unet_lora(unet, LoraConfig(algorithm=algorithm, rank=2, alpha=2, targets="all"))
        return set(lora_layers(unet))

    assert targets("loha") == targets("lokr") == targets("dora") == targets("lora")
