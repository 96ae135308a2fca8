"""DDPO: the DDIM step's log-probability against diffusers' own step, per-prompt advantages, the rewards, a learning
run on a tiny model (the compressibility of fixed-seed samples rises), exact resume, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors import safe_open

from trainers.config import Config, DDPOConfig
from trainers.ddim_logprob import ddim_scheduler_for, ddim_step_with_logprob
from trainers.errors import ConfigError, DataError, ModelError
from trainers.events import StopSignal
from trainers.loop import train
from trainers.methods.ddpo import PromptStats
from trainers.rewards import jpeg_compressibility, jpeg_incompressibility, make_reward

from method_helpers import rebuilt_method
from test_tensorboard import read_tensorboard
from train_helpers import read_events

SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}


def ddpo_config(tmp_path, *, steps: int, **sections) -> Config:
    from tiny_models import tiny_pipeline_dir

    data = {
        "model": {"base": str(tiny_pipeline_dir("sd1"))},
        "data": {"resolution": 64},
        "train": {"method": "ddpo", "steps": steps, "batch_size": 4, "learning_rate": 3e-2, "warmup_steps": 0,
                  "seed": 3},
        "lora": {"rank": 8, "alpha": 8, "targets": "all"},
        "ddpo": {"prompts": ["a cat", "a dog"], "sample_steps": 4, "samples_per_epoch": 8, "sample_batch_size": 8,
                 "guidance": 1.0, "per_prompt_stats": False},
        "output": {"dir": str(tmp_path / "runs"), "name": "ddpo", "tensorboard": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Config.from_dict(data)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_matches_diffusers_and_scores_the_gaussian_density(prediction_type):
    config = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type).config
    scheduler = ddim_scheduler_for(config, 10, "cpu")
    reference = DDIMScheduler.from_config(config, set_alpha_to_one=False)
    reference.set_timesteps(10)
    assert torch.equal(scheduler.timesteps, reference.timesteps) and int(scheduler.timesteps[-1]) == 1
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in scheduler.timesteps:
        drawn, log_prob = ddim_step_with_logprob(scheduler, output, t, sample, eta=1.0,
                                                 generator=torch.Generator().manual_seed(0))
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(0))
        expected = reference.step(output, t, sample, eta=1.0, variance_noise=noise).prev_sample
        assert torch.allclose(drawn, expected, atol=1e-5)
        mean = reference.step(output, t, sample, eta=1.0, variance_noise=torch.zeros_like(noise)).prev_sample
        std = math.sqrt(reference._get_variance(t, t - 100))
        density = torch.distributions.Normal(mean, std).log_prob(drawn).mean(dim=(1, 2, 3))
        assert torch.allclose(log_prob, density, atol=1e-4) and torch.isfinite(log_prob).all()


def test_per_sample_timesteps_and_given_latents_agree_with_single_steps():
    scheduler = ddim_scheduler_for(DDPMScheduler(**SD_SCHEDULE).config, 4, "cpu")
    sample, output, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    steps = scheduler.timesteps[[0, 2, 3]]
    _, together = ddim_step_with_logprob(scheduler, output, steps, sample, eta=0.7, prev_sample=target)
    for n, t in enumerate(steps):
        _, alone = ddim_step_with_logprob(scheduler, output[n:n + 1], t, sample[n:n + 1], eta=0.7,
                                          prev_sample=target[n:n + 1])
        assert torch.allclose(together[n], alone[0])
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(scheduler, output, steps, sample, eta=0.0)


def test_advantages_are_normalised_per_prompt_once_it_has_enough_history():
    stats = PromptStats(buffer=4, min_count=2)
    first = stats.advantages(["a"], torch.tensor([1.0]))
    assert first.item() == 0.0  # alone in the batch: batch statistics
    rewards = torch.tensor([2.0, 10.0, 20.0])
    advantages = stats.advantages(["a", "b", "b"], rewards)
    assert advantages[0] == pytest.approx(1.0, abs=1e-4)  # "a" has history [1, 2]: mean 1.5, std 0.5
    assert advantages[1:].tolist() == pytest.approx([-1.0, 1.0], abs=1e-4)
    restored = PromptStats(buffer=4, min_count=2)
    restored.load_state(["a", "b"], stats.state(["a", "b"]))
    assert {k: list(v) for k, v in restored.history.items()} == {"a": [1.0, 2.0], "b": [10.0, 20.0]}


def test_jpeg_rewards_rank_flat_and_noisy_images():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    assert jpeg_compressibility(images, ["", ""]).argmax() == 0
    assert jpeg_incompressibility(images, ["", ""]).argmax() == 1


def test_model_rewards_load_from_local_folders(tmp_path):
    from tiny_models import tiny_blip_dir
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from trainers.models.families import SD1

    width = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1}
    clip = tmp_path / "clip"
    CLIPModel(CLIPConfig(text_config=width, vision_config={**width, "image_size": 32, "patch_size": 8},
                         projection_dim=8)).save_pretrained(clip)
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  SD1.load_tokenizers()[0]).save_pretrained(clip)
    head = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in ((8, 16), (16, 8), (8, 4), (4, 2), (2, 1))])
    torch.save({f"layers.{i}.{k}": v for i, layer in zip((0, 2, 4, 6, 7), head) for k, v in layer.state_dict().items()},
               tmp_path / "aesthetic.pth")
    images = torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    head_file = str(tmp_path / "aesthetic.pth")
    (tmp_path / "refs").mkdir()
    Image.new("RGB", (96, 64), (200, 40, 40)).save(tmp_path / "refs" / "red.png")
    references = {"reference_folder": str(tmp_path / "refs")}
    for options in ({"reward": "reference_similarity", "reward_model": str(clip), **references},
                    {"reward": "clip_score", "reward_model": str(clip)},
                    {"reward": "aesthetic", "reward_model": str(clip), "aesthetic_head": head_file},
                    {"reward": "blip_score", "reward_model": str(tiny_blip_dir())}):
        rewards = make_reward(DDPOConfig(**options), torch.device("cpu"))(images, ["a cat", "a dog"])
        assert rewards.shape == (2,) and torch.isfinite(rewards).all(), options["reward"]


def test_a_missing_reward_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match=r"ddpo\.reward_model = .*does not exist"):
        make_reward(DDPOConfig(reward="clip_score", reward_model=str(tmp_path / "nope")), torch.device("cpu"))
    with pytest.raises(ModelError, match=r"ddpo\.aesthetic_head"):
        make_reward(DDPOConfig(reward="aesthetic", reward_model=str(tmp_path), aesthetic_head=str(tmp_path / "x.pth")),
                    torch.device("cpu"))


@pytest.mark.parametrize("sections, field", [
    ({"ddpo": {"prompts": []}}, "ddpo.prompts"),
    ({"ddpo": {"prompt_file": "missing.txt"}}, "ddpo.prompt_file"),
    ({"ddpo": {"reward": "clip_score"}}, "ddpo.reward_model"),
    ({"ddpo": {"reward": "aesthetic", "reward_model": "clip"}}, "ddpo.aesthetic_head"),
    ({"ddpo": {"samples_per_epoch": 6}}, "ddpo.samples_per_epoch"),
    ({"ddpo": {"sample_batch_size": 3}}, "ddpo.sample_batch_size"),
    ({"ddpo": {"eta": 0.0}}, "ddpo.eta"),
    ({"lora": {"train_text_encoder": True}}, "lora.train_text_encoder"),
])
def test_bad_settings_name_the_field(tmp_path, sections, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train(ddpo_config(tmp_path, steps=1, **sections))


def test_compressibility_of_fixed_seed_samples_rises(tmp_path):
    cfg = ddpo_config(tmp_path, steps=8, train={"batch_size": 8, "gradient_accumulation": 4},
                      ddpo={"samples_per_epoch": 32, "sample_batch_size": 16})
    prompts = ["a cat", "a dog"] * 16
    method, _ = rebuilt_method(cfg)
    before = method.sample(prompts, seed=1234).rewards.mean().item()
    result = train(cfg)
    method, _ = rebuilt_method(cfg, result.run_dir)
    after = method.sample(prompts, seed=1234).rewards.mean().item()
    epochs = [round(e["reward_mean"], 4) for e in read_events(result.run_dir) if e["event"] == "progress"]
    print(f"DDPO jpeg compressibility (-kB) of 32 fixed-seed samples: before {before:.4f}, after {after:.4f}; "
          f"mean reward per epoch while training: {epochs}")
    assert after > before
    with safe_open(result.outputs["model"], "pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())
        assert f.metadata()["ss_network_dim"] == "8"


def test_a_stopped_run_resumes_exactly_mid_epoch(tmp_path):
    straight = train(ddpo_config(tmp_path / "a", steps=4))
    reference = [(e["loss"], e["reward_mean"]) for e in read_events(straight.run_dir) if e["event"] == "progress"]
    cfg = ddpo_config(tmp_path / "b", steps=4, output={"tensorboard": True})
    stop = StopSignal()
    first = train(cfg, callbacks=[lambda e: e["event"] == "progress" and e["step"] == 1 and stop.request()],
                  stop=stop)
    assert first.status == "stopped" and first.steps_done == 1
    train(cfg, resume=True)
    resumed = [(e["loss"], e["reward_mean"]) for e in read_events(first.run_dir) if e["event"] == "progress"]
    assert len(resumed) == 4
    for step, (want, got) in enumerate(zip(reference, resumed), start=1):
        assert want == pytest.approx(got, abs=1e-5), f"step {step}"
    rewards = read_tensorboard(first.run_dir).Scalars("train/reward_mean")
    assert [e.step for e in rewards] == [1, 2, 3, 4]
    assert [e.value for e in rewards] == pytest.approx([reward for _, reward in resumed])


def test_reference_similarity_prefers_images_like_the_references(tmp_path):
    from PIL import Image, ImageDraw

    references = tmp_path / "refs"
    references.mkdir()
    for n in range(2):  # blue sky over green ground, the horizon a little higher or lower
        image = Image.new("RGB", (96, 64), (40, 90, 220))
        ImageDraw.Draw(image).rectangle((0, 36 + 4 * n, 96, 64), fill=(30, 160, 40))
        image.save(references / f"ref_{n}.png")
    (references / "notes.txt").write_text("not an image")
    like = torch.zeros((1, 3, 64, 64))
    like[0, :, :38] = torch.tensor([40, 90, 220]).view(3, 1, 1) / 255
    like[0, :, 38:] = torch.tensor([30, 160, 40]).view(3, 1, 1) / 255
    unlike = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    upside_down = like.flip(-2)
    images = torch.cat([like, upside_down, unlike])

    rewards = make_reward(DDPOConfig(reward="reference_similarity", reference_folder=str(references)),
                          torch.device("cpu"))(images, ["", "", ""])

    assert rewards[0] > 0.9 and rewards[0] > rewards[1] > rewards[2], rewards


def test_reference_similarity_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no images"):
        make_reward(DDPOConfig(reward="reference_similarity", reference_folder=str(tmp_path / "empty")),
                    torch.device("cpu"))
