"""POST /v1/edit: a reference image and a task become a Plan of the sampler (CM Algorithm 4, models.editing).

Only this is particular to editing: checking the task's fields against the model, and saying how to decode the
image (and mask) and build the projection, which the engine thread does as it draws the noise: the event loop
does no decoding and no torch work (each torch call is a GIL hand-off with the engine), and an image that does
not decode, or has the wrong size, fails its request alone with the same 422 naming the field. Every other duty
(key, rate limit, body, validation, queueing, errors, metrics, the response) is GenerateHandler's (generate.py),
the same code as /v1/generate's.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyspng
import torch
from PIL import Image

from models.editing import Projection, colorization, inpainting, super_resolution

from ..errors import InvalidRequest
from ..registry import ServedModel
from ..schemas import EditRequest
from .generate import Endpoint, Plan

PATH = "/v1/edit"
FORMATS = ("PNG", "JPEG", "WEBP")  # what Pillow may decode here (it would read many more)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR = {"L": 0, "RGB": 2}  # the IHDR colour type that is each mode as it stands (8 bits a channel)
PLAIN_CHUNKS = frozenset((b"IHDR", b"IDAT", b"IEND"))  # no text, ICC profile, palette or transparency
TASK_FIELDS = {"inpaint": ("mask", "box"), "superres": ("factor",), "colorize": (), "denoise": ("sigma",)}


@dataclass(frozen=True)
class EncodedImage:
    """A request's PNG, JPEG or WebP: its base64 checked on the event loop, its pixels decoded by `pixels()` when
    the engine thread prepares the job (decoding is host work for the batch, like drawing the noise)."""

    data: bytes
    field: str  # the request field it came from, named by every error
    width: int  # the size it must have
    height: int
    mode: str  # L or RGB

    def pixels(self) -> np.ndarray:
        """uint8 (H, W, C) in `mode`. The size is read from the header before anything is decoded, so no image
        larger than the model's is ever expanded in memory (a decompression bomb is refused by its header)."""
        field = self.field
        try:
            if self.plain_png():  # one C call (libspng) where Pillow spends twenty microseconds in Python
                return pyspng.load(self.data, self.mode).reshape(self.height, self.width, -1)
            with Image.open(io.BytesIO(self.data), formats=FORMATS) as image:  # reads the header only
                if image.size != (self.width, self.height):
                    raise InvalidRequest(f"{field}: the image is {image.width}×{image.height}; this needs "
                                         f"{self.width}×{self.height}", field=field)
                pixels = np.asarray(image if image.mode == self.mode else image.convert(self.mode))  # decodes
        except InvalidRequest:
            raise
        except (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError) as e:
            raise InvalidRequest(f"{field}: not a PNG, JPEG or WebP image ({type(e).__name__})",
                                 field=field) from None
        return pixels.reshape(self.height, self.width, -1)

    def plain_png(self) -> bool:
        """Whether the data is a PNG of exactly the size and mode wanted, 8 bits a channel, holding pixels alone
        (chunks IHDR, IDAT, IEND): libspng then decodes the pixels Pillow would, with nothing to convert. Only the
        chunk headers are read; anything else goes to Pillow."""
        data = self.data
        if len(data) < 33 or not data.startswith(PNG_SIGNATURE):
            return False
        _, kind, width, height, depth, colour = struct.unpack_from(">I4sIIBB", data, 8)
        if kind != b"IHDR" or (width, height, depth, colour) != (self.width, self.height, 8, PNG_COLOUR[self.mode]):
            return False
        at = 8
        while at + 8 <= len(data):
            length, kind = struct.unpack_from(">I4s", data, at)
            if kind not in PLAIN_CHUNKS:
                return False
            if kind == b"IEND":
                return True
            at += 12 + length
        return False


def encoded_image(b64: str, field: str, width: int, height: int, mode: str) -> EncodedImage:
    """The field's image of exactly width × height, to decode in `mode` (L or RGB); not base64 -> 422."""
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field}: not valid base64", field=field) from None
    return EncodedImage(data, field, width, height, mode)


