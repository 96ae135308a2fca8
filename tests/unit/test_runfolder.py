"""The run-folder contract: names, complete checkpoints, typed events as the JSON lines readers see, result headers."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from trainers.runfolder import (CHECKPOINT_STATE_FILE, DoneEvent, ErrorEvent, ProgressEvent, RunFolder, STOPPED,
                                family_from_metadata, output_kind, read_safetensors_header, safetensors_metadata,
                                succeeded)


def test_only_a_complete_checkpoint_is_resumable(tmp_path):
    run = RunFolder(tmp_path)
    assert not run.has_checkpoint() and run.step_folders() == []
    run.checkpoint(7).mkdir(parents=True)
    assert not run.has_checkpoint(), "a folder without its state file is not complete"
    (run.checkpoint(7) / CHECKPOINT_STATE_FILE).write_text("{}")
    run.checkpoint(12).mkdir()
    assert run.latest_checkpoint() == tmp_path / "checkpoints" / "step_000007"
    assert [p.name for p in run.step_folders()] == ["step_000007", "step_000012"]
    assert run.sample(100, 1) == tmp_path / "samples" / "step_000100_1.png"


def test_a_checkpoint_set_aside_by_a_crashed_replace_still_counts(tmp_path):
    """A crash between setting the old checkpoint aside and renaming its replacement in: --resume puts it back, so
    the nodes must see it too, without writing anything."""
    run = RunFolder(tmp_path)
    aside = run.checkpoints / ".step_000007.old"
    aside.mkdir(parents=True)
    (aside / CHECKPOINT_STATE_FILE).write_text("{}")
    assert run.has_checkpoint() and run.latest_checkpoint() is None
    assert aside.is_dir() and not run.checkpoint(7).exists(), "asking wrote nothing"
    (aside / CHECKPOINT_STATE_FILE).unlink()
    assert not run.has_checkpoint(), "an incomplete set-aside folder is not a checkpoint"


def test_events_are_flat_json_with_none_left_out():
    progress = ProgressEvent(3, 10, 0.5, 0.6, 1e-4, [1e-4, 2e-4], 2.0, None, {"reward_mean": 0.25}).as_dict()
    assert progress == {"event": "progress", "step": 3, "total": 10, "loss": 0.5, "loss_avg": 0.6, "lr": 1e-4,
                        "lrs": [1e-4, 2e-4], "it_s": 2.0, "eta_s": None, "reward_mean": 0.25}
    assert DoneEvent(STOPPED, 4, checkpoint="c").as_dict() == {"event": "done", "status": "stopped", "step": 4,
                                                                "checkpoint": "c"}
    assert ErrorEvent("bad").as_dict() == {"event": "error", "message": "bad"}
    assert succeeded(DoneEvent("succeeded", 4, outputs={}).as_dict()) and not succeeded(DoneEvent(STOPPED, 4).as_dict())


def test_output_kinds_follow_the_method():
    assert output_kind("full + DreamBooth") == "checkpoint" and output_kind("ddpo") == "lora"
    assert output_kind("textual_inversion") == "embedding"


def test_safetensors_header_and_family(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    assert read_safetensors_header(path)["a"]["shape"] == [2]
    assert family_from_metadata(safetensors_metadata(path)) == "sdxl"
    assert family_from_metadata({"modelspec.architecture": "stable-diffusion-v1/lora"}) == "sd1"
    (tmp_path / "bad.safetensors").write_bytes(b"\x05")
    (tmp_path / "huge.safetensors").write_bytes((10**12).to_bytes(8, "little") + json.dumps({}).encode())
    assert safetensors_metadata(tmp_path / "bad.safetensors") == {}
    assert safetensors_metadata(tmp_path / "huge.safetensors") == {}
