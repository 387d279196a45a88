"""POST /v1/edit: a reference image and a task become a Plan of the sampler (CM Algorithm 4, models.editing).

Only this is particular to editing: decoding the image (and mask), checking the task's fields against the model,
and saying how to build the projection, which the engine thread does as it draws the noise (the event loop does
no torch work: each torch call is a GIL hand-off with the engine). Every other duty (key, rate limit, body,
validation, queueing, errors, metrics, the response) is GenerateHandler's (generate.py), the same code as
/v1/generate's.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from models.editing import Projection, colorization, inpainting, super_resolution

from ..errors import InvalidRequest
from ..registry import ServedModel
from ..schemas import EditRequest
from .generate import Endpoint, Plan

PATH = "/v1/edit"
FORMATS = ("PNG", "JPEG", "WEBP")  # what Pillow may decode here (it would read many more)
TASK_FIELDS = {"inpaint": ("mask", "box"), "superres": ("factor",), "colorize": (), "denoise": ("sigma",)}


def decode_image(b64: str, field: str, width: int, height: int, mode: str) -> np.ndarray:
    """A base64 PNG, JPEG or WebP of exactly width × height as a uint8 array (H, W, C) in `mode` (L or RGB).

    The size is read from the header before anything is decoded, so no image larger than the model's is ever
    expanded in memory (a decompression bomb is refused by its header). Errors name `field`.
    """
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field}: not valid base64", field=field) from None
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:  # reads the header only
            if image.size != (width, height):
                raise InvalidRequest(f"{field}: the image is {image.width}×{image.height}; this needs "
                                     f"{width}×{height}", field=field)
            pixels = np.asarray(image.convert(mode))  # decodes
    except InvalidRequest:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InvalidRequest(f"{field}: not a PNG, JPEG or WebP image ({type(e).__name__})", field=field) from None
    return pixels.reshape(height, width, -1)


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> float32 (C, H, W) in [-1, 1] (the inverse of models.sampling.to_uint8)."""
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1


def reference(body: EditRequest, served: ServedModel, scale: int = 1, grey: bool = False) -> np.ndarray:
    """The request's image, uint8 (H/scale, W/scale, C): in the model's channels, or grey (C = 1)."""
    c, h, w = served.config.image_shape
    mode = "L" if grey or c == 1 else "RGB"
    return decode_image(body.image, "image", w // scale, h // scale, mode)


def regenerated(body: EditRequest, served: ServedModel) -> np.ndarray:
    """Ω of inpainting, bool (H, W): True where pixels are regenerated, from `mask` (white) or `box`."""
    _, h, w = served.config.image_shape
    if (body.mask is None) == (body.box is None):
        raise InvalidRequest("inpaint needs either mask (a PNG, white = regenerate) or box [x0, y0, x1, y1]",
                             field="mask" if body.mask is None else "box")
    if body.mask is not None:
        return decode_image(body.mask, "mask", w, h, "L")[..., 0] > 127
    assert body.box is not None
    x0, y0, x1, y1 = body.box
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise InvalidRequest(f"box {body.box} must satisfy 0 ≤ x0 < x1 ≤ {w} and 0 ≤ y0 < y1 ≤ {h} (pixels, end "
                             "exclusive)", field="box")
    omega = np.zeros((h, w), dtype=bool)
    omega[y0:y1, x0:x1] = True
    return omega


def projected(build: Callable[[], Projection]) -> Callable[[], tuple[Projection, torch.Tensor]]:
    """The Job's `edit`: the projection and the start it implies, made when the engine thread prepares the job."""
    def edit() -> tuple[Projection, torch.Tensor]:
        projection = build()
        return projection, projection.start
    return edit


def plan_inpaint(body: EditRequest, served: ServedModel) -> Plan:
    omega, image = regenerated(body, served), reference(body, served)
    edit = projected(lambda: inpainting(to_tensor(image), torch.from_numpy(omega)))
    return Plan("inpaint", body.n, body.seed, how={"edit": edit})


def plan_superres(body: EditRequest, served: ServedModel) -> Plan:
    _, h, w = served.config.image_shape
    p = body.factor
    if p is None:
        raise InvalidRequest("superres needs factor (the image is then the model's size / factor)", field="factor")
    if h % p or w % p:
        raise InvalidRequest(f"factor {p} must divide the model's size {w}×{h}", field="factor")
    low = reference(body, served, scale=p)
    return Plan("superres", body.n, body.seed, how={"edit": projected(lambda: super_resolution(to_tensor(low), p))})


def plan_colorize(body: EditRequest, served: ServedModel) -> Plan:
    channels = served.config.image_shape[0]
    if channels != 3:
        raise InvalidRequest(f"model {served.name!r} has {channels} channel(s); colorize needs an RGB model",
                             field="task")
    grey = reference(body, served, grey=True)
    return Plan("colorize", body.n, body.seed, how={"edit": projected(lambda: colorization(to_tensor(grey)))})


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
    image = reference(body, served)
    return Plan("denoise", body.n, body.seed, sigmas=[body.sigma], how={"edit": lambda: (None, to_tensor(image)[None]),
                                                                       "noised_start": False})


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
