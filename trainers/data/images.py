"""Reading training images: any file Pillow opens becomes 8-bit sRGB, upright, on white where it was transparent.

Every problem a user can fix (a broken, empty, tiny or absurdly large file) is raised as `DataError` naming the file.
"""

from __future__ import annotations

import glob

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError, features

from ..errors import DataError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
                                             | ({".avif"} if features.check("avif") else set()))
"""File types the scan picks up (lower case; matched case-insensitively)."""

MIN_SIDE = 32
MAX_PIXELS = 2 * 89_478_485
"""Pillow's own decompression-bomb limit (about 179 megapixels), enforced even where Pillow's has been lifted."""

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}
_SRGB = ImageCms.createProfile("sRGB")
_HIGH_BIT_DEPTH_FULL_SCALES = {"I;16": (65535.0,), "I;16L": (65535.0,), "I;16B": (65535.0,), "I;16N": (65535.0,),
                               "I": (255.0, 65535.0), "F": (1.0, 255.0, 65535.0)}
"""Candidate white points per mode; 32-bit modes carry no bit depth, so the smallest that fits the data is used."""


def load_image(path: str | Path, *, at_least: tuple[int, int] | None = None) -> Image.Image:
    """Decode `path` to an upright RGB image.

    `at_least=(w, h)` lets JPEGs decode at a reduced scale that is still no smaller than that (upright) size,
    which is several times faster for camera-sized photos trained at 512-1024 px.
    """
    path = Path(path)
    with _open(path) as image:
        if at_least is not None:
            stored = at_least[::-1] if _swaps_sides(image) else at_least
            image.draft(None, (max(1, stored[0]), max(1, stored[1])))
        _decode(image, path)
        return normalize_image(image)


MASK_SUFFIX = ".mask"
"""`photo.mask.png` beside `photo.jpg` is photo's loss mask, not a training image."""


def mask_file(image_path: Path) -> Path | None:
    """The mask file beside `image_path` (`<stem>.mask.<any image extension>`), or None."""
    found = sorted(p for p in image_path.parent.glob(f"{glob.escape(image_path.stem)}{MASK_SUFFIX}.*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS)
    return found[0] if found else None


def load_mask(image_path: Path, size: tuple[int, int]) -> Image.Image | None:
    """The loss mask of the image at `image_path` as an upright greyscale image of its `size` (white = learn): its
    mask file, else its alpha channel; None when it has neither."""
    path = mask_file(image_path)
    with _open(path or image_path) as opened:
        _decode(opened, path or image_path)
        image = ImageOps.exif_transpose(opened)
        if path is None:
            return image.convert("RGBA").getchannel("A") if image.has_transparency_data else None
        mask = image.convert("L")
    if mask.size != size:
        raise DataError(f"the mask is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}",
                        "save the mask at the image's size", where=str(path))
    return mask


def probe_image(path: str | Path) -> tuple[int, int]:
    """Check that `path` decodes (cheaply: JPEGs at 1/8 scale) and return its upright (width, height)."""
    path = Path(path)
    with _open(path) as image:
        size = upright_size(image)
        image.draft(None, (1, 1))
        _decode(image, path)
        return size


def image_size(path: str | Path) -> tuple[int, int]:
    """The upright (width, height) from the header alone, with the same checks as `load_image` except decoding."""
    with _open(Path(path)) as image:
        return upright_size(image)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation is applied, without decoding the pixels."""
    width, height = image.size
    return (height, width) if _swaps_sides(image) else (width, height)


def normalize_image(image: Image.Image) -> Image.Image:
    """RGB, 8 bits per channel, EXIF orientation applied, transparency composited on white, colours in sRGB."""
    icc_profile = image.info.get("icc_profile")
    image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_BIT_DEPTH_FULL_SCALES:
        image = _scale_to_8bit(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if icc_profile and image.mode in ("RGB", "CMYK"):
        image = _to_srgb(image, icc_profile)
    return image if image.mode == "RGB" else image.convert("RGB")


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 from an RGB image."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def uint8_to_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to float32 [-1, 1], the range the VAE expects."""
    return pixels.to(torch.float32).div_(127.5).sub_(1.0)


# ---- internals -------------------------------------------------------------------------------------------
def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError("image file not found", "check the path, or remove it from the manifest", where=str(path))
    if path.stat().st_size == 0:
        raise DataError("the file is empty (0 bytes)", "re-copy the image or delete the file", where=str(path))
    try:
        image = Image.open(path)
    except Image.DecompressionBombError:
        raise _too_large(path, "") from None
    except UnidentifiedImageError:
        raise DataError("not an image Pillow can read (wrong extension, or an unsupported format)",
                        "convert it to PNG or JPEG, or delete it", where=str(path)) from None
    except _DECODE_ERRORS as exc:
        raise _corrupt(path, exc) from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise _too_large(path, f" ({width}×{height})")
    if min(width, height) < MIN_SIDE:
        image.close()
        raise DataError(f"too small ({width}×{height}); both sides must be at least {MIN_SIDE} px",
                        "use a larger image or delete this one", where=str(path))
    return image


def _decode(image: Image.Image, path: Path) -> None:
    try:
        image.load()
    except _DECODE_ERRORS as exc:
        raise _corrupt(path, exc) from None


def _corrupt(path: Path, exc: Exception) -> DataError:
    return DataError(f"the file is corrupt or truncated ({exc})", "re-export or re-download it, or delete it",
                     where=str(path))


def _too_large(path: Path, size: str) -> DataError:
    return DataError(f"the image{size} is over the {MAX_PIXELS // 1_000_000}-megapixel safety limit "
                     "(decompression-bomb protection)", "downscale it, or delete it", where=str(path))


def _swaps_sides(image: Image.Image) -> bool:
    try:
        return image.getexif().get(_EXIF_ORIENTATION, 1) in _SWAPS_SIDES
    except _DECODE_ERRORS:
        return False


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(values.max(initial=0.0))
    candidates = _HIGH_BIT_DEPTH_FULL_SCALES[image.mode]
    full_scale = next((scale for scale in candidates if peak <= scale), peak)
    return Image.fromarray(np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8))


def _to_srgb(image: Image.Image, icc_profile: bytes) -> Image.Image:
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        return ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return image.convert("RGB")  # an unreadable or mismatched profile: keep the numbers as they are
