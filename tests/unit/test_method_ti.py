"""Textual inversion on tiny SD1 and SDXL models: only the new vectors train, the file has ComfyUI's layout, the
held-out loss on the concept's images drops, and bad input fails early with the field's name."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from trainers.errors import ConfigError
from trainers.evaluate import heldout_loss
from trainers.loop import train
from trainers.methods.textual_inversion import (PlaceholderEmbedding, add_placeholder_embedding, expand_trigger,
                                                placeholder_tokens)
from trainers.models.families import SD1

from method_helpers import rebuilt_method
from train_helpers import make_images, tiny_config


def ti_config(tmp_path, images, **sections):
    sections["train"] = {"method": "textual_inversion", "learning_rate": 5e-2, "warmup_steps": 0,
                         **sections.get("train", {})}
    return tiny_config(tmp_path, images, **sections)


def small_encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=1, eos_token_id=2)).eval()


def test_placeholder_tokens_get_trainable_vectors_and_every_other_row_stays_fixed():
    encoder, tokenizer = small_encoder().requires_grad_(False), SD1.load_tokenizers()[0]
    before = encoder.get_input_embeddings().weight.detach().clone()
    plain = encoder(tokenizer(["a photo of a dog"], return_tensors="pt").input_ids)[0]
    patch = add_placeholder_embedding(encoder, tokenizer, placeholder_tokens("sks", 2), "dog")
    assert isinstance(encoder.get_input_embeddings(), PlaceholderEmbedding)
    assert tokenizer.tokenize("a sks sks_1, asks") == ["a</w>", "sks", "sks_1", ",</w>", "asks</w>"]
    dog = before[tokenizer("dog", add_special_tokens=False).input_ids].mean(0)
    assert torch.allclose(patch.vectors, dog.expand(2, -1))
    assert torch.equal(encoder(tokenizer(["a photo of a dog"], return_tensors="pt").input_ids)[0], plain)

    ids = tokenizer(["a photo of sks sks_1"], return_tensors="pt").input_ids
    hidden = encoder(ids)[0]
    (hidden * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert patch.vectors.grad is not None and patch.vectors.grad.abs().sum() > 0
    assert [id(p) for p in encoder.parameters() if p.requires_grad] == [id(patch.vectors)]
    assert torch.equal(patch.original.weight, before)


def test_pooling_still_finds_the_end_of_text_after_new_tokens():
    encoder, tokenizer = small_encoder(), SD1.load_tokenizers()[0]
    add_placeholder_embedding(encoder, tokenizer, ["sks"], "dog")
    assert encoder.eos_token_id == tokenizer.eos_token_id  # not the legacy 2, which pools at the largest id


def test_multi_vector_trigger_expands_as_whole_words_only():
    assert expand_trigger("sks, a photo of SKS dog", "sks", 3) == "sks sks_1 sks_2, a photo of sks sks_1 sks_2 dog"
    assert expand_trigger("asks sks-dog sks_1", "sks", 2) == "asks sks-dog sks_1"
    assert expand_trigger("a sks", "sks", 1) == "a sks"


def test_sd1_run_exports_emb_params_and_checkpoints_only_the_vectors(tmp_path, images):
    cfg = ti_config(tmp_path, images, steps=2, textual_inversion={"num_vectors": 3, "initializer": "disc"},
                    output={"sample_prompts": ["a photo of sks"], "sample_steps": 2})
    result = train(cfg)
    assert len([key for key in result.outputs if key.startswith("sample_")]) == 1  # the pipeline takes the new word
    with safe_open(result.outputs["model"], "pt") as f:
        assert list(f.keys()) == ["emb_params"]
        assert tuple(f.get_tensor("emb_params").shape) == (3, 32)
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
        assert f.metadata()["finetune_trigger_word"] == "sks"
    with safe_open(str(next((result.run_dir / "checkpoints").glob("step_*")) / "trainable.safetensors"), "pt") as f:
        assert list(f.keys()) == ["text_encoder_0.vectors"]


def test_sdxl_run_exports_one_tensor_per_text_encoder(tmp_path, images):
    result = train(ti_config(tmp_path, images, family="sdxl", steps=1, textual_inversion={"num_vectors": 2}))
    with safe_open(result.outputs["model"], "pt") as f:
        shapes = {key: tuple(f.get_tensor(key).shape) for key in f.keys()}
    assert shapes == {"clip_l": (2, 32), "clip_g": (2, 48)}


def test_heldout_loss_on_the_concept_drops(tmp_path, images):
    held_out = make_images(tmp_path / "held_out", count=2, seed=5)
    cfg = ti_config(tmp_path, images, steps=12, data={"validation_folder": str(held_out)},
                    train={"batch_size": 2}, textual_inversion={"initializer": "photo"})
    method, plan = rebuilt_method(cfg)
    before = heldout_loss(method, method.prepare_dataset(plan.validation))
    result = train(cfg)
    method, plan = rebuilt_method(cfg, result.run_dir)
    after = heldout_loss(method, method.prepare_dataset(plan.validation))
    print(f"textual inversion held-out denoising loss: before {before:.6f}, after {after:.6f}")
    assert after < before


@pytest.mark.parametrize("sections, field", [
    ({"data": {"trigger_word": ""}}, "data.trigger_word"),
    ({"data": {"trigger_word": "two words"}}, "data.trigger_word"),
    ({"textual_inversion": {"num_vectors": 0}}, "textual_inversion.num_vectors"),
    ({"dreambooth": {"enabled": True}, "data": {"class_noun": "disc"}}, "dreambooth.enabled"),
])
def test_bad_settings_name_the_field_before_loading_the_model(tmp_path, images, sections, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train(ti_config(tmp_path, images, **sections))


def test_a_word_the_tokenizer_already_knows_is_refused(tmp_path, images):
    with pytest.raises(ConfigError, match=r"data\.trigger_word.*made-up word"):
        train(ti_config(tmp_path, images, data={"trigger_word": "cat"}))
