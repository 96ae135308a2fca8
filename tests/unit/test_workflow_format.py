"""The saved-workflow → API-graph converter, on stock ComfyUI workflows and on small graphs of stock nodes.

Fixtures in tests/comfy/fixtures/: `object_info_0.3.75.json` is a subset of `/object_info` recorded from a stock
ComfyUI 0.3.75 server (no models installed); `default_txt2img.json` and `image2image.json` are the "default"
and "image2image" templates of ComfyUI's workflow templates package (MIT), as the frontend saved them.
"""

from __future__ import annotations

import pytest

from tests.comfy import sample_workflows as samples
from tests.comfy.sample_workflows import node, workflow
from tests.comfy.workflow import BYPASSED, MUTED, WorkflowError, to_api_graph, widget_slots

OBJECT_INFO = samples.load_fixture("object_info_0.3.75.json")


def test_stock_default_graph_converts_to_the_api_graph_the_frontend_queues():
    api = to_api_graph(samples.load_fixture("default_txt2img.json"), OBJECT_INFO)

    assert api == {
        "3": {"class_type": "KSampler", "_meta": {"title": "KSampler"}, "inputs": {
            "seed": 685468484323813, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "_meta": {"title": "Load Checkpoint"},
              "inputs": {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "_meta": {"title": "Empty Latent Image"},
              "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "_meta": {"title": "CLIP Text Encode (Prompt)"}, "inputs": {
            "text": "beautiful scenery nature glass bottle landscape, purple galaxy bottle,", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "_meta": {"title": "CLIP Text Encode (Prompt)"},
              "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "_meta": {"title": "VAE Decode"},
              "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "_meta": {"title": "Save Image"},
              "inputs": {"filename_prefix": "SD1.5", "images": ["8", 0]}},
    }


def test_stock_image2image_skips_notes_and_the_upload_button_and_maps_a_v3_node():
    api = to_api_graph(samples.load_fixture("image2image.json"), OBJECT_INFO)

    assert sorted(api, key=int) == ["3", "6", "7", "8", "9", "10", "12", "14", "18"]  # no MarkdownNotes
    assert api["10"]["inputs"] == {"image": "image2image_input_image.jpg"}
    assert api["18"] == {"class_type": "ImageScaleToTotalPixels", "_meta": {"title": "ImageScaleToTotalPixels"},
                         "inputs": {"upscale_method": "nearest-exact", "megapixels": 0.5, "image": ["10", 0]}}
    assert api["3"]["inputs"]["denoise"] == 0.87
    assert api["3"]["inputs"]["latent_image"] == ["12", 0]


def test_seed_control_slots_are_skipped_for_legacy_and_v3_nodes():
    assert widget_slots(OBJECT_INFO["KSampler"]) == [
        "seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    assert widget_slots(OBJECT_INFO["KSamplerAdvanced"]) == [
        "add_noise", "noise_seed", None, "steps", "cfg", "sampler_name", "scheduler",
        "start_at_step", "end_at_step", "return_with_leftover_noise"]
    # V3 node whose seed input does not say control_after_generate: the frontend adds the control by name
    assert widget_slots(OBJECT_INFO["TrainLoraNode"])[7:10] == ["seed", None, "training_dtype"]
    assert widget_slots(OBJECT_INFO["PrimitiveInt"]) == ["value", None]
    # forceInput inputs are sockets, not widgets
    assert widget_slots(OBJECT_INFO["CreateHookKeyframesFromFloats"]) == ["start_percent", "end_percent", "print_keyframes"]


def test_ksampler_advanced_values_land_on_their_inputs():
    graph = samples.ksampler_advanced()

    inputs = to_api_graph(graph, OBJECT_INFO)["2"]["inputs"]

    assert inputs == {"add_noise": "enable", "noise_seed": 99, "steps": 12, "cfg": 5.0, "sampler_name": "ddim",
                      "scheduler": "karras", "start_at_step": 2, "end_at_step": 10,
                      "return_with_leftover_noise": "disable", "model": ["1", 0]}


def test_primitive_node_value_replaces_the_converted_widget():
    graph = samples.seed_from_primitive_node()

    api = to_api_graph(graph, OBJECT_INFO)

    assert api["3"]["inputs"]["seed"] == 1234
    assert "5" not in api


def test_v3_primitive_int_is_a_real_node_and_feeds_a_link():
    graph = samples.seed_from_v3_primitive_int()

    api = to_api_graph(graph, OBJECT_INFO)

    assert api["5"] == {"class_type": "PrimitiveInt", "_meta": {"title": "Int"}, "inputs": {"value": 77}}
    assert api["3"]["inputs"]["seed"] == ["5", 0]


def test_reroutes_are_followed_to_the_real_output():
    graph = samples.model_through_two_reroutes()

    api = to_api_graph(graph, OBJECT_INFO)

    assert api["3"]["inputs"]["model"] == ["1", 0]
    assert set(api) == {"1", "3"}


def test_bypassed_node_passes_each_input_through_by_type():
    api = to_api_graph(samples.lora_between_checkpoint_and_sampler(BYPASSED), OBJECT_INFO)

    assert "2" not in api
    assert api["3"]["inputs"]["model"] == ["1", 0]
    assert api["4"]["inputs"]["clip"] == ["1", 1]


def test_muted_node_is_left_out_with_the_inputs_it_fed():
    api = to_api_graph(samples.lora_between_checkpoint_and_sampler(MUTED), OBJECT_INFO)

    assert "2" not in api
    assert "model" not in api["3"]["inputs"]
    assert api["4"]["inputs"] == {"text": "a toy robot"}


def test_active_lora_is_linked_and_keeps_its_widgets():
    api = to_api_graph(samples.lora_between_checkpoint_and_sampler(0), OBJECT_INFO)

    assert api["2"]["inputs"] == {"lora_name": "style.safetensors", "strength_model": 0.8, "strength_clip": 1.0,
                                  "model": ["1", 0], "clip": ["1", 1]}
    assert api["3"]["inputs"]["model"] == ["2", 0]


def test_object_links_dict_widget_values_titles_and_list_values():
    graph = {"nodes": [
        node(1, "KSamplerSelect", {"sampler_name": "lcm"}, outputs=("SAMPLER",), title="My sampler"),
        node(2, "PrimitiveString", ["a toy"], outputs=("STRING",)),
        node(3, "CLIPTextEncode", ["x"], inputs=(("text", "STRING", 5, "text"),)),
        node(4, "KSamplerSelect", {"sampler_name": ["euler", "lcm"]}, outputs=("SAMPLER",)),
    ], "links": [{"id": 5, "origin_id": 2, "origin_slot": 0, "target_id": 3, "target_slot": 0, "type": "STRING"}]}

    api = to_api_graph(graph, OBJECT_INFO)

    assert api["1"] == {"class_type": "KSamplerSelect", "_meta": {"title": "My sampler"}, "inputs": {"sampler_name": "lcm"}}
    assert api["2"]["inputs"] == {"value": "a toy"}
    assert api["4"]["inputs"] == {"sampler_name": {"__value__": ["euler", "lcm"]}}  # a list is not a link
    assert api["3"]["inputs"]["text"] == ["2", 0]


def test_a_widget_the_node_gained_after_the_save_gets_its_default_as_the_frontend_gives_it():
    newer = {**OBJECT_INFO["ImageScaleToTotalPixels"]}
    newer["input"] = {"required": {**newer["input"]["required"],
                                   "resolution_steps": ["INT", {"default": 1, "min": 1, "max": 256}],
                                   "crop": ["COMBO", {"options": ["disabled", "center"]}]}}
    newer["input_order"] = {"required": [*OBJECT_INFO["ImageScaleToTotalPixels"]["input_order"]["required"],
                                         "resolution_steps", "crop"]}
    saved = workflow(node(18, "ImageScaleToTotalPixels", ["nearest-exact", 0.5]))

    inputs = to_api_graph(saved, {**OBJECT_INFO, "ImageScaleToTotalPixels": newer})["18"]["inputs"]

    assert inputs == {"upscale_method": "nearest-exact", "megapixels": 0.5, "resolution_steps": 1, "crop": "disabled"}


def test_unknown_node_type_names_the_node():
    with pytest.raises(WorkflowError, match=r"node 9 is of type 'NoSuchNode'"):
        to_api_graph(workflow(node(9, "NoSuchNode", [])), OBJECT_INFO)


def test_values_that_no_longer_line_up_are_refused():
    shifted = node(3, "KSampler", [7, 4, 6.5, "euler", "normal", 1.0])  # the control slot is missing

    with pytest.raises(WorkflowError, match=r"node 3 \(KSampler\): widget 'cfg' expects FLOAT"):
        to_api_graph(workflow(shifted), OBJECT_INFO)


def test_subgraphs_and_api_graphs_are_refused_with_a_fix():
    sub = workflow(node(4, "0b5f-uuid", []))
    sub["definitions"] = {"subgraphs": [{"id": "0b5f-uuid"}]}

    with pytest.raises(WorkflowError, match="Unpack Subgraph"):
        to_api_graph(sub, OBJECT_INFO)
    with pytest.raises(WorkflowError, match="no 'nodes' list"):
        to_api_graph({"3": {"class_type": "KSampler", "inputs": {}}}, OBJECT_INFO)
