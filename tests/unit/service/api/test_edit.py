"""Decoding an edit's image: plain 8-bit PNGs through libspng give exactly Pillow's pixels; the rest go to Pillow."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service.api.edit import EncodedImage, signed
from service.errors import InvalidRequest

RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
RGB = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)


def png(pixels: np.ndarray, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def pillow(data: bytes, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert(mode)).reshape(8, 8, -1)


@pytest.mark.parametrize(("data", "mode"), [(png(GREY), "L"), (png(RGB), "RGB"),
                                            (png(GREY, optimize=True), "L"), (png(RGB, compress_level=0), "RGB")])
def test_a_plain_png_takes_libspng_and_gives_pillows_pixels(data: bytes, mode: str) -> None:
    image = EncodedImage(data, "image", 8, 8, mode)
    assert image.plain_png()
    pixels = image.pixels()
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 8, 1 if mode == "L" else 3)
    assert np.array_equal(pixels, pillow(data, mode))


def palette() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(RGB).quantize(16).save(buffer, format="PNG")
    return buffer.getvalue()


def with_text() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 100, zip=True)
    return png(GREY, pnginfo=info)


@pytest.mark.parametrize(("data", "mode"), [
    (png(RGB), "L"),  # colour to grey: Pillow converts
    (png(GREY), "RGB"),
    (png(np.dstack([RGB, GREY])), "RGB"),  # alpha dropped by Pillow
    (png(GREY.astype(np.uint16) * 257), "L"),  # 16 bits
    (palette(), "RGB"),
    (with_text(), "L"),  # a zTXt chunk: libspng never inflates it
    (png(GREY)[:-12], "L"),  # no IEND
])
def test_any_other_png_goes_to_pillow(data: bytes, mode: str) -> None:
    image = EncodedImage(data, "image", 8, 8, mode)
    assert not image.plain_png()
    assert np.array_equal(image.pixels(), pillow(data, mode))


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_a_plain_png_whose_pixels_do_not_decode_is_refused_naming_the_field() -> None:
    header = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    for idat in (b"garbage", zlib.compress(b"\0" * 20)):  # not zlib; too few rows
        data = header + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
        image = EncodedImage(data, "mask", 8, 8, "L")
        assert image.plain_png()
        with pytest.raises(InvalidRequest, match=r"^mask: not a PNG") as caught:
            image.pixels()
        assert caught.value.field == "mask"


def test_another_size_is_refused_from_the_header() -> None:
    with pytest.raises(InvalidRequest, match="the image is 8×8; this needs 4×4"):
        EncodedImage(png(GREY), "image", 4, 4, "L").pixels()


def test_signed_is_the_inverse_of_to_uint8() -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    x = signed(pixels)
    assert x.shape == (1, 16, 16) and x.dtype == np.float32 and x.min() == -1 and x.max() == 1
    assert np.array_equal(np.round((x + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0), pixels)
