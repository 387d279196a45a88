"""Request and response bodies of the HTTP API (pydantic), with the examples that OpenAPI shows."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_SEED = 2**63 - 1
EXAMPLE_PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAAEUlEQVR4nGNgQAL//5PDAAMArqcL9UW5Aq8AAAAASUVORK5CYII="
Format = Literal["png", "jpeg", "webp"]
EditTask = Literal["inpaint", "superres", "colorize", "denoise"]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, strict=True)]
Alpha = Annotated[FiniteFloat, Field(ge=0.0, le=1.0)]


class SamplingRequest(BaseModel):
    """The fields of every sampling request (POST /v1/generate and /v1/edit). Either `steps` or `sigmas`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, min_length=1, max_length=64,
        description="Served model name (GET /v1/models); default: the server's default",
    )
    n: int = Field(1, ge=1, strict=True, description="Images to generate, 1 … CM_MAX_IMAGES_PER_REQUEST (default 64)")
    steps: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="Sampling steps, 1 … CM_MAX_STEPS (default 8): the checkpoint's recommended schedule for that "
        "many steps, or the documented default schedule; default 1",
    )
    sigmas: list[FiniteFloat] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Explicit schedule: strictly decreasing, first ≤ σ_max, all > σ_min; at most CM_MAX_STEPS values",
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, strict=True,
        description="Image i uses seed + i; seed + n − 1 must be at most 2^63 − 1, so that every image's seed is "
        "one the API accepts. Random when absent (and echoed back)",
    )
    class_label: StrictInt | Annotated[StrictStr, Field(max_length=64)] | None = Field(
        None,
        description="Class index or name (conditional models only); when absent each image draws its own from "
        "its seed",
    )
    format: Format = Field("png", description="Image encoding: png, jpeg or webp (lossless)")

    @field_validator("seed")
    @classmethod
    def _every_image_seed_valid(cls, seed: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n")
        if seed is not None and isinstance(n, int) and seed + n - 1 > MAX_SEED:
            raise ValueError(f"seed + n − 1 must be at most {MAX_SEED} (image i uses seed + i); with n = {n} the "
                             f"largest seed is {MAX_SEED - n + 1}")
        return seed

    @field_validator("sigmas")
    @classmethod
    def _one_schedule(cls, sigmas: list[float] | None, info: ValidationInfo) -> list[float] | None:
        if sigmas is not None and info.data.get("steps") is not None:
            raise ValueError("give either steps or sigmas, not both")
        return sigmas


class Interpolation(BaseModel):
    """K images between two seeds: image k's x_T is the spherical interpolation of the seeds' x_T at α_k."""

    model_config = ConfigDict(extra="forbid")

    seeds: list[Seed] = Field(min_length=2, max_length=2, description="[a, b]: α = 0 is seed a's image, 1 is b's x_T")
    points: int | None = Field(None, ge=2, le=1024, strict=True, description="K evenly spaced α, 0 … 1")
    alphas: list[Alpha] | None = Field(None, min_length=1, max_length=1024, description="Explicit α values in [0, 1]")

    @model_validator(mode="after")
    def _points_or_alphas(self) -> Interpolation:
        if (self.points is None) == (self.alphas is None):
            raise ValueError("give either points or alphas")
        return self

    def alpha_values(self) -> list[float]:
        """α per image."""
        if self.alphas is not None:
            return list(self.alphas)
        assert self.points is not None
        return [k / (self.points - 1) for k in range(self.points)]


class GenerateRequest(SamplingRequest):
    """What to generate. Either `steps` or `sigmas` (not both); everything has a default."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"n": 4, "steps": 2, "seed": 42, "class_label": 7},
                {"model": "digits", "sigmas": [80.0, 0.821], "format": "webp"},
                {"interpolate": {"seeds": [1, 2], "points": 5}, "steps": 2},
            ]
        },
    )

    interpolate: Interpolation | None = Field(
        None, description="Images between two seeds (instead of n and seed): n is the number of points; every image "
        "takes seed a's step noise and class label"
    )


class EditRequest(SamplingRequest):
    """A zero-shot edit (CM Algorithm 4) of one reference image; n samples of it, image i from seed + i."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"task": "inpaint", "image": EXAMPLE_PNG_B64, "box": [0, 4, 8, 8], "class_label": 7, "steps": 2},
                {"task": "superres", "image": EXAMPLE_PNG_B64, "factor": 2, "n": 4},
            ]
        },
    )

    image: str = Field(
        min_length=1, description="The reference, base64 PNG, JPEG or WebP of the model's size (grayscale for "
        "colorize; the model's size / factor for superres)"
    )
    task: EditTask = Field(description="inpaint, superres, colorize (RGB models) or denoise")
    mask: str | None = Field(
        None, min_length=1, description="inpaint: base64 PNG of the model's size, white = regenerate (or give box)"
    )
    box: list[StrictInt] | None = Field(
        None, min_length=4, max_length=4, description="inpaint: [x0, y0, x1, y1] to regenerate, pixels, end exclusive"
    )
    factor: int | None = Field(None, ge=2, strict=True, description="superres: the upscaling factor, dividing the size")
    sigma: FiniteFloat | None = Field(None, gt=0, description="denoise: the input's noise level, in σ_min … σ_max")


