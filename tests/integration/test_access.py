"""What a client of a real ComfyUI can reach through the pack's nodes: folders and files only inside input/ (data)
or the matching models/ folder, plus the roots the person running ComfyUI allows in
user/comfyui-finetune/access.toml; ComfyUI's own list and range checks stay on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.comfy.client import PromptRejected, assert_clear_node_error

SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "assets" / "sample_images"
HAND_WRITTEN = "my own caption, written by hand"
TINY_RUN = '[output]\nsample_steps = 2\ntensorboard = false\n[train]\nwarmup_steps = 0\n'


def copy_robots(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for image in sorted(SAMPLE_IMAGES.glob("robot_0[1-2].png")):
        shutil.copy(image, folder / image.name)
    return folder


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder of images outside every folder of the server, with a hand-written caption."""
    folder = copy_robots(tmp_path_factory.mktemp("outside") / "photos")
    (folder / "robot_01.txt").write_text(HAND_WRITTEN)
    return folder


@pytest.fixture
def access_file(comfy_server):
    path = comfy_server.input_dir.parent / "user" / "comfyui-finetune" / "access.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    yield path
    path.unlink(missing_ok=True)


def images(path: str = "", folder: str = "(none)") -> dict:
    return {"class_type": "FinetuneLoadTrainingImages",
            "inputs": {"folder": folder, "path": path, "repeats": 1, "resolution": 64, "crop": "center",
                       "flip": False, "bucketing": False}}


