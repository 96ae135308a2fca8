"""BLIP Caption, Apply LoRA and ControlNet Condition in a real ComfyUI server on the tiny models: what they produce,
that it changes the sampled images, and that every bad input ends as one clear error after which the server still
runs the next graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_controlnet
from tests.comfy.client import image_paths
from tests.unit.test_preprocess import save_tiny_depth_model
from tiny_models import BLIP_NAME
from trainers.export.lora import save_lora

SIDE = 64
STEPS = 3
SD1_UNET_ATTENTIONS = ("down_blocks_0_attentions_0", "mid_block_attentions_0", "up_blocks_1_attentions_0",
                       "up_blocks_1_attentions_1")
SD1_WIDTHS = {"down_blocks_0": 320, "mid_block": 640, "up_blocks_1": 320}
ATTENTION_LAYERS = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k",
                    "attn2_to_v", "attn2_to_out_0")
TEXT_LAYERS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")


# ---- graphs ------------------------------------------------------------------------------------------------
def txt2img(checkpoint: str, prefix: str, *, batch: int = 1, seed: int = 7) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a toy robot", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": batch}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": STEPS, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def with_lora(graph: dict, lora_name: str, strength: float = 1.0) -> dict:
    graph["lora"] = {"class_type": "FinetuneApplyLoRA", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": lora_name, "strength_model": strength,
        "strength_clip": strength}}
    graph["report"] = {"class_type": "PreviewAny", "inputs": {"source": ["lora", 2]}}
    graph["sampler"]["inputs"]["model"] = ["lora", 0]
    for encoder in ("pos", "neg"):
        graph[encoder]["inputs"]["clip"] = ["lora", 1]
    return graph


def with_controlnet(graph: dict, control_net: str, image: str, *, repeat: int = 1, preprocessor: str = "canny",
                    depth_model: str = "(none)") -> dict:
    graph["control_image"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    images = ["control_image", 0]
    if repeat > 1:
        graph["repeat"] = {"class_type": "RepeatImageBatch", "inputs": {"image": images, "amount": repeat}}
        images = ["repeat", 0]
    graph["control"] = {"class_type": "FinetuneControlNetCondition", "inputs": {
        "positive": ["pos", 0], "negative": ["neg", 0], "control_net": control_net, "image": images,
        "preprocessor": preprocessor, "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0,
        "low_threshold": 0.1, "high_threshold": 0.2, "threshold": 0.5, "blur": 1.0, "seed": 0,
        "depth_model": depth_model}}
    graph["sampler"]["inputs"].update(positive=["control", 0], negative=["control", 1])
    return graph


def pixels(comfy, comfy_server, graph: dict) -> np.ndarray:
    result = comfy.run(graph, timeout=600)
    assert result.status == "success", result.error
    return np.stack([np.asarray(Image.open(path), dtype=np.float32) / 255
                     for path in image_paths(result, comfy_server.output_dir)])


def differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def run_error(comfy, graph: dict) -> str:
    result = comfy.run(graph, timeout=600)
    assert result.status == "error", "the graph ran although its input is bad"
    return result.error.message


# ---- BLIP Caption ------------------------------------------------------------------------------------------
def caption_graph(folder: Path, **options) -> dict:
    return {
        "images": {"class_type": "FinetuneLoadTrainingImages", "inputs": {
            "folder": "(none)", "path": str(folder), "repeats": 1, "resolution": 64, "crop": "center", "flip": False,
            "bucketing": False}},
        "caption": {"class_type": "FinetuneBLIPCaption", "inputs": {
            "dataset": ["images", 0], "model": BLIP_NAME, "prompt": "a photo of", "trigger_word": "ohwx",
            "class_noun": "", "mode": "keep", "write_caption_files": True, "batch_size": 2, "max_length": 5,
            "num_beams": 1, **options}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["caption", 1]}},
    }


def shown_text(result, node: str = "show") -> str:
    return result.outputs[node]["text"][0]


def test_blip_caption_fills_missing_captions_writes_their_files_and_reports_progress(comfy, comfy_server):
    folder = comfy_server.input_dir / "caption_set"
    folder.mkdir()
    for n, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (80, 64), colour).save(folder / f"{n}.png")
    (folder / "1.txt").write_text("my own caption")

    with comfy.events() as events:
        result = comfy.run(caption_graph(folder), timeout=600)

    assert result.status == "success", result.error
    captions = shown_text(result).splitlines()
    assert captions[1] == "my own caption"
    assert all(c.startswith("ohwx, a photo of") for c in (captions[0], captions[2])), captions
    assert (folder / "0.txt").read_text() == captions[0] + "\n" and (folder / "2.txt").read_text() == captions[2] + "\n"
    assert (folder / "1.txt").read_text() == "my own caption"
    progress = [p for p in events.of_type("progress") if p["node"] == "caption"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 2, "2 images needed a caption"

    append = comfy.run(caption_graph(folder, mode="append", write_caption_files=False), timeout=600)
    assert append.status == "success", append.error
    appended = shown_text(append).splitlines()
    assert appended[1].startswith("my own caption, ohwx, a photo of")
    assert (folder / "1.txt").read_text() == "my own caption", "a file was written although the option is off"


def test_blip_caption_overwrites_captions_of_an_image_batch_and_writes_no_files(comfy, comfy_server):
    Image.new("RGB", (SIDE, SIDE), "yellow").save(comfy_server.input_dir / "caption_batch.png")
    graph = caption_graph(comfy_server.input_dir, mode="overwrite", class_noun="robot")
    graph["load"] = {"class_type": "LoadImage", "inputs": {"image": "caption_batch.png"}}
    graph["images"]["inputs"].update(images=["load", 0], captions="a caption given by hand")
    before = sorted(comfy_server.input_dir.rglob("*.txt"))

    result = comfy.run(graph, timeout=600)

    assert result.status == "success", result.error
    [caption] = shown_text(result).splitlines()
    assert caption.startswith("ohwx") and "a photo of" in caption and "by hand" not in caption
    assert sorted(comfy_server.input_dir.rglob("*.txt")) == before, "a caption file was written for pixels"


def test_blip_caption_offline_without_the_model_says_where_to_put_it(comfy, comfy_server):
    folder = comfy_server.input_dir / "offline_caption"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), "red").save(folder / "a.png")

    message = run_error(comfy, caption_graph(folder, model="Salesforce/blip-image-captioning-large"))

    assert "not downloaded" in message and str(comfy_server.models_dir / "blip" / "blip-image-captioning-large") in message
    assert "Traceback" not in message and not (folder / "a.txt").exists()


# ---- Apply LoRA --------------------------------------------------------------------------------------------
def kohya_lora(layers: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_features, in_features) in layers.items():
        state[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.3
        state[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.3
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    return state


def unet_layers(context_width: int) -> dict[str, tuple[int, int]]:
    layers = {}
    for block in SD1_UNET_ATTENTIONS:
        width = next(w for prefix, w in SD1_WIDTHS.items() if block.startswith(prefix))
        for layer in ATTENTION_LAYERS:
            source = context_width if layer in ("attn2_to_k", "attn2_to_v") else width
            layers[f"lora_unet_{block}_transformer_blocks_0_{layer}"] = (width, source)
    return layers


def text_layers(prefix: str, width: int, count: int) -> dict[str, tuple[int, int]]:
    return {f"{prefix}_text_model_encoder_layers_{i}_{layer}": (width, width)
            for i in range(count) for layer in TEXT_LAYERS}


@pytest.fixture(scope="module")
def loras(comfyui_dir) -> dict[str, str]:
    """LoRA files in the server's models/loras, by what they are."""
    folder = comfyui_dir / "models" / "loras"
    files = {
        "sd1": (kohya_lora({**unet_layers(768), **text_layers("lora_te", 768, 12)}), {"ss_base_model_version": "sd_v1"}),
        "sdxl": (kohya_lora({**unet_layers(2048), **text_layers("lora_te1", 768, 2), **text_layers("lora_te2", 1280, 2)}),
                 {}),
        "unrelated": (kohya_lora({"lora_unet_single_blocks_0_linear1": (64, 64)}), {}),
        "partly_unknown": (kohya_lora({**unet_layers(768), "lora_unet_single_blocks_0_linear1": (64, 64)}), {}),
    }
    names = {}
    for kind, (state, metadata) in files.items():
        names[kind] = f"test_generation_{kind}.safetensors"
        save_lora(folder / names[kind], state, metadata, overwrite=True)
    yield names
    for name in names.values():
        (folder / name).unlink(missing_ok=True)


