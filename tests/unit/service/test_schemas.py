"""Request schema, content negotiation, image encoding, API keys and the rate limit: the small pure parts."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from service.api.errors import describe_validation_error
from service.api.generate import _json_images, parse_request
from service.api.negotiate import choose_representation
from service.api.security import ANONYMOUS, ApiKeys, RateLimiter
from service.encode import encode_image, encode_png
from service.errors import InvalidRequest, NotAcceptable, RateLimited, Unauthorized
from service.schemas import MAX_SEED, EditRequest, GenerateRequest, GenerateResponse, SamplingRequest


def first_error(body: dict, schema: type[SamplingRequest] = GenerateRequest) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as e:
        schema.model_validate_json(json.dumps(body))
    errors = [{**error, "loc": ("body", *error["loc"])} for error in e.value.errors()]  # as FastAPI reports them
    return describe_validation_error(errors, schema)


def test_defaults() -> None:
    req = GenerateRequest()
    assert (req.model, req.n, req.steps, req.sigmas, req.seed, req.class_label, req.format) == (
        None, 1, None, None, None, None, "png"
    )


@pytest.mark.parametrize(
    ("body", "field", "text"),
    [
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"n": "2"}, "n", "valid integer"),
        ({"n": 1.5}, "n", "valid integer"),
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"steps": True}, "steps", "valid integer"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"seed": MAX_SEED + 1}, "seed", "less than or equal to"),
        ({"sigmas": []}, "sigmas", "at least 1 item"),
        ({"sigmas": [80, "x"]}, "sigmas[1]", "valid number"),
        ({"steps": 2, "sigmas": [80.0, 1.0]}, "sigmas", "either steps or sigmas, not both"),
        ({"format": "gif"}, "format", "'png', 'jpeg' or 'webp'"),
        ({"class_label": 1.5}, "class_label", "valid integer or Input should be a valid string"),
        ({"n": 0, "steps": 0}, "n", "(and 1 more invalid field)"),
        ({"model": ""}, "model", "at least 1 character"),
        ({"bogus": 1}, "bogus", "unknown field; allowed fields: model, n, steps, sigmas, seed, class_label, format"),
    ],
)
def test_invalid_fields_are_named(body: dict, field: str, text: str) -> None:
    message, named = first_error(body)
    assert named == field
    assert message.startswith(f"{field}: ") and text in message


@pytest.mark.parametrize(
    ("body", "schema", "field", "text"),
    [
        ({"interpolate": {"seeds": [1, 2], "alphas": [0.5, 2]}}, GenerateRequest, "interpolate.alphas[1]",
         "less than or equal to 1"),
        ({"interpolate": {"seeds": [1, "x"], "points": 3}}, GenerateRequest, "interpolate.seeds[1]", "valid integer"),
        ({"interpolate": {"seeds": [1, 2], "points": 3, "step": 1}}, GenerateRequest, "interpolate.step",
         "unknown field; allowed fields: seeds, points, alphas"),
        ({"image": "x", "task": "inpaint", "colour": 1}, EditRequest, "colour", "allowed fields: model, n, steps"),
    ],
)
def test_nested_fields_and_each_endpoints_own_fields_are_named(body: dict, schema: type[SamplingRequest], field: str,
                                                               text: str) -> None:
    message, named = first_error(body, schema)
    assert named == field
    assert message.startswith(f"{field}: ") and text in message
    if schema is EditRequest:
        assert all(name in message for name in ("image", "task", "mask", "box", "factor"))


def test_non_finite_sigmas_are_invalid() -> None:
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate_json('{"sigmas": [Infinity]}')


def test_class_label_is_an_index_or_a_name() -> None:
    assert GenerateRequest(class_label=3).class_label == 3
    assert GenerateRequest(class_label="three").class_label == "three"


@pytest.mark.parametrize(
    ("accept", "fmt", "given", "n", "chosen"),
    [
        (None, "png", False, 1, None),
        ("*/*", "png", False, 1, None),
        ("application/json", "png", False, 1, None),
        ("image/png", "png", False, 1, "png"),
        ("image/webp", "png", False, 1, "webp"),  # the Accept header picks the format when the body does not
        ("image/*", "jpeg", True, 1, "jpeg"),
        ("image/png;q=0.5, application/json", "png", False, 1, None),
        ("image/png, application/json;q=0.9", "png", False, 1, "png"),
        ("image/png, */*;q=0.1", "png", False, 4, None),
        ("text/html, image/jpeg;q=0.8", "png", False, 1, "jpeg"),
    ],
)
def test_content_negotiation(accept: str | None, fmt: str, given: bool, n: int, chosen: str | None) -> None:
    assert choose_representation(accept, fmt, given, n) == chosen


def test_raw_images_need_n_equal_one() -> None:
    with pytest.raises(NotAcceptable, match="only available for n = 1") as e:
        choose_representation("image/png", "png", False, 2)
    assert e.value.field == "n"
    with pytest.raises(NotAcceptable, match="matches nothing"):
        choose_representation("image/png", "jpeg", True, 1)  # body says jpeg, Accept only png
    with pytest.raises(NotAcceptable):
        choose_representation("text/html", "png", False, 1)


@pytest.mark.parametrize("shape", [(8, 8, 1), (5, 7, 1), (32, 32, 3)])
def test_png_encoder_round_trips(shape: tuple[int, int, int]) -> None:
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(image)
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(decoded.reshape(shape), image)
    scanlines = shape[0] * (1 + shape[1] * shape[2])
    idat = data[data.index(b"IDAT") + 4:]
    assert idat[:2] == (b"\x78\x01" if scanlines <= 1024 else b"\x78\x9c")  # stored when tiny, else level 6


def test_lossless_webp_and_jpeg_decode() -> None:
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    webp = Image.open(io.BytesIO(encode_image(image, "webp")))
    assert webp.format == "WEBP"
    np.testing.assert_array_equal(np.asarray(webp.convert("L")), image[..., 0])
    jpeg = Image.open(io.BytesIO(encode_image(image, "jpeg")))
    assert jpeg.format == "JPEG" and jpeg.size == (8, 8)


def test_api_keys() -> None:
    assert ApiKeys([]).check(None) == ANONYMOUS
    keys = ApiKeys(["a" * 16, "b" * 16])
    assert keys.check("Bearer " + "b" * 16) == "b" * 16
    assert keys.check("bearer " + "a" * 16) == "a" * 16
    for header in (None, "", "Basic abc", "Bearer", "Bearer " + "c" * 16, "Bearer " + "a" * 15):
        with pytest.raises(Unauthorized):
            keys.check(header)


def test_rate_limit_is_a_token_bucket_per_key() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, clock=lambda: now[0])
    limiter.check("k")
    limiter.check("k")  # burst of 2
    with pytest.raises(RateLimited) as e:
        limiter.check("k")
    assert e.value.retry_after_s == 1
    limiter.check("other")  # its own bucket
    now[0] += 0.5  # one token back
    limiter.check("k")
    RateLimiter(0).check("k")  # off


@pytest.mark.parametrize(("model", "sigmas", "labels"), [
    ("digits", [80.0], [7]),
    ("cifar ünï \"x\"", [80.0, 0.8214, 1e-05], [None, None, None]),
    ("m", [2], [0, 9]),
])
def test_the_response_is_the_documented_json(model, sigmas, labels) -> None:
    encoded = [bytes([i]) * (40 + i) for i in range(len(labels))]
    timings = {"queue": 0.125, "compute": 21.0, "encode": 1e-05, "total": 33.333}
    reply = _json_images(encoded, "png", model, 2**63 - 1, sigmas, labels, timings)
    assert reply.status == 200 and reply.headers == [(b"content-type", b"application/json")]
    doc = GenerateResponse.model_validate_json(reply.body)
    assert (doc.model, doc.seed, doc.sigmas) == (model, 2**63 - 1, [float(s) for s in sigmas])
    assert [(i.index, i.seed, i.class_label, base64.b64decode(i.b64)) for i in doc.images] == [
        (i, 2**63 - 1 + i, label, data) for i, (data, label) in enumerate(zip(encoded, labels, strict=True))]
    assert doc.timings_ms.model_dump() == timings


CORPUS = [
    b'{}', b'{"n": 1}', b'{"n": 8, "steps": 2, "seed": 42}', b'{"n": 1.0}', b'{"n": true}', b'{"n": "1"}',
    b'{"n": 0}', b'{"n": 1e2}', b'{"n": 100000000000000000000000}', b'{"seed": 9223372036854775807}',
    b'{"seed": 9223372036854775808}', b'{"seed": -1}', b'{"seed": null}', b'{"sigmas": [80, 0.5]}',
    b'{"sigmas": ["80", "0.5"]}', b'{"sigmas": [NaN]}', b'{"sigmas": [Infinity, 1]}', b'{"sigmas": [1e400]}',
    b'{"sigmas": []}', b'{"steps": 2, "sigmas": [80.0]}', b'{"class_label": 3}', b'{"class_label": "3"}',
    b'{"class_label": 3.0}', b'{"class_label": false}', b'{"class_label": "seven"}', b'{"format": "webp"}',
    b'{"format": "WEBP"}', b'{"format": "gif"}', b'{"model": ""}', b'{"model": "digits"}', b'{"model": "\\u00e9"}',
    b'{"model": "\\ud800"}', b'{"extra": 1}', b'{"n": 1, "n": 2}', b'{"n": 1} ', b' \n{"n": 1}', b'{"n": 1}x',
    b'{"n": 1}{}', b'[]', b'[{"n": 1}]', b'null', b'1', b'"x"', b'', b'{', b'{"n": 01}', b'{"n": -0}',
    b'\xef\xbb\xbf{"n": 1}', b'{"model": "\xff"}', '{"model": "dígits"}'.encode(), b'{"steps": null, "sigmas": null}',
    b'[' * 5000 + b']' * 5000, b'{"n": ' + b'[' * 3000 + b']' * 3000 + b'}',
]


@pytest.mark.parametrize("body", CORPUS, ids=range(len(CORPUS)))
def test_a_body_is_accepted_as_json_then_validation_would_and_refused_with_a_422(body: bytes) -> None:
    """parse_request validates the JSON in one pass; whatever it accepts, json.loads and then validating the Python
    objects accept as the same request, and whatever it refuses is an InvalidRequest (a 422), never a crash."""
    try:
        parsed = parse_request(body, "application/json")
    except InvalidRequest as e:
        assert e.message
        parsed = None
    try:
        data = json.loads(body)
        reference = GenerateRequest.model_validate(data) if isinstance(data, dict) else None
    except (ValueError, RecursionError, ValidationError):
        reference = None
    if parsed is not None:
        assert reference is not None and parsed.model_dump() == reference.model_dump()
        assert parsed.model_fields_set == reference.model_fields_set
    elif body in (b'{}', b'{"n": 1}', b'{"n": 8, "steps": 2, "seed": 42}', b'{"class_label": "seven"}',
                  b'\xef\xbb\xbf{"n": 1}'):
        raise AssertionError("a common body was refused")


def test_every_image_seed_stays_in_range() -> None:
    """Image i uses seed + i: a seed whose last image would pass 2^63 − 1 is refused, naming `seed`."""
    message, field = first_error({"seed": MAX_SEED, "n": 2})
    assert field == "seed" and "seed + n − 1" in message and str(MAX_SEED - 1) in message
    assert GenerateRequest.model_validate({"seed": MAX_SEED - 1, "n": 2}).seed == MAX_SEED - 1
    assert GenerateRequest.model_validate({"seed": MAX_SEED}).seed == MAX_SEED


def test_a_random_seed_leaves_room_for_every_image(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.api import generate

    monkeypatch.setattr(generate._seeds, "getrandbits", lambda bits: 2**bits - 1)  # the largest draw
    for n in (1, 2, 64):
        seed = generate.random_seed(n)
        assert seed + n - 1 == MAX_SEED
        GenerateRequest.model_validate({"seed": seed, "n": n})  # every echoed seed is one the API accepts


def test_a_huge_accept_header_is_parsed_in_bounded_time_with_a_bounded_message() -> None:
    import time

    accept = ", ".join(f"text/x-{i};q=0.5" for i in range(300_000))  # about 4 MiB
    started = time.perf_counter()
    with pytest.raises(NotAcceptable) as e:
        choose_representation(accept, "png", False, 1)
    assert time.perf_counter() - started < 0.1
    assert len(e.value.message) < 500
