"""An SDXL marked v-prediction with zero terminal SNR (`v_pred` and `ztsnr`, as ComfyUI reads them) is detected,
trained with the velocity target on the rescaled schedule, and its exports carry the markers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainers.config import ModelConfig
from trainers.loop import train
from trainers.models.loading import load_base_model

from train_helpers import make_images, tiny_config


@pytest.fixture(scope="module")
def marked_sdxl(tmp_path_factory):
    """The tiny SDXL as single files with both markers and with `v_pred` alone, and as a diffusers folder whose
    scheduler says the same (v-prediction, rescale_betas_zero_snr)."""
    from tiny_models import tiny_pipeline_dir, tiny_single_file

    folder = tmp_path_factory.mktemp("ztsnr")
    state = load_file(str(tiny_single_file("sdxl")))
    plain = folder / "plain_vpred.safetensors"
    save_file({**state, "v_pred": torch.tensor([])}, str(plain))
    marked = folder / "vpred_ztsnr.safetensors"
    save_file({**state, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, str(marked))
    pipeline = shutil.copytree(tiny_pipeline_dir("sdxl"), folder / "pipeline")
    scheduler = pipeline / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    scheduler.write_text(json.dumps({**config, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    return marked, plain, pipeline, make_images(folder / "images", count=2)


def test_the_markers_select_velocity_and_the_zero_terminal_snr_schedule(marked_sdxl):
    marked, plain, pipeline, _ = marked_sdxl
    zero, ordinary = (load_base_model(ModelConfig(base=str(path))) for path in (marked, plain))
    assert (zero.prediction_type, zero.zero_terminal_snr) == ("v_prediction", True)
    assert (ordinary.prediction_type, ordinary.zero_terminal_snr) == ("v_prediction", False)
    assert zero.noise_scheduler.config.prediction_type == "v_prediction"
    assert float(zero.noise_scheduler.alphas_cumprod[-1]) < 1e-6 < float(ordinary.noise_scheduler.alphas_cumprod[-1])
    assert load_base_model(ModelConfig(base=str(pipeline))).zero_terminal_snr


def test_a_lora_and_a_checkpoint_trained_on_it_carry_the_markers(tmp_path, marked_sdxl):
    *_, pipeline, images = marked_sdxl
    lora = train(tiny_config(tmp_path / "lora", images, family="sdxl", steps=1, model={"base": str(pipeline)}))
    with safe_open(lora.outputs["model"], "pt") as f:
        metadata = f.metadata()
    assert (metadata["ss_v_parameterization"], metadata["ss_zero_terminal_snr"]) == ("True", "True")

    full = train(tiny_config(tmp_path / "full", images, family="sdxl", steps=1, model={"base": str(pipeline)},
                             train={"method": "full"}, full={"ema": False}))
    with safe_open(full.outputs["model"], "pt") as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys())
    exported = load_base_model(ModelConfig(base=full.outputs["model"]))
    assert (exported.prediction_type, exported.zero_terminal_snr) == ("v_prediction", True)
