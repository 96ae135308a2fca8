"""Example workflow 3 (a LoRA with a canny ControlNet, img2img and inpainting) runs end to end in a real ComfyUI
on the tiny models; the test swaps only the model names and the step counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import tiny_controlnet
from tests.comfy.client import image_paths
from tests.comfy.workflow import to_api_graph
from tests.integration.test_generation_nodes import kohya_lora, text_layers, unet_layers
from tests.integration.test_server import FRONTEND_QUEUE, whole_numbers_as_int
from trainers.export.lora import save_lora

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "example_workflows" / "03_lora_controlnet.json"
LORA_NAME = "test_example_3.safetensors"
SIDE = 64


def test_example_3_runs_end_to_end(comfy, comfy_server, comfyui_dir, tiny_checkpoint):
    control_net = tiny_controlnet.install_into(comfyui_dir)
    lora_path = comfyui_dir / "models" / "loras" / LORA_NAME
    save_lora(lora_path, kohya_lora({**unet_layers(768), **text_layers("lora_te", 768, 12)}),
              {"ss_base_model_version": "sd_v1"}, overwrite=True)
    # The workflow loads ComfyUI's example.png; a small picture of the same name keeps the run tiny.
    photo = Image.open(REPO / "assets" / "sample_images" / "robot_01.png").convert("RGB").resize((SIDE, SIDE))
    photo.save(comfy_server.input_dir / "example.png")
    workflow = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert (EXAMPLE.with_suffix(".jpg")).is_file(), "the example has no thumbnail"

    graph = to_api_graph(workflow, comfy.object_info())
    swapped = {"CheckpointLoaderSimple": {"ckpt_name": tiny_checkpoint}, "FinetuneApplyLoRA": {"lora_name": LORA_NAME},
               "FinetuneControlNetCondition": {"control_net": control_net}, "KSampler": {"steps": 2}}
    for node in graph.values():
        node["inputs"].update(swapped.get(node["class_type"], {}))
    try:
        result = comfy.run(graph, timeout=900)
    finally:
        lora_path.unlink(missing_ok=True)

    assert result.status == "success", result.error
    saved = {path.name.rsplit("_", 2)[0]: path for path in image_paths(result, comfy_server.output_dir)}
    assert sorted(saved) == ["lora_controlnet", "lora_img2img", "lora_inpaint"]
    assert all(Image.open(path).size == (SIDE, SIDE) for path in saved.values())
    [report] = [output["text"][0] for output in result.outputs.values() if "text" in output]
    assert report.startswith(f"{LORA_NAME} (SD1.x LoRA) on SD1.x (SD15): 32 model layers")
    control_types = {node["class_type"] for node in graph.values()}
    assert {"VAEEncode", "SetLatentNoiseMask", "FinetuneControlNetCondition"} <= control_types
    denoise = sorted(node["inputs"]["denoise"] for node in graph.values() if node["class_type"] == "KSampler")
    assert denoise[0] == 0.6, "the img2img sampler should keep the photo's layout"


@pytest.mark.browser
def test_the_frontend_loads_example_3_and_queues_what_the_test_runs(comfy, comfy_page):
    workflow = json.loads(EXAMPLE.read_text(encoding="utf-8"))

    queued_by_frontend = comfy_page.page.evaluate(FRONTEND_QUEUE, workflow)

    # Preview Any's text box is the frontend's own widget: it sends its content along, the server ignores it.
    for node in queued_by_frontend.values():
        if node["class_type"] == "PreviewAny":
            node["inputs"].pop("preview", None)
    assert whole_numbers_as_int(to_api_graph(workflow, comfy.object_info())) == whole_numbers_as_int(queued_by_frontend)