class GeneratedImage(BaseModel):
    index: int = Field(description="Position in the request, 0 … n-1")
    seed: int = Field(description="This image's seed (the request's seed + index)")
    class_label: int | None = Field(description="Class index used (None for unconditional models)")
    mime: str = Field(examples=["image/png"])
    b64: str = Field(description="The encoded image, base64")
    alpha: float | None = Field(None, description="interpolate: this image's α (absent otherwise)")


class Timings(BaseModel):
    queue: float = Field(description="Milliseconds from admission to the first network evaluation")
    compute: float = Field(description="Milliseconds from the first network evaluation to the last")
    encode: float = Field(description="Milliseconds spent encoding the images")
    total: float = Field(description="Milliseconds from arrival to the response")


class GenerateResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "digits",
                    "created": 1767225600,
                    "seed": 42,
                    "sigmas": [80.0],
                    "images": [
                        {
                            "index": 0,
                            "seed": 42,
                            "class_label": 7,
                            "mime": "image/png",
                            "b64": EXAMPLE_PNG_B64,
                        }
                    ],
                    "timings_ms": {"queue": 0.2, "compute": 1.1, "encode": 0.02, "total": 1.6},
                }
            ]
        }
    )

    model: str
    created: int = Field(description="Unix time of the response, seconds")
    seed: int = Field(description="The request's seed (image i used seed + i)")
    sigmas: list[float] = Field(description="The σ schedule used")
    images: list[GeneratedImage]
    timings_ms: Timings


class ErrorDetail(BaseModel):
    type: str = Field(examples=["invalid_request"], description="Machine-readable error kind")
    message: str = Field(description="What was wrong, naming the value and what is allowed")
    field: str | None = Field(None, description="The request field at fault, if any", examples=["n"])


class ErrorResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"error": {"type": "invalid_request", "message": "n must be 1…64, got 100", "field": "n"}}]
        }
    )

    error: ErrorDetail


class ModelInfo(BaseModel):
    name: str
    default: bool = Field(description="True for the model used when a request names none")
    preset: str | None
    image_shape: list[int] = Field(description="[C, H, W]", examples=[[1, 8, 8]])
    num_classes: int = Field(description="0 for unconditional models")
    class_names: list[str] | None
    sigma_min: float
    sigma_max: float
    recommended_schedules: dict[str, list[float]] = Field(
        description="steps -> σ schedule used for that many steps", examples=[{"1": [80.0], "2": [80.0, 0.821]}]
    )
    max_steps: int
    max_images_per_request: int
    checkpoint_sha256: str
    training_step: int


class ModelsResponse(BaseModel):
    default_model: str
    models: list[ModelInfo]


class StatsResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "requests_per_s": 12.5,
                    "images_per_s": 50.0,
                    "queue_depth": 0,
                    "mean_images_per_forward": 3.2,
                    "ready": True,
                    "in_progress": 1,
                }
            ]
        }
    )

    requests_per_s: float = Field(description="Generate requests per second over the last ~10 s")
    images_per_s: float = Field(description="Images finished per second over the last ~10 s")
    queue_depth: int = Field(description="Images waiting for the device now")
    mean_images_per_forward: float = Field(description="Mean images per network evaluation (recent)")
    ready: bool
    in_progress: int = Field(description="Generate requests being handled now")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    status: Literal["ready", "loading", "draining", "failed"]
