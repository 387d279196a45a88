"""The JSON log lines and the handler that writes one event-loop iteration's lines at once."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading

import pytest

from service.logs import PIPE_BUF, JsonFormatter, LineHandler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.texts: list[str] = []

    def write(self, text: str) -> int:
        self.writes += 1
        self.texts.append(text)
        return super().write(text)


@pytest.fixture
def logger_and_stream():
    stream = CountingStream()
    handler = LineHandler(stream)
    handler.setFormatter(JsonFormatter(worker=1))
    logger = logging.Logger("cmserve.test_logs", logging.INFO)  # outside the hierarchy: pytest attaches nothing
    logger.addHandler(handler)
    return logger, stream, handler


def lines(stream: CountingStream) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_is_one_json_object_with_the_fields(logger_and_stream):
    logger, stream, _ = logger_and_stream
    logger.info("request", extra={"fields": {"status": 200, "timings_ms": {"total": 1.5}, "model": "dïgits"}})
    (doc,) = lines(stream)
    assert doc["level"] == "info" and doc["logger"] == "cmserve.test_logs" and doc["msg"] == "request"
    assert doc["worker"] == 1 and doc["status"] == 200 and doc["timings_ms"] == {"total": 1.5}
    assert doc["model"] == "dïgits"
    assert doc["ts"].endswith("Z") and len(doc["ts"]) == len("2026-11-27T09:00:00.000Z")


def test_outside_an_event_loop_each_line_is_written_at_once(logger_and_stream):
    logger, stream, _ = logger_and_stream
    logger.info("one")
    assert stream.writes == 1
    logger.info("two")
    assert stream.writes == 2 and [d["msg"] for d in lines(stream)] == ["one", "two"]


def test_lines_of_one_loop_iteration_go_out_in_one_write_before_the_next(logger_and_stream):
    logger, stream, _ = logger_and_stream
    seen: list[tuple[int, str]] = []

    async def main() -> None:
        for i in range(5):
            logger.info(f"line {i}")
        seen.append((stream.writes, stream.getvalue()))  # still held: nothing written in this iteration
        await asyncio.sleep(0)  # one iteration later they are out
        seen.append((stream.writes, stream.getvalue()))
        logger.info("later")
        await asyncio.sleep(0)

    asyncio.run(main())
    assert seen[0] == (0, "")
    assert seen[1][0] == 1 and seen[1][1].count("\n") == 5
    assert stream.writes == 2
    assert [d["msg"] for d in lines(stream)] == [f"line {i}" for i in range(5)] + ["later"]


def test_another_threads_lines_are_not_held_by_the_loop(logger_and_stream):
    logger, stream, _ = logger_and_stream

    async def main() -> int:
        logger.info("from the loop")
        thread = threading.Thread(target=logger.info, args=("from a thread",))
        thread.start()
        thread.join()
        return stream.writes  # the thread's write carried the loop's pending line with it, in order

    writes = asyncio.run(main())
    assert writes == 1
    assert [d["msg"] for d in lines(stream)] == ["from the loop", "from a thread"]


def test_flush_writes_what_is_held_and_a_full_buffer_writes_itself(logger_and_stream):
    logger, stream, handler = logger_and_stream

    async def main() -> None:
        logger.info("held")
        handler.flush()  # logging.shutdown() and a stopping loop call this
        assert stream.getvalue().count("\n") == 1
        for i in range(LineHandler.MAX_PENDING):
            logger.info(f"burst {i}")
        assert stream.getvalue().count("\n") == 1 + LineHandler.MAX_PENDING  # the last one wrote them all

    asyncio.run(main())
    assert len(lines(stream)) == 1 + LineHandler.MAX_PENDING


def test_a_loop_that_closed_before_writing_does_not_hold_the_next_loops_lines(logger_and_stream):
    logger, stream, _ = logger_and_stream
    first = asyncio.new_event_loop()

    def log_and_stop() -> None:
        logger.info("from a loop that stops at once")
        first.stop()  # the write was scheduled for the next iteration, which never runs

    first.call_soon(log_and_stop)
    first.run_forever()
    first.close()
    assert stream.writes == 0

    async def second() -> None:
        logger.info("from the next loop")
        await asyncio.sleep(0)

    asyncio.run(second())
    assert [d["msg"] for d in lines(stream)] == ["from a loop that stops at once", "from the next loop"]


def test_held_lines_go_out_in_whole_lines_of_at_most_pipe_buf_bytes(logger_and_stream):
    """Workers share one stderr, often a pipe: only writes up to PIPE_BUF bytes cannot interleave."""
    logger, stream, _ = logger_and_stream

    async def main() -> None:
        for i in range(60):
            logger.info("request", extra={"fields": {"i": i, "pad": "é" * 150}})  # ~450 bytes a line, 2 per é
        logger.info("long", extra={"fields": {"pad": "x" * (2 * PIPE_BUF)}})
        await asyncio.sleep(0)

    asyncio.run(main())
    assert stream.writes > 1
    for text in stream.texts:
        assert text.endswith("\n")
        assert len(text.encode()) <= PIPE_BUF or text.count("\n") == 1  # only a line longer than it goes alone
    docs = lines(stream)
    assert [d.get("i") for d in docs] == [*range(60), None] and len(docs[-1]["pad"]) == 2 * PIPE_BUF


def test_a_failing_write_drops_its_lines_without_raising_and_logging_goes_on(logger_and_stream, capsys):
    logger, stream, _ = logger_and_stream
    real_write = stream.write

    def broken(text: str) -> int:
        raise BrokenPipeError("the reader of stderr is gone")

    async def main() -> None:
        stream.write = broken  # type: ignore[method-assign]
        logger.info("lost")
        await asyncio.sleep(0)  # the loop's write fails: nothing escapes into the loop
        stream.write = real_write  # type: ignore[method-assign]
        logger.info("kept")
        await asyncio.sleep(0)

    loop_errors: list[dict] = []

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: loop_errors.append(context))
        await main()

    asyncio.run(run())
    logger.info("off the loop")
    stream.write = broken  # type: ignore[method-assign]
    logger.info("lost too")  # off the loop: written at once, fails, does not raise either
    stream.write = real_write  # type: ignore[method-assign]
    assert loop_errors == []
    assert [d["msg"] for d in lines(stream)] == ["kept", "off the loop"]
    assert "BrokenPipeError" in capsys.readouterr().err  # reported as logging reports a failed emit


ACCESS = {"request_id": "0af3", "method": "POST", "path": "/v1/generate", "status": 200, "duration_ms": 33.125,
          "model": "dígits \"2\"", "n": 3, "steps": 2, "seed": 2**63 - 1,
          "timings_ms": {"queue": 1.5, "compute": 21.0, "encode": 0.012, "total": 1e-05}}


@pytest.mark.parametrize("change", [
    {}, {"status_note": "client disconnected"}, {"model": None}, {"seed": 2**70},  # (beyond 64 bits: json writes it)
    {"timings_ms": {"queue": 1.0, "compute": 1.0, "encode": 1.0, "total": float("inf")}}, {1: "a key that is no str"},
])
def test_an_access_record_is_one_json_line_with_its_fields_in_order(change, logger_and_stream):
    record = {**ACCESS, **change}
    logger, stream, _ = logger_and_stream
    logger.info("request", extra={"fields": record})
    (line,) = lines(stream)
    assert list(line)[:5] == ["ts", "level", "logger", "msg", "worker"]
    assert list(line)[5:] == [str(k) for k in record]
    assert line["seed"] == record["seed"] and line["model"] == record["model"]
