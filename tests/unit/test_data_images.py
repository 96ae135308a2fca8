"""Image loading: every mode and orientation becomes upright 8-bit RGB; every broken file is a DataError naming it."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.data.images import (IMAGE_EXTENSIONS, MAX_PIXELS, image_size, load_image, pil_to_uint8_tensor,
                                  probe_image, uint8_to_pixels)
from trainers.errors import DataError


def png_bytes(width: int, height: int, *, bit_depth: int, color_type: int, rows: bytes | None = None) -> bytes:
    """A PNG written by hand, for what Pillow cannot save (16-bit RGB) or should not accept (a bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = chunk(b"IDAT", zlib.compress(rows)) if rows is not None else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IEND", b"")


def gradient(width: int = 96, height: int = 64) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    return Image.fromarray(np.stack([x, 255 - x, np.full_like(x, 80)], -1).astype(np.uint8))


def test_plain_rgb_round_trips(tmp_path: Path):
    source = gradient()
    source.save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.mode == "RGB" and image.size == (96, 64)
    assert np.array_equal(np.asarray(image), np.asarray(source))


def test_exif_orientation_is_applied(tmp_path: Path):
    # Stored landscape with a red left half; orientation 6 means "rotate 90° clockwise to view".
    stored = Image.new("RGB", (128, 64), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 64, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    image = load_image(tmp_path / "rotated.jpg")
    assert image.size == (64, 128)
    assert image_size(tmp_path / "rotated.jpg") == (64, 128)
    assert probe_image(tmp_path / "rotated.jpg") == (64, 128)
    top, bottom = np.asarray(image)[10, 32], np.asarray(image)[118, 32]
    assert top[0] > 200 and top[2] < 60  # the red half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_rgba_is_composited_on_white(tmp_path: Path):
    image = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    image.paste((0, 0, 0, 255), (0, 0, 32, 64))
    image.save(tmp_path / "alpha.png")
    pixels = np.asarray(load_image(tmp_path / "alpha.png"))
    assert pixels[5, 50].tolist() == [255, 255, 255]  # transparent red → white, not red or black
    assert pixels[5, 5].tolist() == [0, 0, 0]


def test_half_transparent_la_blends_with_white(tmp_path: Path):
    Image.new("LA", (64, 64), (0, 128)).save(tmp_path / "la.png")
    value = np.asarray(load_image(tmp_path / "la.png"))[0, 0]
    assert 125 <= value[0] <= 129 and value[0] == value[1] == value[2]


def test_palette_transparency_is_white(tmp_path: Path):
    image = Image.new("P", (64, 64), 1)
    image.putpalette([0, 255, 0] + [255, 0, 0] + [0, 0, 0] * 254)
    image.paste(0, (0, 0, 32, 64))
    image.save(tmp_path / "palette.png", transparency=1)
    pixels = np.asarray(load_image(tmp_path / "palette.png"))
    assert pixels[5, 5].tolist() == [0, 255, 0]
    assert pixels[5, 50].tolist() == [255, 255, 255]


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path):
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure red in CMYK
    image = load_image(tmp_path / "cmyk.jpg")
    red, green, blue = np.asarray(image)[32, 32].tolist()
    assert image.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_16bit_gray_png_is_scaled_not_clipped(tmp_path: Path):
    values = np.tile(np.array([0, 1000, 32896, 65535], dtype=np.uint16).repeat(16), (64, 1))
    Image.fromarray(values).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I;16")
    row = np.asarray(load_image(tmp_path / "gray16.png"))[0, ::16, 0].tolist()
    assert row == [0, 4, 128, 255]  # clipping would give [0, 255, 255, 255]


def test_16bit_rgb_png_is_scaled(tmp_path: Path):
    pixel = np.array([65535, 32896, 0], dtype=">u2").tobytes()
    rows = b"".join(b"\x00" + pixel * 64 for _ in range(64))
    (tmp_path / "rgb16.png").write_bytes(png_bytes(64, 64, bit_depth=16, color_type=2, rows=rows))
    assert np.asarray(load_image(tmp_path / "rgb16.png"))[0, 0].tolist() == [255, 128, 0]


def test_float_tiff_in_unit_range_is_scaled(tmp_path: Path):
    Image.fromarray(np.full((64, 64), 0.5, dtype=np.float32)).save(tmp_path / "float.tiff")
    assert np.asarray(load_image(tmp_path / "float.tiff"))[0, 0].tolist() == [128, 128, 128]


def test_grayscale_becomes_three_channels(tmp_path: Path):
    Image.new("L", (64, 64), 77).save(tmp_path / "gray.png")
    image = load_image(tmp_path / "gray.png")
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [77, 77, 77]


def test_at_least_decodes_jpeg_smaller_but_not_below_request(tmp_path: Path):
    gradient(1024, 768).save(tmp_path / "big.jpg")
    image = load_image(tmp_path / "big.jpg", at_least=(300, 200))
    assert image.size == (512, 384)  # a 1/2-scale decode is the smallest that still covers 300×200


@pytest.mark.parametrize("name, content, reason", [
    ("empty.png", b"", "empty"),
    ("text.png", b"this is not a png, just text\n" * 20, "not an image"),
])
def test_unreadable_files_name_the_file(tmp_path: Path, name: str, content: bytes, reason: str):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_image(path)
    assert caught.value.where == str(path) and reason in caught.value.problem
    assert str(path) in str(caught.value)


def test_truncated_jpeg_is_found_by_probe_and_load(tmp_path: Path):
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    for read in (probe_image, load_image):
        with pytest.raises(DataError, match="corrupt or truncated") as caught:
            read(tmp_path / "cut.jpg")
        assert caught.value.where == str(tmp_path / "cut.jpg")


def test_tiny_image_is_rejected_with_its_size(tmp_path: Path):
    Image.new("RGB", (10, 10)).save(tmp_path / "tiny.png")
    with pytest.raises(DataError, match="10×10") as caught:
        probe_image(tmp_path / "tiny.png")
    assert "32 px" in caught.value.problem and caught.value.where == str(tmp_path / "tiny.png")


def test_decompression_bomb_header_is_rejected_before_decoding(tmp_path: Path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(30000, 30000, bit_depth=8, color_type=2))  # 900 MP claimed, no pixel data
    assert 30000 * 30000 > MAX_PIXELS
    with pytest.raises(DataError, match="megapixel") as caught:
        load_image(path)
    assert caught.value.where == str(path)


def test_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_extensions_cover_the_common_formats():
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)


def test_pil_to_pixels_range_and_layout():
    image = Image.new("RGB", (5, 3), (0, 255, 0))
    tensor = uint8_to_pixels(pil_to_uint8_tensor(image))
    assert tensor.shape == (3, 3, 5) and tensor.dtype == torch.float32
    assert torch.equal(tensor[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))


def test_at_least_is_measured_upright_for_rotated_jpegs(tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1024x768, viewed 768x1024
    gradient(1024, 768).save(tmp_path / "rotated.jpg", exif=exif)
    image = load_image(tmp_path / "rotated.jpg", at_least=(500, 150))
    assert image.size == (768, 1024)  # a half-scale decode (384 wide) would be too narrow
