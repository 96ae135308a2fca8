"""Atomic file writes: write to a temporary name in the same folder, flush it to the disk, then rename, so neither a
reader nor a power cut ever sees half a file: the old file or the new one is there, whole. A full disk is one clear
error naming the folder."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ConfigError, DiskFullError


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def disk_full_named(folder: Path) -> Iterator[None]:
    """Turn a full disk (ENOSPC, or a quota) while writing into `folder` into a DiskFullError."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(Path(folder)) from None
        raise


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` (fsync'd, with the mode the old file
    had, else the one the umask gives a new file), on error it is removed."""
    target = Path(target)
    with disk_full_named(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            os.chmod(tmp_path, file_mode(target))
            fsync_file(tmp_path)
            os.replace(tmp_path, target)
            fsync_file(target.parent)
        finally:
            tmp_path.unlink(missing_ok=True)


def fsync_file(path: Path) -> None:
    """Flush a file's (or a folder's: its entries') data to the disk."""
    if os.name == "nt" and os.path.isdir(path):
        return  # Windows cannot open a folder to flush it; its file system journals renames itself
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders, deepest first."""
    for current, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(Path(current) / name)
        fsync_file(Path(current))


def file_mode(target: Path) -> int:
    """The mode an existing `target` has (kept when it is replaced), else what the umask gives a new file."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    try:  # Linux: read it, as setting it to read it would race with other threads
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


WHOLE_HASH_LIMIT = 2**30
HASHED_ENDS = 64 * 2**20


def file_fingerprint(path: Path) -> dict[str, object]:
    """{"size", "sha256"} of a file: of all of it up to 1 GiB, else of its size and first and last 64 MiB (a
    multi-GB checkpoint is told apart from another file in well under a second)."""
    size = os.stat(path).st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_HASH_LIMIT:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        else:
            digest.update(str(size).encode() + f.read(HASHED_ENDS))
            f.seek(size - HASHED_ENDS)
            digest.update(f.read(HASHED_ENDS))
    return {"size": size, "sha256": digest.hexdigest()}


def same_file(path: Path, recorded: dict) -> bool:
    """Whether `path` still is the file whose `file_fingerprint` was `recorded` (False when it is gone)."""
    try:
        if os.stat(path).st_size != recorded.get("size"):
            return False
        return file_fingerprint(path)["sha256"] == recorded.get("sha256")
    except OSError:
        return False


def unique_path(folder: Path, stem: str, suffix: str) -> Path:
    """`folder/stem.suffix`, or `stem_2.suffix`, `stem_3.suffix`... if taken: never overwrite someone's file."""
    candidate = folder / f"{stem}{suffix}"
    n = 2
    while candidate.exists():
        candidate = folder / f"{stem}_{n}{suffix}"
        n += 1
    return candidate


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Results are never replaced silently: an existing file stays unless the user asked to overwrite it."""
    if Path(path).exists() and not overwrite:
        raise ConfigError("a file of that name already exists and would be replaced",
                          "set output.overwrite = true, or choose another output.name", where=str(path))
