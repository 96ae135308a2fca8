"""Result file names: a taken name gets the next free _2, _3... and no existing file is ever replaced. Writes are
durable (fsync before rename; a checkpoint folder replaced new-first), a full disk is one clear error, and file
modes follow the umask or the replaced file."""

from __future__ import annotations

import errno
import os
import stat
import types

import pytest
import torch

from trainers import checkpointing
from trainers.checkpointing import latest_checkpoint, replace_folder
from trainers.errors import ConfigError, DiskFullError
from trainers.io import atomic_path, atomic_write_text, refuse_existing, unique_path


def test_a_free_name_is_kept_and_a_taken_one_gets_the_next_free_number(tmp_path):
    assert unique_path(tmp_path, "portrait", ".safetensors") == tmp_path / "portrait.safetensors"
    (tmp_path / "portrait.safetensors").write_bytes(b"theirs")
    (tmp_path / "portrait_2.safetensors").write_bytes(b"also theirs")
    (tmp_path / "portrait_4.safetensors").write_bytes(b"and this")
    assert unique_path(tmp_path, "portrait", ".safetensors") == tmp_path / "portrait_3.safetensors"
    assert unique_path(tmp_path, "portrait", ".pt") == tmp_path / "portrait.pt"
    assert (tmp_path / "portrait.safetensors").read_bytes() == b"theirs"


def test_an_existing_result_is_refused_unless_overwrite_is_asked_for(tmp_path):
    taken = tmp_path / "portrait.safetensors"
    refuse_existing(taken, overwrite=False)
    taken.write_bytes(b"theirs")
    with pytest.raises(ConfigError, match="already exists"):
        refuse_existing(taken, overwrite=False)
    refuse_existing(taken, overwrite=True)


# ---- durability: fsync before rename, folders replaced new-first, a full disk, file modes ----------------------------
def record_disk_operations(monkeypatch) -> list[tuple[str, str]]:
    """os.fsync / os.replace as a list of (operation, name): the power-cut model is that only what was fsync'd
    before a rename survives the cut with it."""
    operations: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        operations.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        operations.append(("rename", f"{os.path.basename(src)}->{os.path.basename(dst)}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return operations


def test_an_atomic_write_is_flushed_before_its_rename_and_the_folder_after(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_text("old")
    operations = record_disk_operations(monkeypatch)

    atomic_write_text(target, "new")

    [(_, temporary)] = [op for op in operations if op[0] == "fsync"][:1]
    assert temporary.startswith(".run.json.") and temporary.endswith(".part")
    assert operations == [("fsync", temporary), ("rename", f"{temporary}->run.json"), ("fsync", tmp_path.name)]
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_checkpoint_of_the_same_step_is_replaced_new_first_and_a_cut_in_between_keeps_one(tmp_path,
                                                                                           monkeypatch):
    folder = tmp_path / "checkpoints"
    old, new = folder / "step_000010", folder / ".step_000010.part"
    for path, text in ((old, "old"), (new, "new")):
        path.mkdir(parents=True)
        (path / "state.json").write_text(text)
    operations = record_disk_operations(monkeypatch)

    replace_folder(new, old)

    renames = [op[1] for op in operations if op[0] == "rename"]
    assert renames == ["step_000010->.step_000010.old", ".step_000010.part->step_000010"]
    assert (old / "state.json").read_text() == "new" and sorted(p.name for p in folder.iterdir()) == ["step_000010"]

    (folder / "step_000010").rename(folder / ".step_000010.old")  # the cut came between the two renames
    assert latest_checkpoint(tmp_path) == old and (old / "state.json").read_text() == "new"


def test_a_full_disk_is_one_clear_error_naming_the_folder_and_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out" / "lora.safetensors"

    with pytest.raises(DiskFullError, match="disk full") as full:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    assert full.value.where == str(target.parent) and list(target.parent.iterdir()) == []


def test_a_full_disk_while_checkpointing_removes_the_partial_folder(tmp_path, monkeypatch):
    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing, "_write_main_state", no_space)
    processes = types.SimpleNamespace(wait_for_everyone=lambda: None, is_main_process=True, process_index=0)
    resumables = checkpointing.Resumables(optimizer=None, lr_scheduler=None, generator=torch.Generator())

    with pytest.raises(DiskFullError) as full:
        checkpointing.save_checkpoint(tmp_path, checkpointing.LoopState(step=5), None, resumables, processes, keep=1)

    assert full.value.where == str(tmp_path / "checkpoints") and list((tmp_path / "checkpoints").iterdir()) == []


def test_a_new_file_gets_the_umask_mode_and_a_replaced_one_keeps_its_own(tmp_path):
    previous = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "new.txt", "a caption")
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        kept.chmod(0o604)
        atomic_write_text(kept, "a new caption")
    finally:
        os.umask(previous)

    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604 and kept.read_text() == "a new caption"


def test_a_full_disk_during_training_ends_as_a_clear_error_event(tmp_path, monkeypatch):
    from train_helpers import make_images, read_events, tiny_config
    from trainers import loop

    cfg = tiny_config(tmp_path, make_images(tmp_path / "images"), steps=2)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "runs" / "x" / "samples" / "a.png"))

    monkeypatch.setattr(loop, "save_checkpoint", no_space)
    with pytest.raises(DiskFullError):
        loop.train(cfg)

    [error] = [e for e in read_events(tmp_path / "runs" / cfg.output.name) if e["event"] == "error"]
    assert error["message"].startswith(f"{tmp_path / 'runs' / 'x' / 'samples'}: disk full — free some space")
