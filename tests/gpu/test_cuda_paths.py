"""The paths that only exist on a CUDA GPU: bf16 and fp16 mixed precision, 8-bit Adam, resume exactness on the GPU
(the fp16 loss scale included), EMA of a full fine-tune,
torch.compile with CUDA graphs.
Skipped (with the reason) on machines without CUDA; run them on a GPU with `pytest tests/gpu`."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from train_helpers import (assert_sampled_and_exported_the_ema_weights, make_images, read_events,  # noqa: E402
                           record_sampled_and_exported_unet, stop_then_resume, tiny_config)

from trainers.checkpointing import latest_checkpoint  # noqa: E402
from trainers.loop import train  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "images", count=6)


def _losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if e["event"] == "progress"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_lora_trains_on_the_gpu_and_exports_fp16_weights(tmp_path, images, precision):
    torch.cuda.reset_peak_memory_stats()
    result = train(tiny_config(tmp_path, images, steps=12, train={"mixed_precision": precision}))
    assert result.status == "succeeded"
    assert torch.cuda.max_memory_allocated() > 0, "the run did not use the GPU"
    losses = _losses(result.run_dir)
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    with safe_open(result.outputs["model"], "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors.values())
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert any(t.abs().max() > 0 for t in ups), "the LoRA up weights never moved from zero"


def test_8bit_adam_trains_a_lora(tmp_path, images):
    pytest.importorskip("bitsandbytes")
    result = train(tiny_config(tmp_path, images, steps=10,
                               train={"optimizer": "adamw8bit", "mixed_precision": "bf16"}))
    assert result.status == "succeeded"
    assert all(math.isfinite(v) for v in _losses(result.run_dir))


def test_full_finetune_in_bf16_with_ema_and_gradient_checkpointing(tmp_path, images, monkeypatch):
    seen = record_sampled_and_exported_unet(monkeypatch)
    result = train(tiny_config(tmp_path, images, steps=4,
                               train={"method": "full", "learning_rate": 1e-4, "mixed_precision": "bf16",
                                      "gradient_checkpointing": True}, full={"ema": True, "ema_decay": 0.5},
                               output={"sample_prompts": ["a red disc"], "sample_steps": 1}))
    assert_sampled_and_exported_the_ema_weights(result.run_dir, seen)
    with safe_open(result.outputs["model"], "pt") as f:
        keys = list(f.keys())
        first = f.get_tensor(next(k for k in keys if k.startswith("model.diffusion_model.")))
    assert first.dtype in (torch.float16, torch.bfloat16, torch.float32) and torch.isfinite(first.float()).all()


def test_resume_on_the_gpu_continues_the_same_curve(tmp_path, images):
    steps = 8
    straight = train(tiny_config(tmp_path / "a", images, steps=steps, train={"mixed_precision": "bf16"}))
    _, resumed = stop_then_resume(tiny_config(tmp_path / "b", images, steps=steps, train={"mixed_precision": "bf16"}),
                                  at_step=4)
    assert resumed.status == "succeeded"
    progress = [e for e in read_events(resumed.run_dir) if e["event"] == "progress"]
    assert [e["step"] for e in progress][4] == 5, "the resumed run restarted"
    want, got = _losses(straight.run_dir), [e["loss"] for e in progress]
    # GPU kernels are not bit-exact between runs: the curves agree closely, not to the last bit.
    for step, (a, b) in enumerate(zip(want, got), start=1):
        assert math.isclose(a, b, rel_tol=0.02, abs_tol=1e-3), f"step {step}: {a} vs {b}"


def test_fp16_resume_restores_the_loss_scale(tmp_path, images):
    settings = {"mixed_precision": "fp16"}
    straight = train(tiny_config(tmp_path / "a", images, steps=8, train=settings))
    _, resumed = stop_then_resume(tiny_config(tmp_path / "b", images, steps=8, train=settings), at_step=4)
    scalers = [torch.load(latest_checkpoint(run.run_dir) / "scaler.pt", weights_only=True)
               for run in (straight, resumed)]
    assert scalers[1] == scalers[0], "the resumed run's loss scaler started over"


@pytest.mark.parametrize("scope", ["unet", "blocks"])
@pytest.mark.parametrize("mode", ["reduce-overhead", "default"])
def test_compiled_unet_trains_like_the_eager_one_on_the_gpu(tmp_path, images, mode, scope):
    # Gradient accumulation and prior preservation call the compiled forward several times per step: CUDA graphs
    # must not hand back outputs that a later replay overwrote.
    settings = {"mixed_precision": "bf16", "gradient_accumulation": 2}
    prior = {"enabled": True, "class_folder": str(images), "num_class_images": 4}
    data = {"class_noun": "disc"}
    eager = train(tiny_config(tmp_path / "eager", images, steps=6, train=settings, data=data, dreambooth=prior))
    compiled = train(tiny_config(tmp_path / mode, images, steps=6, data=data, dreambooth=prior,
                                 train={**settings, "compile": True, "compile_mode": mode, "compile_scope": scope}))
    assert compiled.status == "succeeded"
    want, got = _losses(eager.run_dir), _losses(compiled.run_dir)
    assert len(got) == 6 and all(math.isfinite(v) for v in got)
    for step, (a, b) in enumerate(zip(want, got), start=1):
        assert math.isclose(a, b, rel_tol=0.05, abs_tol=2e-3), f"step {step}: eager {a} vs compiled {b}"