def signed(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C) -> float32 (C, H, W) in [-1, 1], the inverse of models.sampling.to_uint8."""
    return pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(127.5) - np.float32(1)


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """`signed` as a tensor."""
    return torch.from_numpy(signed(pixels))


def reference(body: EditRequest, served: ServedModel, scale: int = 1, grey: bool = False) -> EncodedImage:
    """The request's image, (H/scale, W/scale) in the model's channels, or grey."""
    c, h, w = served.config.image_shape
    return encoded_image(body.image, "image", w // scale, h // scale, "L" if grey or c == 1 else "RGB")


def regenerated(body: EditRequest, served: ServedModel) -> tuple[EncodedImage | None, tuple[int, int, int, int] | None]:
    """Ω of inpainting as data: the `mask` (white = regenerate, decoded by the engine thread) or the `box` (checked
    now)."""
    _, h, w = served.config.image_shape
    if (body.mask is None) == (body.box is None):
        raise InvalidRequest("inpaint needs either mask (a PNG, white = regenerate) or box [x0, y0, x1, y1]",
                             field="mask" if body.mask is None else "box")
    if body.mask is not None:
        return encoded_image(body.mask, "mask", w, h, "L"), None
    assert body.box is not None
    x0, y0, x1, y1 = body.box
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise InvalidRequest(f"box {body.box} must satisfy 0 ≤ x0 < x1 ≤ {w} and 0 ≤ y0 < y1 ≤ {h} (pixels, end "
                             "exclusive)", field="box")
    return None, (x0, y0, x1, y1)


@dataclass(frozen=True)
class Edit:
    """The Job's `edit` as data, not a closure, so that it can cross to an engine process (service/wire.py):
    calling it makes (projection, start) when the engine thread prepares the job (decoding is host work there)."""

    task: str  # inpaint, superres, colorize, denoise
    image: EncodedImage
    mask: EncodedImage | None = None  # inpaint: white = regenerate
    box: tuple[int, int, int, int] | None = None  # inpaint: x0, y0, x1, y1 regenerated (end exclusive)
    factor: int = 1  # superres: the image is the model's size / factor

    def __call__(self) -> tuple[Projection | None, torch.Tensor]:
        if self.task == "denoise":  # x_T is the input itself, (1, C, H, W); no projection
            return None, to_tensor(self.image.pixels())[None]
        projection = PROJECTIONS[self.task](self)
        return projection, projection.start

    def omega(self) -> np.ndarray:
        """Ω of inpainting: (H, W), True where pixels are regenerated."""
        if self.mask is not None:
            return self.mask.pixels()[..., 0] > 127
        assert self.box is not None
        x0, y0, x1, y1 = self.box
        omega = np.zeros((self.image.height, self.image.width), dtype=bool)
        omega[y0:y1, x0:x1] = True
        return omega


PROJECTIONS: dict[str, Callable[[Edit], Projection]] = {
    "inpaint": lambda e: inpainting(signed(e.image.pixels()), e.omega()),
    "superres": lambda e: super_resolution(to_tensor(e.image.pixels()), e.factor),
    "colorize": lambda e: colorization(to_tensor(e.image.pixels())),
}


def plan_inpaint(body: EditRequest, served: ServedModel) -> Plan:
    mask, box = regenerated(body, served)
    edit = Edit("inpaint", reference(body, served), mask=mask, box=box)
    return Plan("inpaint", body.n, body.seed, how={"edit": edit})


def plan_superres(body: EditRequest, served: ServedModel) -> Plan:
    _, h, w = served.config.image_shape
    p = body.factor
    if p is None:
        raise InvalidRequest("superres needs factor (the image is then the model's size / factor)", field="factor")
    if h % p or w % p:
        raise InvalidRequest(f"factor {p} must divide the model's size {w}×{h}", field="factor")
    edit = Edit("superres", reference(body, served, scale=p), factor=p)
    return Plan("superres", body.n, body.seed, how={"edit": edit})


def plan_colorize(body: EditRequest, served: ServedModel) -> Plan:
    channels = served.config.image_shape[0]
    if channels != 3:
        raise InvalidRequest(f"model {served.name!r} has {channels} channel(s); colorize needs an RGB model",
                             field="task")
    return Plan("colorize", body.n, body.seed, how={"edit": Edit("colorize", reference(body, served, grey=True))})


def plan_denoise(body: EditRequest, served: ServedModel) -> Plan:
    """One evaluation f(y, σ) of the noisy input itself (no projection, no added noise)."""
    cfg = served.config
    if body.sigma is None:
        raise InvalidRequest("denoise needs sigma, the input's noise level", field="sigma")
    if not cfg.sigma_min < body.sigma <= cfg.sigma_max:
        raise InvalidRequest(f"sigma must be in ({cfg.sigma_min:g}, {cfg.sigma_max:g}], got {body.sigma}",
                             field="sigma")
    for name in ("steps", "sigmas"):
        if name in body.model_fields_set:
            raise InvalidRequest(f"denoise is one evaluation at sigma; omit {name}", field=name)
    edit = Edit("denoise", reference(body, served))
    return Plan("denoise", body.n, body.seed, sigmas=[body.sigma], how={"edit": edit, "noised_start": False})


PLANS: dict[str, Callable[[EditRequest, ServedModel], Plan]] = {
    "inpaint": plan_inpaint, "superres": plan_superres, "colorize": plan_colorize, "denoise": plan_denoise,
}


def plan_edit(body: EditRequest, served: ServedModel) -> Plan:
    """The task's plan, after refusing the fields of other tasks (a mask with superres is a mistake, not noise)."""
    for task, names in TASK_FIELDS.items():
        for name in names:
            if task != body.task and getattr(body, name) is not None:
                raise InvalidRequest(f"{name} belongs to task {task}, not {body.task}", field=name)
    return PLANS[body.task](body, served)


EDIT = Endpoint(PATH, EditRequest, plan_edit, "unknown")  # metrics.UNKNOWN_TASK until the body names its task
