"""Reading a single-file checkpoint (.safetensors, or a .ckpt that holds only tensors) with clear errors.

A .safetensors file is read lazily: a tensor is loaded only when asked for, so a model can be built part by part
without the whole file in memory.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ModelError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONVERT_HINT = "download it again, or re-export it as .safetensors"


class CheckpointFile(Mapping[str, torch.Tensor]):
    """The tensors of a single file by key, plus `shape_of(key)` (no loading) and the file's `metadata`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.where = str(self.path)
        if not self.path.is_file():
            raise ModelError("file not found", "check the path (a checkpoint file, a diffusers folder or a hub id)",
                             where=self.where)
        suffix = self.path.suffix.lower()
        self._handle = None
        self._tensors: dict[str, torch.Tensor] = {}
        self.metadata: dict[str, str] = {}
        if suffix in SAFETENSORS_SUFFIXES:
            self._open_safetensors()
        elif suffix in PICKLE_SUFFIXES:
            self._tensors = _load_pickle(self.path)
        else:
            raise ModelError(f"unknown checkpoint type {suffix or '(no extension)'!r}",
                             "give a .safetensors (or .ckpt) file, a diffusers folder or a hub id", where=self.where)
        self._keys = list(self._handle.keys()) if self._handle is not None else list(self._tensors)
        self._key_set = set(self._keys)

    def _open_safetensors(self) -> None:
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            self.metadata = self._handle.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"not a readable .safetensors file; it may be truncated or corrupt ({exc})",
                             CONVERT_HINT, where=self.where) from None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        if self._handle is None:
            return self._tensors[key]
        try:
            return self._handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"cannot read tensor {key!r}; the file may be corrupt ({exc})", CONVERT_HINT,
                             where=self.where) from None

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape_of(self, key: str) -> tuple[int, ...]:
        if self._handle is None:
            return tuple(self._tensors[key].shape)
        return tuple(self._handle.get_slice(key).get_shape())

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors whose keys start with `prefix`, keys unchanged."""
        return {key: self[key] for key in self._keys if key.startswith(prefix)}


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    where = str(path)
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # files in torch's legacy (pre-zip) format cannot be memory-mapped
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError("this .ckpt needs arbitrary Python objects to load, which could run code from the file",
                         "convert it to .safetensors with a tool you trust, then use that file", where=where) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"not a readable checkpoint; it may be truncated or corrupt ({exc})".replace("\n", " "),
                         CONVERT_HINT, where=where) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelError("the file holds no state dict", "give a Stable Diffusion checkpoint", where=where)
    return {key: value for key, value in data.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}
