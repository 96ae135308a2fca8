"""Small training setups shared by the trainer's tests: a tiny model and a folder of generated images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))

from trainers.config import Config  # noqa: E402


def make_images(folder: Path, count: int = 4, size: int = 64, seed: int = 0, captions: bool = True) -> Path:
    """A red disc on varied backgrounds: a concept simple enough for a tiny model to learn in a few steps."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        background = tuple(int(v) for v in rng.integers(0, 255, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        r = size // 4 + int(rng.integers(0, size // 8))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(220, 30, 30))
        image.save(folder / f"img_{n:02d}.png")
        if captions:
            (folder / f"img_{n:02d}.txt").write_text("a red disc", encoding="utf-8")
    return folder


def tiny_config(tmp_path: Path, images: Path, *, family: str = "sd1", steps: int = 6, **sections) -> Config:
    from tiny_models import tiny_pipeline_dir

    data = {
        "model": {"base": str(tiny_pipeline_dir(family))},
        "data": {"folder": str(images), "resolution": 64, "buckets": False, "trigger_word": "sks"},
        "train": {"steps": steps, "learning_rate": 1e-3, "seed": 7, "min_snr_gamma": 5.0},
        "lora": {"rank": 4, "alpha": 4},
        "output": {"dir": str(tmp_path / "runs"), "name": "tiny", "tensorboard": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Config.from_dict(data)


# On a machine without GPUs, this is how accelerate starts two real CPU processes joined by gloo (with
# ACCELERATE_USE_CPU=1 in the environment); `--cpu` would silently run one.
TWO_CPU_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                     "--main_process_port", "0"]


def run_python(command: list[str], tmp_path: Path, *, extra_env=None, timeout: int = 600):
    """`command` in a child process that sees the repository, no model hub and no stray accelerate config."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def read_events(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


def stop_then_resume(cfg: Config, at_step: int):
    """Train `cfg`, stop it after step `at_step` (as Ctrl-C or Cancel would), then resume it to the end:
    (the stopped result, the resumed result)."""
    from trainers.events import StopSignal
    from trainers.loop import train

    stop = StopSignal()

    def stop_there(event):
        if event["event"] == "progress" and event["step"] == at_step:
            stop.request()

    first = train(cfg, callbacks=[stop_there], stop=stop)
    assert first.status == "stopped" and first.steps_done == at_step
    return first, train(cfg, resume=True)


def record_sampled_and_exported_unet(monkeypatch) -> dict:
    """Fills the returned dict with the UNet's weights as the sample images and the exported checkpoint use them."""
    import trainers.loop
    import trainers.methods.full

    seen = {}
    generate, save = trainers.loop.generate_images, trainers.methods.full.save_single_file

    def recording_generate(base, *args, **kwargs):
        seen["names"] = [name for name, _ in base.unet.named_parameters()]
        seen["sampled"] = {name: p.detach().to("cpu", copy=True) for name, p in base.unet.named_parameters()}
        return generate(base, *args, **kwargs)

    def recording_save(path, base, *, unet_state, **kwargs):
        seen["exported"] = {name: value.to("cpu", copy=True) for name, value in unet_state.items()}
        return save(path, base, unet_state=unet_state, **kwargs)

    monkeypatch.setattr(trainers.loop, "generate_images", recording_generate)
    monkeypatch.setattr(trainers.methods.full, "save_single_file", recording_save)
    return seen


def assert_sampled_and_exported_the_ema_weights(run_dir: Path, seen: dict) -> None:
    """The weights seen by `record_sampled_and_exported_unet` are the EMA weights of the run's last checkpoint,
    which differ from the trained weights."""
    import torch
    from safetensors.torch import load_file

    from trainers.checkpointing import latest_checkpoint

    checkpoint, names = latest_checkpoint(run_dir), seen["names"]
    extra, trainable = (load_file(str(checkpoint / f)) for f in ("extra.safetensors", "trainable.safetensors"))
    ema = {name: extra[f"ema.{n}"] for n, name in enumerate(names)}
    moved = [name for name in names if not torch.equal(ema[name], trainable[f"unet.{name}"])]
    assert len(moved) > len(names) // 2, "the EMA weights are the trained weights: the test would show nothing"
    for name in names:
        torch.testing.assert_close(seen["sampled"][name], ema[name], rtol=0, atol=0, msg=f"sampled {name}")
        torch.testing.assert_close(seen["exported"][name], ema[name], rtol=0, atol=0, msg=f"exported {name}")


def one_torch_thread():
    """For a test module's autouse fixture: torch on one thread while its tiny models train. On a shared 2-core
    machine two threads mostly wait for each other (a tiny instrumented training step: 7 s with two, 0.4 s with
    one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
