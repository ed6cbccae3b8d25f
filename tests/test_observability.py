"""Metrics and health endpoints over real HTTP, JSON logs, and status events through Redis."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
import redis

from pipeline.core import health, logs, metrics, status
from pipeline.core.config import MetricsSettings
from pipeline.core.embedded_redis import EmbeddedRedis
from pipeline.core.wire import StreamKeys


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def metrics_server():
    state = {"ready": True}
    server = health.start_metrics_server(
        MetricsSettings(host="127.0.0.1", port=0), lambda: state["ready"]
    )
    assert server is not None
    yield server, state
    server.close()


def test_metrics_endpoint_exports_pipeline_series(metrics_server) -> None:
    server, _ = metrics_server
    cam = f"cam-{uuid.uuid4().hex[:6]}"
    metrics.FRAMES_CAPTURED.labels(cam).inc(3)
    metrics.FRAMES_DROPPED.labels(cam, "buffer_full").inc()
    metrics.BATCH_SIZE.labels("m1").observe(8)
    metrics.END_TO_END_LATENCY.labels(cam, "worker").observe(0.04)
    metrics.DEAD_LETTERS.labels(cam, "undecodable").inc(2)
    metrics.ALARMS.labels(cam, "started").inc()
    status, body = get(server.url + "/metrics")
    assert status == 200
    assert f'efficientad_frames_captured_total{{camera="{cam}"}} 3.0' in body
    assert f'efficientad_frames_dropped_total{{camera="{cam}",reason="buffer_full"}} 1.0' in body
    assert 'efficientad_batch_size_bucket{le="8.0",model="m1"}' in body
    assert f'efficientad_end_to_end_seconds_count{{camera="{cam}",stage="worker"}} 1.0' in body
    assert f'efficientad_dead_letters_total{{camera="{cam}",reason="undecodable"}} 2.0' in body
    assert f'efficientad_alarms_total{{camera="{cam}",event="started"}} 1.0' in body
    assert "_created" not in body  # creation-time series are switched off


def test_health_and_readiness(metrics_server) -> None:
    server, state = metrics_server
    assert get(server.url + "/healthz") == (200, "ok\n")
    assert get(server.url + "/readyz") == (200, "ready\n")
    state["ready"] = False
    assert get(server.url + "/readyz")[0] == 503
    assert get(server.url + "/healthz")[0] == 200  # alive even when not ready
    assert get(server.url + "/nope")[0] == 404


def test_failing_probe_is_not_ready_with_reason() -> None:
    def probe() -> bool:
        raise RuntimeError("model not loaded")

    server = health.start_metrics_server(MetricsSettings(host="127.0.0.1", port=0), probe)
    assert server is not None
    try:
        status, body = get(server.url + "/readyz")
        assert status == 503 and "model not loaded" in body
    finally:
        server.close()


def test_disabled_metrics_serve_nothing() -> None:
    assert health.start_metrics_server(MetricsSettings(enabled=False)) is None


def test_redis_readiness_follows_the_server() -> None:
    server = EmbeddedRedis()
    server.start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=1, retry=None)
        extra = {"ok": True}
        check = health.redis_ready_check(client, lambda: extra["ok"], cache_s=0)
        assert check()
        extra["ok"] = False
        assert not check()
        extra["ok"] = True
        server.kill()
        assert not check()
        server.start()
        assert check()
    finally:
        server.cleanup()


def test_json_logs(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup_logging("INFO", json_logs=True, process_name="worker-1")
    try:
        logging.getLogger("efficientad.test").info(
            "batch done %d", 8, extra={"camera": "c1", "ms": 12.5}
        )
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("efficientad.test").exception("failed")
        logging.getLogger("efficientad.test").debug("hidden")
    finally:
        logs.setup_logging("WARNING")
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert len(lines) == 2
    first, second = lines
    assert first["level"] == "INFO" and first["msg"] == "batch done 8"
    assert first["logger"] == "efficientad.test" and first["proc"] == "worker-1"
    assert first["camera"] == "c1" and first["ms"] == 12.5
    assert first["ts"].endswith("+00:00")
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc"]


def test_text_logs_show_extras(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup_logging("INFO", json_logs=False)
    try:
        logging.getLogger("efficientad.test").warning("camera offline", extra={"camera": "c9"})
    finally:
        logs.setup_logging("WARNING")
    err = capsys.readouterr().err
    assert "camera offline camera=c9" in err and "WARNING" in err


def test_status_events_round_trip() -> None:
    client = redis.Redis()
    keys = StreamKeys(f"test-obs-{uuid.uuid4().hex[:8]}:")
    try:
        event = status.StatusEvent(
            event="camera.offline", source="capture", cam="c1", reason="no frame", detail={"n": 3}
        )
        status.emit_status(client, keys, event)
        [(_, fields)] = client.xrange(keys.status())
        back = status.StatusEvent.from_fields(fields)
        assert back == event
        assert back.detail == {"n": 3} and back.pid > 0 and back.host
    finally:
        client.delete(keys.status())


def test_port_in_use_is_a_clear_error(metrics_server) -> None:
    server, _ = metrics_server
    with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1:\d+.*--metrics-port"):
        health.start_metrics_server(MetricsSettings(host="127.0.0.1", port=server.port))


def test_healthz_reports_a_stuck_main_loop_over_http() -> None:
    """200 with the heartbeat age while the loop turns, 503 once it stops, 200 when done."""
    heartbeat = health.Heartbeat(min_limit_s=0.3, grace_s=0.3)
    server = health.start_metrics_server(
        MetricsSettings(host="127.0.0.1", port=0), lambda: True, heartbeat=heartbeat
    )
    assert server is not None
    try:
        status, body = get(server.url + "/healthz")
        assert status == 200 and "starting" in body  # grace period before the first beat
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(0.05):
                heartbeat.beat("worker")

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        time.sleep(0.2)
        status, body = get(server.url + "/healthz")
        assert status == 200 and body.startswith("ok: heartbeat age worker ")
        stop.set()  # the main loop hangs
        thread.join()
        time.sleep(0.5)
        status, body = get(server.url + "/healthz")
        assert status == 503 and "stuck: worker last beat" in body and "limit" in body
        assert get(server.url + "/readyz")[0] == 200  # readiness is a separate question
        heartbeat.beat("worker", limit_s=5.0)  # a loop may declare a longer legitimate pause
        time.sleep(0.4)
        assert get(server.url + "/healthz")[0] == 200
        heartbeat.done("worker")  # e.g. a replay camera that finished
        assert get(server.url + "/healthz") == (200, "ok: all loops finished\n")
    finally:
        server.close()


def test_no_heartbeat_after_the_grace_period_is_unhealthy() -> None:
    clock = {"now": 100.0}
    heartbeat = health.Heartbeat(min_limit_s=30, grace_s=60, clock=lambda: clock["now"])
    assert heartbeat.check() == (True, "ok")  # not armed: a process without a main loop
    heartbeat.arm()
    clock["now"] += 59
    assert heartbeat.check()[0]
    clock["now"] += 2
    healthy, reason = heartbeat.check()
    assert not healthy and "never started" in reason
    heartbeat.beat("publisher")
    clock["now"] += 30
    assert heartbeat.check()[0]
    clock["now"] += 1
    assert heartbeat.check() == (
        False,
        "stuck: publisher last beat 31.0 s ago (limit 30 s)",
    )
    assert heartbeat.ages() == {"publisher": 31.0}