def test_apply_lora_reports_the_layers_it_patched_and_changes_the_image(comfy, comfy_server, tiny_checkpoint, loras):
    plain = pixels(comfy, comfy_server, txt2img(tiny_checkpoint, "lora_off"))
    result = comfy.run(with_lora(txt2img(tiny_checkpoint, "lora_on"), loras["sd1"]), timeout=600)

    assert result.status == "success", result.error
    report = shown_text(result, "report")
    assert report.startswith(f"{loras['sd1']} (SD1.x LoRA) on SD1.x (SD15): 32 model layers (strength 1) and 48 "
                             "text-encoder layers (strength 1) patched"), report
    assert "skipped" not in report
    with_it = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255
                        for p in image_paths(result, comfy_server.output_dir)])
    assert differ(plain, with_it) > 0.01
    unchanged = pixels(comfy, comfy_server, with_lora(txt2img(tiny_checkpoint, "lora_zero"), loras["sd1"], 0.0))
    assert differ(plain, unchanged) == 0


def test_apply_lora_nodes_stack(comfy, comfy_server, tiny_checkpoint, loras):
    # The same LoRA twice at half strength patches the weights as once at full strength does, not as once at half.
    once = pixels(comfy, comfy_server, with_lora(txt2img(tiny_checkpoint, "lora_once"), loras["sd1"]))
    graph = with_lora(txt2img(tiny_checkpoint, "lora_twice"), loras["sd1"], 0.5)
    graph["lora_2"] = {"class_type": "FinetuneApplyLoRA", "inputs": {
        "model": ["lora", 0], "clip": ["lora", 1], "lora_name": loras["sd1"], "strength_model": 0.5,
        "strength_clip": 0.5}}
    graph["sampler"]["inputs"]["model"] = ["lora_2", 0]
    for encoder in ("pos", "neg"):
        graph[encoder]["inputs"]["clip"] = ["lora_2", 1]
    half = pixels(comfy, comfy_server, with_lora(txt2img(tiny_checkpoint, "lora_half"), loras["sd1"], 0.5))
    twice = pixels(comfy, comfy_server, graph)

    # Not bit-equal: each patch is rounded into the checkpoint's weight dtype on its own.
    assert differ(once, twice) < differ(half, twice) / 3 and differ(once, half) > 0.01


