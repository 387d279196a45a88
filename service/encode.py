"""Image encoding: PNG (lossless, default), JPEG, WebP (lossless) with Pillow, off the event loop.

A request's images are encoded in one task on a small thread pool (CM_ENCODE_THREADS), so large images
never stall the event loop or the engine thread. Tiny payloads (a few thousand pixels, e.g. 8x8 digits)
are encoded inline: handing them to a thread costs more than encoding them.
PNG is written directly (signature, IHDR, one zlib IDAT, IEND): for small images Pillow's Python-level
PNG writer costs several times the compression itself, and for tiny ones (scanlines up to 1 KiB) the IDAT
is stored rather than compressed. The bytes are a standard PNG; tests decode them.
Kept by A/B: with Pillow's writer instead the service served 10% fewer images/s at c=64 n=1 on the CPU
(docs/perf-log.md, "The request path").
"""

from __future__ import annotations

import asyncio
import functools
import io
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PIL_FORMAT = {"jpeg": "JPEG", "webp": "WEBP"}
PIL_OPTIONS: dict[str, dict[str, object]] = {"jpeg": {"quality": 95}, "webp": {"lossless": True}}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPE = {1: 0, 3: 2}  # channels -> PNG colour type (grey, RGB)
PNG_COMPRESSION = 6  # zlib level
# Scanlines up to this size are stored uncompressed: zlib.compress sets up ~256 KiB of state per call
# to save a few dozen bytes at most.
PNG_STORED_MAX_BYTES = 1024
INLINE_MAX_PIXELS = 4096  # at or below this many pixels per request, encode on the calling thread


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=64)
def _png_head(h: int, w: int, c: int) -> bytes:
    """The signature and IHDR chunk: the same for every image of one shape."""
    return PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, PNG_COLOR_TYPE[c], 0, 0, 0))


PNG_END = _png_chunk(b"IEND", b"")


def _stored(raw: bytes) -> bytes:
    """A zlib stream (RFC 1950) of one stored, uncompressed deflate block (RFC 1951, 3.2.4); at most 65535 bytes."""
    header = b"\x78\x01\x01" + struct.pack("<HH", len(raw), 0xFFFF ^ len(raw))  # zlib header, final stored block
    return header + raw + struct.pack(">I", zlib.adler32(raw))


def encode_png(image: np.ndarray) -> bytes:
    """A (H, W, C) uint8 array with C = 1 or 3 as PNG bytes (8-bit, no interlace, filter 0 on every row)."""
    h, w, c = image.shape
    rows = np.zeros((h, 1 + w * c), dtype=np.uint8)  # each row: filter byte 0, then the pixels
    rows[:, 1:] = image.reshape(h, w * c)
    raw = rows.tobytes()
    data = _stored(raw) if len(raw) <= PNG_STORED_MAX_BYTES else zlib.compress(raw, PNG_COMPRESSION)
    return _png_head(h, w, c) + _png_chunk(b"IDAT", data) + PNG_END


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    """One (H, W, C) uint8 image in `fmt` (png, jpeg or webp)."""
    if fmt == "png":
        return encode_png(image)
    pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image, "L" if image.shape[2] == 1 else "RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format=PIL_FORMAT[fmt], **PIL_OPTIONS[fmt])
    return buffer.getvalue()


def encode_images(images: np.ndarray, fmt: str) -> list[bytes]:
    """A batch (n, H, W, C) uint8 as a list of encoded images."""
    return [encode_image(image, fmt) for image in images]


class Encoder:
    """Encodes a request's images on a thread pool (or inline when they are tiny); times each request."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cmserve-encode")

    async def encode(self, images: np.ndarray, fmt: str) -> tuple[list[bytes], float]:
        """(encoded images, seconds spent encoding)."""
        if fmt not in MIME:
            raise ValueError(f"format must be one of {sorted(MIME)}, got {fmt!r}")
        if images.shape[0] * images.shape[1] * images.shape[2] <= INLINE_MAX_PIXELS:
            return _timed(images, fmt)
        return await asyncio.get_running_loop().run_in_executor(self._pool, _timed, images, fmt)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _timed(images: np.ndarray, fmt: str) -> tuple[list[bytes], float]:
    start = time.perf_counter()
    encoded = encode_images(images, fmt)
    return encoded, time.perf_counter() - start
