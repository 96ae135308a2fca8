"""The second ComfyUI host: the newest source archive beside the clone is found by version, unpacked once, and an
archive whose ComfyUI is not the version its name says is refused."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from scripts import host


def source_archive(folder: Path, name: str, version: str) -> Path:
    path = folder / name
    with tarfile.open(path, "w:gz") as archive:
        for member, text in (("ComfyUI/main.py", "print('comfy')\n"),
                             ("ComfyUI/comfyui_version.py", f'__version__ = "{version}"\n')):
            data = text.encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_the_newest_archive_is_chosen_by_version_not_by_name(tmp_path):
    for version in ("0.4.0", "0.33.9", "0.33.10"):
        source_archive(tmp_path, f"ComfyUI-{version}-src.tar.gz", version)
    (tmp_path / "ComfyUI-latest-src.tar.gz").write_bytes(b"")

    assert host.newest_archive(tmp_path) == ("0.33.10", tmp_path / "ComfyUI-0.33.10-src.tar.gz")
    assert host.newest_archive(tmp_path / "nothing-here") is None


def test_an_archive_is_unpacked_once_into_its_own_host_folder(tmp_path):
    archive = source_archive(tmp_path, "ComfyUI-0.33.0-src.tar.gz", "0.33.0")

    comfy = host.unpack_archive("0.33.0", archive, root=tmp_path)
    (comfy / "custom_nodes").mkdir()
    again = host.unpack_archive("0.33.0", archive, root=tmp_path)

    assert comfy == again == tmp_path / ".host-0.33.0" / "ComfyUI"
    assert (comfy / "main.py").is_file() and (comfy / "custom_nodes").is_dir()


def test_an_archive_holding_another_version_is_refused(tmp_path):
    archive = source_archive(tmp_path, "ComfyUI-0.33.0-src.tar.gz", "0.32.1")

    with pytest.raises(SystemExit, match="does not hold ComfyUI v0.33.0"):
        host.unpack_archive("0.33.0", archive, root=tmp_path)
    assert not (tmp_path / ".host-0.33.0" / "ComfyUI").exists()
