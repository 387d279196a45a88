"""The Prometheus metrics (service/metrics.py): names, labels known from the start, and what each hook counts."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from service.metrics import FAILURE_REASONS, FORMATS, Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition()[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, tuple(sorted(labels.items()))), float("nan"))


def test_series_with_known_labels_exist_at_zero_from_the_start() -> None:
    metrics = Metrics(["digits", "cifar"], batch_buckets=[1, 8])
    for model in ("digits", "cifar"):
        for reason in FAILURE_REASONS:
            assert value(metrics, "cmserve_request_failures_total", model=model, reason=reason) == 0
        assert value(metrics, "cmserve_requests_total", model=model, code="200") == 0
        assert value(metrics, "cmserve_forward_passes_total", model=model) == 0
    for fmt in FORMATS:
        assert value(metrics, "cmserve_encode_duration_seconds_count", format=fmt) == 0
    assert value(metrics, "cmserve_build_info", version="0.1.0") == 1


def test_a_request_counts_its_code_its_failure_reason_and_its_duration() -> None:
    metrics = Metrics(["digits"], batch_buckets=[1])
    metrics.observe_request("digits", 200, 0.01, None)
    metrics.observe_request("digits", 503, 0.02, "oom")
    metrics.observe_request("unknown", 404, 0.001, "invalid")
    assert value(metrics, "cmserve_requests_total", model="digits", code="200") == 1
    assert value(metrics, "cmserve_requests_total", model="digits", code="503") == 1
    assert value(metrics, "cmserve_request_failures_total", model="digits", reason="oom") == 1
    assert value(metrics, "cmserve_request_failures_total", model="digits", reason="rejected") == 0
    assert value(metrics, "cmserve_request_failures_total", model="unknown", reason="invalid") == 1
    assert value(metrics, "cmserve_request_duration_seconds_count", model="digits") == 2


def test_the_scheduler_hooks_count_evaluations_batches_and_images() -> None:
    metrics = Metrics(["digits"], batch_buckets=[1, 8, 64])
    metrics.on_evaluation("digits", 8, 0.004)
    metrics.on_evaluation("digits", 3, 0.002)
    metrics.on_queue_wait("digits", 0.001)
    metrics.on_images_finished("digits", 11, "generate")
    assert value(metrics, "cmserve_forward_passes_total", model="digits") == 2
    assert value(metrics, "cmserve_batch_size_sum", model="digits") == 11
    assert value(metrics, "cmserve_images_generated_total", model="digits") == 11
    assert value(metrics, "cmserve_queue_wait_seconds_count", model="digits") == 1


def test_gauges_read_their_callbacks_at_scrape_time() -> None:
    metrics = Metrics(["digits"], batch_buckets=[1])
    depth, ready = [3], [False]
    metrics.track_queue_depth("digits", lambda: depth[0])
    metrics.track_ready(lambda: ready[0])
    metrics.track_in_progress(lambda: 2)
    assert value(metrics, "cmserve_queue_depth", model="digits") == 3 and value(metrics, "cmserve_ready") == 0
    depth[0], ready[0] = 0, True
    assert value(metrics, "cmserve_queue_depth", model="digits") == 0 and value(metrics, "cmserve_ready") == 1
    assert value(metrics, "cmserve_requests_in_progress") == 2


def test_stats_summarise_the_metrics() -> None:
    metrics = Metrics(["digits"], batch_buckets=[1, 8])
    metrics.on_evaluation("digits", 8, 0.004)
    metrics.on_evaluation("digits", 4, 0.004)
    stats = metrics.stats(ready=True)
    assert stats["ready"] is True and stats["mean_images_per_forward"] == 6.0 and stats["queue_depth"] == 0
