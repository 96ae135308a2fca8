"""DreamBooth LoRA on a tiny model really learns the instance, and prior preservation really protects the class.

The measure is the held-out denoising loss (`trainers.evaluate.heldout_loss`: fixed noise from a seed the training
never uses, fixed timesteps, plain MSE) on the instance images (caption "a photo of sks dog") and on the class
images ("a photo of dog"), for the base model and after DreamBooth with and without prior preservation.

Two things make the tiny random model a fair subject:
- its VAE's latents are tiny (std ~0.05 at SD's scaling factor), so the loss would hardly depend on the image:
  the base's `scaling_factor` is set so the test images' latents have unit std, as real SD latents do;
- a random UNet knows no class, so DreamBooth without prior would not make it forget anything: the base is first
  fully fine-tuned on the class images with the class prompt until it nearly memorises them.
Instance and class differ at low frequency (colours and layout), which is what survives the VAE.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from trainers.config import Config
from trainers.data.dataset import scan_class_images
from trainers.dreambooth import class_dataset
from trainers.evaluate import EVAL_TIMESTEPS, heldout_loss
from trainers.loop import train

from method_helpers import rebuilt_method

pytestmark = pytest.mark.slow

HELDOUT_SEED = 99_991
"""Noise of the held-out loss; no training below uses this seed (nor the prior stream's seed + 1)."""
PRETRAIN_SEED, DREAMBOOTH_SEED = 3, 7
TRIGGER, CLASS_NOUN = "sks", "dog"
CLASS_PROMPT = "a photo of dog"  # DreamBooth's default class prompt, "a photo of {class}"


def _make_images(folder: Path, kind: str, *, count: int = 4, seed: int, size: int = 64) -> Path:
    """class: a yellow disc upper left on blue; instance: a green disc lower right on orange (small jitter)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        def jitter() -> int:
            return int(rng.integers(-20, 21))

        if kind == "class":
            background, disc = (30 + jitter(), 60 + jitter(), 200 + jitter()), (230, 210, 40)
            cx, cy = 20 + jitter() // 4, 22 + jitter() // 4
        else:
            background, disc = (210 + jitter(), 80 + jitter(), 30 + jitter()), (40, 200, 60)
            cx, cy = 44 + jitter() // 4, 42 + jitter() // 4
        image = Image.new("RGB", (size, size), background)
        r = 14 + int(rng.integers(0, 4))
        ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=disc)
        image.save(folder / f"{kind}_{n:02d}.png")
    return folder


def _unit_latent_pipeline(target: Path, images: list[Path]) -> tuple[Path, float]:
    """A copy of the tiny SD1 pipeline whose VAE scaling factor gives `images` latents of unit std."""
    from diffusers import AutoencoderKL
    from tiny_models import tiny_pipeline_dir

    shutil.copytree(tiny_pipeline_dir("sd1"), target)
    vae = AutoencoderKL.from_pretrained(target, subfolder="vae")
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1)
                          .permute(2, 0, 1) for p in images])
    with torch.no_grad():
        std = float(vae.encode(pixels).latent_dist.mean.std())
    config_path = target / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["scaling_factor"] = 1.0 / std
    config_path.write_text(json.dumps(config, indent=2))
    return target, std


def _config(root: Path, base: Path, images: Path, name: str, **sections) -> Config:
    data = {
        "model": {"base": str(base)},
        "data": {"folder": str(images), "resolution": 64, "buckets": False},
        "train": {"mixed_precision": "no", "lr_scheduler": "constant", "warmup_steps": 0},
        "output": {"dir": str(root / "runs"), "name": name, "tensorboard": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Config.from_dict(data)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """Instance and class images, and a base model (diffusers folder) that is good at the class."""
    root = tmp_path_factory.mktemp("dreambooth")
    class_dir = _make_images(root / "class", "class", seed=10)
    instance_dir = _make_images(root / "instance", "instance", seed=20)
    scaled, raw_std = _unit_latent_pipeline(root / "scaled", sorted(class_dir.glob("*.png")) +
                                            sorted(instance_dir.glob("*.png")))
    # A full fine-tune of the UNet on the class (no EMA: the export must be the trained weights). Its export is a
    # single file, which would come back with SD's VAE scaling factor and fp16 weights: the trained fp32 UNet goes
    # into a copy of the scaled folder instead.
    pretrain = _config(root, scaled, class_dir, "pretrain", data={"default_caption": CLASS_PROMPT},
                       train={"method": "full", "steps": 200, "learning_rate": 1e-3, "batch_size": 4,
                              "seed": PRETRAIN_SEED}, full={"ema": False})
    result = train(pretrain)
    fine_tuned, _ = rebuilt_method(pretrain, result.run_dir)
    base = root / "base"
    shutil.copytree(scaled, base)
    fine_tuned.base.unet.save_pretrained(base / "unet", safe_serialization=True)
    return {"root": root, "class_dir": class_dir, "instance_dir": instance_dir, "base": base, "raw_std": raw_std}


def _dreambooth_config(setting, *, prior: bool, name: str) -> Config:
    return _config(
        setting["root"], setting["base"], setting["instance_dir"], name,
        data={"trigger_word": TRIGGER, "class_noun": CLASS_NOUN},
        train={"method": "lora", "steps": 200, "learning_rate": 3e-3, "batch_size": 1, "seed": DREAMBOOTH_SEED},
        lora={"rank": 8, "alpha": 8, "targets": "all", "conv_rank": 8, "conv_alpha": 8},
        dreambooth={"enabled": True, "prior_preservation": prior, "class_folder": str(setting["class_dir"]),
                    "num_class_images": 4})


def _losses(cfg: Config, class_dir: Path, run_dir: Path | None = None) -> tuple[float, float]:
    """(instance, class) held-out loss of the base (no run) or of the run's trained LoRA on it."""
    method, plan = rebuilt_method(cfg, run_dir)
    method.train_mode(False)
    classes = class_dataset(plan.cfg, scan_class_images(class_dir))
    assert {classes[i]["caption"] for i in range(len(classes))} == {CLASS_PROMPT}
    assert {plan.dataset[i]["caption"] for i in range(len(plan.dataset))} == {f"a photo of {TRIGGER} {CLASS_NOUN}"}
    return (heldout_loss(method, plan.dataset, seed=HELDOUT_SEED, timesteps=EVAL_TIMESTEPS),
            heldout_loss(method, classes, seed=HELDOUT_SEED, timesteps=EVAL_TIMESTEPS))


def test_dreambooth_lora_learns_the_instance_and_prior_preservation_protects_the_class(setting, capsys):
    assert HELDOUT_SEED not in (PRETRAIN_SEED, PRETRAIN_SEED + 1, DREAMBOOTH_SEED, DREAMBOOTH_SEED + 1)
    without_cfg = _dreambooth_config(setting, prior=False, name="without_prior")
    with_cfg = _dreambooth_config(setting, prior=True, name="with_prior")
    base = _losses(without_cfg, setting["class_dir"])  # LoRA up-weights start at zero: exactly the base model
    without = _losses(without_cfg, setting["class_dir"], train(without_cfg).run_dir)
    with_prior = _losses(with_cfg, setting["class_dir"], train(with_cfg).run_dir)

    drop = {name: 1 - losses[0] / base[0] for name, losses in (("without", without), ("with", with_prior))}
    change = {name: losses[1] - base[1] for name, losses in (("without", without), ("with", with_prior))}
    ratio = abs(change["with"]) / abs(change["without"])
    table = "\n".join([
        "",
        f"DreamBooth LoRA held-out denoising loss (seed {HELDOUT_SEED}, timesteps {list(EVAL_TIMESTEPS)}; "
        f"VAE scaling factor 1/{setting['raw_std']:.4f})",
        f"{'model':<16}{'instance':>10}{'class':>10}{'instance drop':>15}{'class change':>14}",
        f"{'base':<16}{base[0]:>10.4f}{base[1]:>10.4f}{'':>15}{'':>14}",
        f"{'without prior':<16}{without[0]:>10.4f}{without[1]:>10.4f}{drop['without']:>15.1%}"
        f"{change['without']:>+14.4f}",
        f"{'with prior':<16}{with_prior[0]:>10.4f}{with_prior[1]:>10.4f}{drop['with']:>15.1%}{change['with']:>+14.4f}",
        f"|class change with prior| / |without| = {ratio:.3f} (required <= 0.5)",
    ])
    with capsys.disabled():
        print(table)

    # the base is good at the class and not at the instance: there is something to learn and something to forget
    assert base[1] < 0.5 * base[0], table
    # DreamBooth lowers the instance's held-out loss by at least 30%, with and without prior preservation
    assert drop["without"] >= 0.30 and drop["with"] >= 0.30, table
    # without prior the class prompt drifts toward the instance: its loss gets clearly worse ...
    assert without[1] >= 1.5 * base[1], table
    # ... and prior preservation keeps that change to at most half
    assert ratio <= 0.5, table


def test_the_class_image_cache_follows_the_checkpoints_content_not_its_path(tmp_path):
    import shutil
    import types

    from trainers.config import Config
    from trainers.dreambooth import class_image_cache

    def folder_for(checkpoint):
        cfg = Config.from_dict({"model": {"base": str(checkpoint)}, "data": {"folder": "x", "class_noun": "dog"}})
        base = types.SimpleNamespace(source=checkpoint, family=types.SimpleNamespace(name="sd1"))
        return class_image_cache(cfg, base, tmp_path / "cache")

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"first weights")
    first = folder_for(checkpoint)
    copy = tmp_path / "elsewhere" / "renamed.safetensors"
    copy.parent.mkdir()
    shutil.copy(checkpoint, copy)

    assert folder_for(copy) == first
    checkpoint.write_bytes(b"other weights, same name")
    assert folder_for(checkpoint) != first
