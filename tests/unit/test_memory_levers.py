"""Each memory lever in a real CPU run of the tiny SD1.5: the loss curve of the run without it (fp8: close), an exact
resume, and the same LoRA file layout. That each lever lowers the peak memory of a step is in test_memory.py; that
ComfyUI uses every key of a LoRA trained with the levers is in tests/integration/test_comfy_lora.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open
from test_resume import assert_same_curve, progress_losses
from train_helpers import one_torch_thread, stop_then_resume, tiny_config

STEPS, STOP_AT = 4, 2
LEVERS = {"offload_encoders": {"offload_encoders": "on"}, "gradient_checkpointing": {"gradient_checkpointing": True},
          "fp8_base": {"fp8_base": "on"}}
FP8_TOLERANCE = 0.01
"""Relative, per step. e4m3 keeps 3 mantissa bits: each frozen weight is off by at most 1/16 of itself (one scale
per output channel), and these errors are independent, so a layer's output moves by about 1/16 / sqrt(fan-in) of its
size (under 1% for fan-in 64 and up); the loss, a mean over the whole output, moves less. Measured here: 0.2-0.4%; a scale 10% off gives 0.7-4%."""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


def lever_config(tmp_path: Path, images: Path, name: str):
    # memory = max_speed: no lever but the one under test
    return tiny_config(tmp_path / name, images, steps=STEPS, train={"memory": "max_speed", **LEVERS.get(name, {})})


@pytest.fixture(scope="module")
def plain(tmp_path_factory, images):
    """The run without levers: its loss curve and its exported LoRA."""
    from trainers.loop import train

    result = train(lever_config(tmp_path_factory.mktemp("levers"), images, "none"))
    return progress_losses(result.run_dir), _lora_layout(result)


def _lora_layout(result) -> dict[str, tuple[int, ...]]:
    with safe_open(result.outputs["model"], "pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


@pytest.mark.parametrize("lever", ["offload_encoders", "gradient_checkpointing"])
def test_a_lever_resumes_onto_the_loss_curve_of_the_run_without_it(tmp_path, images, plain, lever):
    """Stopped and resumed with the lever, the curve is that of the uninterrupted run without it."""
    _, resumed = stop_then_resume(lever_config(tmp_path, images, lever), STOP_AT)
    assert_same_curve(plain[0], progress_losses(resumed.run_dir))
    assert _lora_layout(resumed) == plain[1]


def test_fp8_weights_resume_exactly_and_stay_close_to_the_curve_without_them(tmp_path, images, plain):
    from trainers.loop import train

    straight = train(lever_config(tmp_path / "straight", images, "fp8_base"))
    _, resumed = stop_then_resume(lever_config(tmp_path / "stopped", images, "fp8_base"), STOP_AT)
    fp8 = progress_losses(straight.run_dir)
    assert_same_curve(fp8, progress_losses(resumed.run_dir))
    assert fp8 != plain[0]  # the weights really were rounded
    assert all(abs(a / b - 1) <= FP8_TOLERANCE for a, b in zip(fp8, plain[0], strict=True)), (fp8, plain[0])
    assert _lora_layout(resumed) == plain[1]


def test_unet_block_offload_trains_the_curve_of_the_run_without_it(tmp_path, images, plain):
    """On a CPU the blocks move from CPU memory to CPU memory (nothing saved), but the hooks run as on a GPU: the
    LoRA weights inside offloaded blocks still get their gradients and steps."""
    from safetensors.torch import load_file

    from trainers.loop import train

    cfg = tiny_config(tmp_path, images, steps=STEPS, train={"memory": "max_speed", "offload_unet": True})
    result = train(cfg)
    assert_same_curve(plain[0], progress_losses(result.run_dir))
    lora = load_file(result.outputs["model"])
    assert all(value.any() for key, value in lora.items() if "lora_up" in key)  # LoRA's up starts at zero
    assert _lora_layout(result) == plain[1]
