"""ControlNet training on a tiny SD1 model: the exported layout, control maps that follow their image's crop and
flip, paired map folders, learning (the loss drops, the output comes to depend on the map), and bad input."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open

from trainers.config import DataConfig
from trainers.data.dataset import TrainingDataset, scan_dataset
from trainers.errors import ConfigError, DataError
from trainers.evaluate import heldout_loss
from trainers.export.controlnet import controlnet_to_original
from trainers.loop import train
from trainers.methods.controlnet import PairedMaps, generated_map

from method_helpers import rebuilt_method
from train_helpers import make_images, tiny_config


def controlnet_config(tmp_path, images, **sections):
    sections["train"] = {"method": "controlnet", "learning_rate": 1e-2, "warmup_steps": 0, **sections.get("train", {})}
    return tiny_config(tmp_path, images, **sections)


def test_export_layout_is_the_original_controlnet_one():
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
    state = ControlNetModel.from_unet(unet).state_dict()
    out = controlnet_to_original(state, unet.config)
    assert len(out) == len(state)
    assert {k.split(".")[0] for k in out} == {"time_embed", "input_blocks", "middle_block", "zero_convs",
                                             "input_hint_block", "middle_block_out"}
    hint = sorted({int(k.split(".")[1]) for k in out if k.startswith("input_hint_block.")})
    assert hint == list(range(0, 16, 2))  # convs at even places, SiLUs between them
    assert torch.equal(out["input_hint_block.14.weight"], state["controlnet_cond_embedding.conv_out.weight"])
    assert torch.equal(out["middle_block_out.0.bias"], state["controlnet_mid_block.bias"])
    zero_convs = {k for k in out if k.startswith("zero_convs.")}
    assert zero_convs == {f"zero_convs.{n}.0.{p}" for n in range(len(unet.down_blocks) * 2) for p in ("weight", "bias")}


def test_paired_maps_follow_the_crop_and_flip_of_their_image(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for n, size in enumerate([(96, 64), (64, 80), (64, 64)]):
        noise = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(n))
        Image.fromarray(noise.to(torch.uint8).numpy()).save(images / f"img_{n}.png")
    data = DataConfig(folder=str(images), resolution=64, buckets=False, crop="random", flip=True)
    dataset = TrainingDataset(scan_dataset(data).items, data, seed=1)
    paired = PairedMaps(images)  # the images are their own "maps": each must come out equal to its pixels
    paired.check(dataset)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            example = dataset[index]
            expected = (example["pixels"] + 1) / 2
            assert torch.allclose(paired.for_example(dataset, example), expected, atol=1 / 255 + 1e-6)
    assert generated_map("canny", example).shape == example["pixels"].shape


def test_run_exports_a_controlnet_file_and_trains_only_the_controlnet(tmp_path, images):
    result = train(controlnet_config(tmp_path, images, steps=2, data={"flip": True}))
    with safe_open(result.outputs["model"], "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1/controlnet"
        assert f.get_tensor("zero_convs.0.0.weight").dtype == torch.float16
    assert "input_hint_block.0.weight" in keys and "middle_block_out.0.weight" in keys
    assert not any(k.startswith(("output_blocks", "out.")) for k in keys)  # the decoder half stays the UNet's
    with safe_open(str(next((result.run_dir / "checkpoints").glob("step_*")) / "trainable.safetensors"), "pt") as f:
        assert all(k.startswith("controlnet.") for k in f.keys())


def test_loss_drops_and_the_output_comes_to_depend_on_the_control_map(tmp_path, images):
    held_out = make_images(tmp_path / "held_out", count=2, seed=5)
    cfg = controlnet_config(tmp_path, images, steps=12, data={"validation_folder": str(held_out)},
                            train={"batch_size": 2})
    untrained, plan = rebuilt_method(cfg)
    validation = untrained.prepare_dataset(plan.validation)
    before = heldout_loss(untrained, validation)
    result = train(cfg)
    trained, _ = rebuilt_method(cfg, result.run_dir)
    after = heldout_loss(trained, trained.prepare_dataset(plan.validation))

    example = validation[0]
    blank = {**example, "control": torch.zeros_like(example["control"])}

    def prediction(method, ex):
        latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return method.predict(latents, torch.tensor([500]), method.prep.prompt_embeds([ex["caption"]]),
                                  {key: [value] for key, value in ex.items()})

    assert torch.equal(prediction(untrained, example), prediction(untrained, blank))  # zero convolutions at start
    change = (prediction(trained, example) - prediction(trained, blank)).abs().mean().item()
    print(f"ControlNet held-out denoising loss: before {before:.6f}, after {after:.6f}; mean change of the trained "
          f"prediction when the canny map is blanked: {change:.6f}")
    assert after < before
    assert change > 1e-3


def test_paired_folder_trains_and_a_missing_map_is_named(tmp_path, images):
    maps = tmp_path / "maps"
    maps.mkdir()
    for path in sorted(images.glob("*.png")):
        Image.open(path).convert("L").resize((128, 128)).save(maps / f"{path.stem}.jpg")
    result = train(controlnet_config(tmp_path, images, steps=1, controlnet={"control_folder": str(maps)}))
    assert result.status == "succeeded"
    next(maps.glob("*.jpg")).unlink()
    with pytest.raises(DataError, match="have no control map of the same name"):
        train(controlnet_config(tmp_path / "b", images, steps=1, controlnet={"control_folder": str(maps)}))


def test_a_map_of_another_shape_is_refused(tmp_path, images):
    maps = tmp_path / "maps"
    maps.mkdir()
    for path in sorted(images.glob("*.png")):
        Image.new("RGB", (128, 64)).save(maps / path.name)
    cfg = controlnet_config(tmp_path, images, controlnet={"control_folder": str(maps)})
    method, plan = rebuilt_method(cfg)
    with pytest.raises(DataError, match="another aspect ratio"):
        method.prepare_dataset(plan.dataset)


@pytest.mark.parametrize("sections, field", [
    ({"controlnet": {"preprocessor": "hed"}}, "controlnet.preprocessor"),
    ({"controlnet": {"preprocessor": "depth"}}, "controlnet.preprocessor"),
    ({"controlnet": {"control_folder": "/no/such/folder"}}, "controlnet.control_folder"),
    ({"controlnet": {"conditioning_scale": 0.0}}, "controlnet.conditioning_scale"),
])
def test_bad_settings_name_the_field(tmp_path, images, sections, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train(controlnet_config(tmp_path, images, **sections))