def test_apply_lora_names_the_tensors_it_could_not_place(comfy, tiny_checkpoint, loras):
    result = comfy.run(with_lora(txt2img(tiny_checkpoint, "lora_partly"), loras["partly_unknown"]), timeout=600)

    assert result.status == "success", result.error
    report = shown_text(result, "report")
    assert "32 model layers" in report and "3 of its 99 tensors matched nothing" in report
    assert "lora_unet_single_blocks_0_linear1" in report


def test_a_lora_of_another_family_is_refused_and_the_server_goes_on(comfy, comfy_server, tiny_checkpoint, loras):
    message = run_error(comfy, with_lora(txt2img(tiny_checkpoint, "lora_sdxl"), loras["sdxl"]))

    assert f"{loras['sdxl']} is an SDXL LoRA but the model is SD1.x (SD15)" in message
    assert "Traceback" not in message
    assert pixels(comfy, comfy_server, txt2img(tiny_checkpoint, "after_refusal")).shape == (1, SIDE, SIDE, 3)


def test_a_lora_of_which_nothing_applies_is_refused(comfy, tiny_checkpoint, loras):
    message = run_error(comfy, with_lora(txt2img(tiny_checkpoint, "lora_unrelated"), loras["unrelated"]))

    assert "none of its 3 tensors matches a layer of SD1.x (SD15)" in message


def test_a_missing_lora_file_says_where_to_put_it(comfy, comfy_server, tiny_checkpoint):
    message = run_error(comfy, with_lora(txt2img(tiny_checkpoint, "lora_missing"), "gone.safetensors"))

    assert "gone.safetensors is not in" in message and str(comfy_server.models_dir / "loras") in message


# ---- ControlNet Condition ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def control_net(comfyui_dir) -> str:
    return tiny_controlnet.install_into(comfyui_dir)


