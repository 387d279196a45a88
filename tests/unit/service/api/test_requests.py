"""What every request has (service/api/requests.py): its id and its access-log line."""

from __future__ import annotations

import logging

import pytest

from service.api.requests import RequestLog, log_request, request_id


@pytest.mark.parametrize(("given", "kept"), [
    (b"abc-1", True), (b"A.b_c:d-9", True), (b"x" * 128, True), (b"x" * 129, False), (b"a b", False), (b"", False),
    ("é".encode(), False),
])
def test_a_sane_client_request_id_is_kept_else_a_new_one_is_made(given: bytes, kept: bool) -> None:
    rid = request_id([(b"x-request-id", given)])
    if kept:
        assert rid == given.decode()
    else:
        assert len(rid) == 32 and int(rid, 16) >= 0
    assert request_id([]) != request_id([])


def test_probes_log_at_debug_and_their_failures_at_info(caplog: pytest.LogCaptureFixture) -> None:
    log = RequestLog(request_id="r", started=0.0, model="digits", fields={"n": 2})
    with caplog.at_level(logging.DEBUG, logger="cmserve.access"):
        log_request("GET", "/healthz", log, 200, 0.001)
        log_request("GET", "/readyz", log, 503, 0.001)
        log_request("POST", "/v1/generate", log, 200, 0.0125)
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.INFO, logging.INFO]
    fields = caplog.records[2].fields  # type: ignore[attr-defined]
    assert fields == {"request_id": "r", "method": "POST", "path": "/v1/generate", "status": 200,
                      "duration_ms": 12.5, "model": "digits", "n": 2}
