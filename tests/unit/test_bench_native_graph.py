"""The bench's native graph follows the TrainLoraNode of the ComfyUI it runs on: 0.3.75's (MODEL output first) and
0.33's (new inputs at their defaults, no MODEL output). Fixtures: /object_info entries recorded from each."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.comfy import sample_workflows as samples

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from harness.native_trainer import native_graph  # noqa: E402
from harness.our_trainer import Setup  # noqa: E402

SETUP = Setup(checkpoint=Path("tiny.safetensors"), images=Path("images"), steps=12, rank=8, learning_rate=1e-4,
              batch_size=1, resolution=64)
NODE_0_3_75 = samples.load_fixture("object_info_0.3.75.json")["TrainLoraNode"]
NODE_0_33 = samples.load_fixture("train_lora_node_0.33.0.json")["TrainLoraNode"]


def test_on_0_3_75_nothing_is_defaulted_and_save_reads_outputs_1_and_3():
    graph, defaulted = native_graph("tiny.safetensors", SETUP, NODE_0_3_75, gradient_checkpointing=True)

    assert defaulted == {}
    assert graph["5"]["inputs"]["lora"] == ["4", 1] and graph["5"]["inputs"]["steps"] == ["4", 3]
    assert set(graph["4"]["inputs"]) == set(NODE_0_3_75["input"]["required"])


def test_on_0_33_the_new_inputs_take_the_node_defaults_and_save_reads_outputs_0_and_2():
    graph, defaulted = native_graph("tiny.safetensors", SETUP, NODE_0_33, gradient_checkpointing=False)

    assert defaulted == {"bucket_mode": False, "bypass_mode": False, "checkpoint_depth": 1, "offloading": False,
                         "quantized_backward": False}
    inputs = graph["4"]["inputs"]
    assert set(inputs) == set(NODE_0_33["input"]["required"])
    assert inputs["training_dtype"] == inputs["lora_dtype"] == "fp32" and inputs["gradient_checkpointing"] is False
    assert graph["5"]["inputs"]["lora"] == ["4", 0] and graph["5"]["inputs"]["steps"] == ["4", 2]


def test_a_node_without_an_input_the_bench_sets_is_refused_by_name():
    older = {**NODE_0_33, "input": {"required": {k: v for k, v in NODE_0_33["input"]["required"].items()
                                                 if k != "loss_function"}}}

    with pytest.raises(RuntimeError, match="has no input loss_function"):
        native_graph("tiny.safetensors", SETUP, older, gradient_checkpointing=True)