@pytest.fixture(scope="module")
def control_images(comfy_server) -> dict[str, str]:
    """Two different control images in the server's input folder."""
    names = {}
    for kind, box in (("square", (16, 16, 48, 48)), ("bar", (4, 28, 60, 36))):
        image = Image.new("RGB", (SIDE, SIDE), "black")
        image.paste((255, 255, 255), box)
        names[kind] = f"control_{kind}.png"
        image.save(comfy_server.input_dir / names[kind])
    return names


def test_controlnet_changes_the_image_and_follows_the_control_image(comfy, comfy_server, tiny_checkpoint, control_net,
                                                                    control_images):
    plain = pixels(comfy, comfy_server, txt2img(tiny_checkpoint, "cn_off"))
    graph = with_controlnet(txt2img(tiny_checkpoint, "cn_square"), control_net, control_images["square"])
    result = comfy.run(graph, timeout=600)
    assert result.status == "success", result.error
    square = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255
                       for p in image_paths(result, comfy_server.output_dir)])
    bar = pixels(comfy, comfy_server, with_controlnet(txt2img(tiny_checkpoint, "cn_bar"), control_net,
                                                      control_images["bar"]))

    assert differ(plain, square) > 0.01 and differ(square, bar) > 0.005
    [preview] = result.outputs["control"]["images"]
    assert preview["type"] == "temp" and preview["filename"].endswith(".png")


def test_one_control_image_serves_a_whole_batch_and_one_per_latent_too(comfy, comfy_server, tiny_checkpoint,
                                                                       control_net, control_images):
    for repeat in (1, 2):
        graph = with_controlnet(txt2img(tiny_checkpoint, f"cn_batch_{repeat}", batch=2), control_net,
                                control_images["square"], repeat=repeat)
        assert pixels(comfy, comfy_server, graph).shape == (2, SIDE, SIDE, 3)


def test_a_control_batch_that_does_not_match_the_latents_is_a_clear_error(comfy, comfy_server, tiny_checkpoint,
                                                                          control_net, control_images):
    graph = with_controlnet(txt2img(tiny_checkpoint, "cn_mismatch", batch=2), control_net, control_images["square"],
                            repeat=3)

    message = run_error(comfy, graph)

    assert "`image` holds 3 control images but the latent batch has 2" in message and "Traceback" not in message
    assert pixels(comfy, comfy_server, txt2img(tiny_checkpoint, "after_mismatch")).shape == (1, SIDE, SIDE, 3)


def test_a_control_image_of_another_shape_is_refused_and_a_larger_one_of_the_same_shape_is_scaled(
        comfy, comfy_server, tiny_checkpoint, control_net):
    for name, size in (("control_wide.png", (SIDE * 3 // 2, SIDE)), ("control_large.png", (SIDE * 2, SIDE * 2))):
        image = Image.new("RGB", size, "black")
        image.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4))
        image.save(comfy_server.input_dir / name)

    message = run_error(comfy, with_controlnet(txt2img(tiny_checkpoint, "cn_wide"), control_net, "control_wide.png"))

    assert f"the control image is {SIDE * 3 // 2}x{SIDE}" in message and f"resize the control image to {SIDE}x{SIDE}" \
        in message and "Traceback" not in message
    graph = with_controlnet(txt2img(tiny_checkpoint, "cn_large"), control_net, "control_large.png")
    assert pixels(comfy, comfy_server, graph).shape == (1, SIDE, SIDE, 3)


def test_depth_without_a_depth_model_says_what_to_download(comfy, tiny_checkpoint, control_net, control_images):
    graph = with_controlnet(txt2img(tiny_checkpoint, "cn_depth"), control_net, control_images["square"],
                            preprocessor="depth")

    message = run_error(comfy, graph)

    assert "`depth_model`" in message and "depth_estimation" in message and "download" in message


def test_normal_maps_come_from_a_depth_model_in_the_models_folder(comfy, comfy_server, comfyui_dir, tiny_checkpoint,
                                                                  control_net, control_images):
    folder = comfyui_dir / "models" / "depth_estimation" / "test-tiny-dpt"
    save_tiny_depth_model(folder)
    graph = with_controlnet(txt2img(tiny_checkpoint, "cn_normal"), control_net, control_images["square"],
                            preprocessor="normal", depth_model=folder.name)
    try:
        result = comfy.run(graph, timeout=600)
    finally:
        shutil.rmtree(folder)

    assert result.status == "success", result.error
    [preview] = result.outputs["control"]["images"]
    assert preview["type"] == "temp"
