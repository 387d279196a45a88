"""Content negotiation for POST /v1/generate: JSON (default), or the raw image for n = 1."""

from __future__ import annotations

from ..encode import MIME
from ..errors import NotAcceptable

JSON = "application/json"
MAX_RANGES = 32  # media ranges of an Accept header that are read; any after them are ignored
MAX_SHOWN = 200  # characters of the Accept header an error message quotes


def _parse_accept(accept: str) -> list[tuple[str, float]]:
    """'image/png;q=0.9, */*;q=0.1' -> [('image/png', 0.9), ('*/*', 0.1)]; the first MAX_RANGES ranges only,
    so the work is bounded whatever the header's length (the server caps that too: CM_MAX_HEADER_BYTES)."""
    ranges = []
    for item in accept.split(",", MAX_RANGES)[:MAX_RANGES]:
        media, *params = (p.strip() for p in item.split(";"))
        if not media:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    q = 0.0
        ranges.append((media.lower(), q))
    return ranges


def _quality(mime: str, ranges: list[tuple[str, float]]) -> float:
    """The q of the most specific range matching `mime` (type/sub > type/* > */*), 0 if none."""
    kind = mime.split("/")[0]
    best, specificity = 0.0, -1
    for media, q in ranges:
        level = 2 if media == mime else 1 if media == f"{kind}/*" else 0 if media == "*/*" else -1
        if level > specificity:
            best, specificity = q, level
    return best


def choose_representation(accept: str | None, fmt: str, fmt_given: bool, n: int) -> str | None:
    """None for JSON, or the image format to send raw; NotAcceptable when nothing the client accepts fits.

    A raw image is possible for n = 1 only. Ties go to JSON, then to the request's format. When the
    request names a format explicitly, only that image type is offered.
    """
    if not accept or accept == "*/*" or accept == JSON:
        return None
    ranges = _parse_accept(accept)
    offers = [(JSON, None)]
    if n == 1:
        formats = [fmt] if fmt_given else [fmt, *(f for f in MIME if f != fmt)]
        offers += [(MIME[f], f) for f in formats]
    best, chosen = 0.0, None
    for mime, choice in offers:
        q = _quality(mime, ranges)
        if q > best:
            best, chosen = q, (choice,)
    if chosen is not None:
        return chosen[0]
    wanted = _shown(", ".join(media for media, q in ranges if q > 0) or accept)
    if n > 1 and any(media.startswith("image/") for media, q in ranges if q > 0):
        raise NotAcceptable(
            f"Accept: {wanted} asks for a raw image, which is only available for n = 1; "
            "accept application/json for several images",
            field="n",
        )
    offered = ", ".join(mime for mime, _ in offers)
    raise NotAcceptable(f"Accept: {wanted} matches nothing this request can return ({offered})", field=None)


def _shown(text: str) -> str:
    """Text quoted in an error message, at most MAX_SHOWN characters."""
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…"