def preview(path: str = "", folder: str = "(none)") -> dict:
    return {"1": images(path, folder), "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}


def captioned(path: str, model: str = "tiny-blip") -> dict:
    return {"1": images(path), "2": {"class_type": "FinetuneBLIPCaption", "inputs": {
        "dataset": ["1", 0], "model": model, "prompt": "a photo of", "trigger_word": "", "class_noun": "",
        "mode": "overwrite", "write_caption_files": True, "batch_size": 2, "max_length": 5, "num_beams": 1}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}


def lora_graph(path: str, checkpoint: str, **changes) -> dict:
    train = dict(base_checkpoint=checkpoint, dataset=["1", 0], method="LoRA", trigger_word="sks", class_noun="robot",
                 steps=2, learning_rate=0.0, resolution=0, batch_size=1, train_text_encoder=False, rank=4, alpha=4.0,
                 seed=1, name="never_trained", sample_prompts="", sample_every=0, advanced=TINY_RUN)
    return {"1": images(path), "2": {"class_type": "FinetuneTrainLoRA", "inputs": {**train, **changes}}}


@pytest.mark.parametrize("case", ["absolute", "dot-dot", "home"])
def test_a_folder_outside_input_is_refused_with_how_to_allow_it(comfy, outside, case):
    text = {"absolute": str(outside), "home": "~",
            "dot-dot": "../" * 30 + outside.relative_to(outside.anchor).as_posix()}[case]

    result = comfy.run(preview(text), timeout=120)

    assert_clear_node_error(result, "FinetuneLoadTrainingImages",
                            ["`path`", "outside the folders", "COMFYUI_FINETUNE_ALLOW_FOLDERS", "access.toml"], case)


def test_a_path_with_a_nul_byte_is_one_clear_error(comfy):
    result = comfy.run(preview("photos\x00/../../etc"), timeout=120)

    assert_clear_node_error(result, "FinetuneLoadTrainingImages", ["`path`", "NUL character"])


def test_a_folder_value_not_among_the_options_is_refused_before_running(comfy, outside):
    with pytest.raises(PromptRejected) as refused:
        comfy.submit(preview(folder=str(outside)))
    assert "not a subfolder of ComfyUI's input folder" in str(refused.value)


def test_a_symlink_the_user_put_into_input_keeps_working(comfy, comfy_server, outside):
    link = comfy_server.input_dir / "linked_photos"
    link.unlink(missing_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    try:
        assert comfy.run(preview("linked_photos"), timeout=120).status == "success"
        assert comfy.run(preview(str(link)), timeout=120).status == "success"
    finally:
        link.unlink()


def test_a_folder_allowed_in_access_toml_is_read(comfy, outside, access_file):
    access_file.write_text(f'folders = ["{outside.parent}"]\n')

    assert comfy.run(preview(str(outside)), timeout=120).status == "success"


def test_caption_files_are_never_written_outside_the_allowed_folders(comfy, outside):
    result = comfy.run(captioned(str(outside)), timeout=120)

    assert result.status == "error"
    assert (outside / "robot_01.txt").read_text() == HAND_WRITTEN
    assert not (outside / "robot_02.txt").exists()


def test_a_blip_model_outside_models_blip_is_refused(comfy, comfy_server):
    folder = copy_robots(comfy_server.input_dir / "blip_escape")
    escape = "../../" + "/".join(["..", ".."] * 20) + "/tmp/some_blip"

    result = comfy.run(captioned(folder.name, model=escape), timeout=120)

    assert_clear_node_error(result, "FinetuneBLIPCaption", ["`model`", "outside the folders"])


@pytest.mark.parametrize("setting", ["[data]\nvalidation_folder = '{outside}'",
                                     "[dreambooth]\nclass_folder = '{outside}'",
                                     "[model]\nvae = '../../../../../../../../{outside}'",
                                     "[ddpo]\nprompt_file = '{outside}/robot_01.txt'",
                                     "[controlnet]\ncontrol_folder = '{outside}'",
                                     "[ddpo]\nreward_model = '{outside}'"])
def test_path_settings_in_advanced_are_confined(comfy, comfy_server, tiny_checkpoint, outside, setting):
    folder = copy_robots(comfy_server.input_dir / "advanced_set")
    advanced = TINY_RUN + setting.format(outside=outside)

    result = comfy.run(lora_graph(folder.name, tiny_checkpoint, advanced=advanced), timeout=120)

    assert_clear_node_error(result, "FinetuneTrainLoRA", ["`advanced", "outside the folders"], setting)


def test_a_control_folder_outside_input_is_refused(comfy, comfy_server, tiny_checkpoint, outside):
    folder = copy_robots(comfy_server.input_dir / "control_set")
    train = {**lora_graph(folder.name, tiny_checkpoint)["2"]["inputs"]}
    for key in ("method", "trigger_word", "class_noun", "rank", "alpha", "resolution", "train_text_encoder"):
        train.pop(key)
    node = comfy.object_info("FinetuneTrainControlNet")["input"]
    specs = {**node.get("required", {}), **node.get("optional", {})}
    inputs = {name: spec[1]["default"] for name, spec in specs.items()
              if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}
    graph = {"1": images(folder.name), "2": {"class_type": "FinetuneTrainControlNet", "inputs": {
        **inputs, **train, "control_folder": str(outside)}}}

    result = comfy.run(graph, timeout=120)

    assert_clear_node_error(result, "FinetuneTrainControlNet", ["`control_folder`", "outside the folders"])


@pytest.mark.parametrize("changes, needle", [({"learning_rate": 1e30}, "learning_rate"), ({"rank": 0}, "rank"),
                                            ({"method": "Turbo"}, "method")])
def test_dropdowns_and_number_ranges_are_checked_before_running(comfy, comfy_server, tiny_checkpoint, changes,
                                                                 needle):
    folder = copy_robots(comfy_server.input_dir / "range_set")

    with pytest.raises(PromptRejected) as refused:
        comfy.submit(lora_graph(folder.name, tiny_checkpoint, **changes))
    assert needle in str(refused.value)


def test_a_dataset_dropdown_value_not_among_the_options_is_refused(comfy, comfy_server):
    copy_robots(comfy_server.input_dir / "crop_set")
    graph = preview("crop_set")
    graph["1"]["inputs"]["crop"] = "sideways"

    with pytest.raises(PromptRejected) as refused:
        comfy.submit(graph)
    assert "`crop`" in str(refused.value)


def test_two_links_to_the_folder_itself_do_not_wedge_the_queue(comfy, comfy_server):
    folder = copy_robots(comfy_server.input_dir / "looping")
    for name in ("a", "b"):
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(".", target_is_directory=True)

    assert comfy.run(preview("looping"), timeout=120).status == "success"


@pytest.mark.parametrize("name", ["nul\x00byte", "x" * 300, "bell\x07", "CON"])
def test_an_unusable_name_is_refused_before_any_trainer_starts(comfy, comfy_server, tiny_checkpoint, name):
    folder = copy_robots(comfy_server.input_dir / "names_set")
    runs = comfy_server.output_dir / "finetune"
    before = set(runs.iterdir()) if runs.is_dir() else set()

    result = comfy.run(lora_graph(folder.name, tiny_checkpoint, name=name), timeout=120)

    assert_clear_node_error(result, "FinetuneTrainLoRA", ["`name`", "is not a usable file name"], repr(name))
    assert (set(runs.iterdir()) if runs.is_dir() else set()) == before, "a run folder was made"


def test_a_caption_extension_that_leaves_the_folder_is_refused(comfy, comfy_server, tiny_checkpoint):
    folder = copy_robots(comfy_server.input_dir / "extension_set")

    result = comfy.run(lora_graph(folder.name, tiny_checkpoint, advanced=TINY_RUN + '[data]\ncaption_extension = "/x"'),
                       timeout=120)

    assert_clear_node_error(result, "FinetuneTrainLoRA", ["caption_extension", "is not a file extension"])
