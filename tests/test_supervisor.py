"""`efficientad run` machinery with real child processes, and the `capture`/`redis` commands."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis

from efficientad.cli import build_parser
from pipeline.core.config import LineConfig, RunSettings
from pipeline.core.config_loader import load_config
from pipeline.core.lifecycle import EXIT_USAGE
from pipeline.core.wire import FrameMessage, StreamKeys
from pipeline.stages.supervisor import ChildSpec, Supervisor, line_specs, run_line, stream_drained

FAST = RunSettings(restart_initial_s=0.1, restart_max_s=0.4, stable_after_s=30, stop_timeout_s=3)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def poll_for(sup: Supervisor, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sup.poll()
        time.sleep(0.02)


def test_crashing_child_is_restarted_with_growing_backoff() -> None:
    sup = Supervisor([ChildSpec("crasher", py("import sys; sys.exit(3)"), "worker")], FAST)
    sup.start()
    delays = []
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        sup.poll()
        child = sup.children[0]
        if not delays or delays[-1] != child.delay:
            delays.append(child.delay)
        time.sleep(0.01)
    sup.stop()
    child = sup.children[0]
    assert child.restarts >= 3
    assert [d for d in delays if d] == sorted(d for d in delays if d)  # never shrinks
    assert max(delays) == pytest.approx(0.4)  # capped at restart_max_s


def test_finished_and_misconfigured_children_are_not_restarted() -> None:
    sup = Supervisor(
        [
            ChildSpec("replay", py("pass"), "capture", finite=True),
            ChildSpec("bad", py(f"import sys; sys.exit({EXIT_USAGE})"), "publisher"),
        ],
        FAST,
    )
    sup.start()
    poll_for(sup, 1.0)
    replay, bad = sup.children
    assert replay.done and replay.restarts == 0 and sup.finished("capture")
    assert bad.done and bad.restarts == 0
    assert sup.fatal is not None and "bad" in sup.fatal


def test_stop_goes_capture_then_worker_then_publisher(tmp_path: Path) -> None:
    log = tmp_path / "order.log"
    script = f"""
        import signal, sys, time
        name = sys.argv[1]
        def bye(*_):
            with open({str(log)!r}, "a") as fh:
                fh.write(f"{{name}} {{time.monotonic()}}\\n")
            time.sleep(0.2)
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
    """
    specs = [
        ChildSpec("publisher", [*py(script), "publisher"], "publisher"),
        ChildSpec("worker-0", [*py(script), "worker-0"], "worker"),
        ChildSpec("capture-a", [*py(script), "capture-a"], "capture"),
        ChildSpec(
            "stubborn",
            py(
                "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)"
            ),
            "other",
        ),
    ]
    sup = Supervisor(specs, RunSettings(stop_timeout_s=1.0))
    sup.start()
    time.sleep(0.8)  # let the interpreters install their handlers
    t0 = time.monotonic()
    sup.stop()
    assert time.monotonic() - t0 < 4
    order = [line.split()[0] for line in log.read_text().splitlines()]
    assert order == ["capture-a", "worker-0", "publisher"]
    stubborn = sup.children[3]
    assert stubborn.last_code == -signal.SIGKILL  # ignored SIGTERM, killed after the grace
    assert sup.running() == []


@pytest.fixture
def client():
    conn = redis.Redis()
    prefix = f"test-sup-{uuid.uuid4().hex[:8]}:"
    yield conn, StreamKeys(prefix)
    for key in conn.scan_iter(match=f"{prefix}*"):
        conn.delete(key)
    conn.close()


def test_stream_drained(client) -> None:
    conn, keys = client
    stream = keys.frames("c")
    assert stream_drained(conn, stream, "workers")  # no stream, nothing to do
    conn.xgroup_create(stream, "workers", id="0", mkstream=True)
    assert stream_drained(conn, stream, "workers")  # empty stream
    conn.xadd(stream, {"a": 1})
    conn.xadd(stream, {"a": 2})
    assert not stream_drained(conn, stream, "workers")  # unread entries
    [(_, entries)] = conn.xreadgroup("workers", "w1", {stream: ">"}, count=1)
    assert not stream_drained(conn, stream, "workers")
    conn.xack(stream, "workers", entries[0][0])
    assert not stream_drained(conn, stream, "workers")  # one still unread
    [(_, entries)] = conn.xreadgroup("workers", "w1", {stream: ">"})
    assert not stream_drained(conn, stream, "workers")  # read, not acked
    conn.xack(stream, "workers", entries[0][0])
    assert stream_drained(conn, stream, "workers")
    assert not stream_drained(conn, stream, "other-group")


def test_line_specs_and_ports(tmp_path: Path) -> None:
    config = load_config(
        None,
        {
            "cameras": [
                {"id": "a", "source": str(tmp_path)},
                {"id": "b", "source": "rtsp://cam/1"},
            ],
            "metrics.port": 9500,
        },
        environ={},
    )
    specs = line_specs(config, tmp_path / "eff.yaml", workers=2)
    assert [s.name for s in specs] == [
        "capture-a",
        "capture-b",
        "worker-0",
        "worker-1",
        "publisher",
    ]
    assert [s.finite for s in specs] == [True, False, False, False, False]
    ports = [s.argv[s.argv.index("--metrics-port") + 1] for s in specs]
    assert ports == ["9500", "9501", "9502", "9503", "9504"]
    assert specs[2].argv[-4:-2] == ["--index", "0"] and specs[3].argv[-4:-2] == ["--index", "1"]
    assert all(s.argv[1:3] == ["-m", "efficientad.cli"] for s in specs)
    assert all(s.argv[s.argv.index("--config") + 1] == str(tmp_path / "eff.yaml") for s in specs)


def test_run_without_cameras_is_a_config_error() -> None:
    assert run_line(LineConfig(), install_signals=False) == EXIT_USAGE


# ------------------------------------------------------------------------------- CLI commands


def parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.fixture
def keep_signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_capture_command(client, tmp_path: Path, keep_signal_handlers) -> None:
    conn, keys = client
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((20, 30, 3), i * 40, np.uint8))
    args = parser().parse_args(
        [
            "capture",
            "--source",
            str(folder),
            "--id",
            "cli-cam",
            "--redis-url",
            "redis://127.0.0.1:6379/0",
            "--key-prefix",
            keys.prefix,
            "--roi",
            "0,0,10,10",
            "--encoding",
            "png",
            "--no-metrics",
        ]
    )
    assert args.func(args) == 0
    got = [FrameMessage.from_fields(f) for _, f in conn.xrange(keys.frames("cli-cam"))]
    assert [(m.seq, m.w, m.h, m.enc) for m in got] == [(i, 10, 10, "png") for i in range(6)]
    events = [f[b"event"] for _, f in conn.xrange(keys.status())]
    assert events[0] == b"process.started" and events[-1] == b"process.stopped"

    missing = parser().parse_args(
        ["capture", "--source", str(tmp_path / "nope"), "--redis-url", "redis://127.0.0.1:6379/0"]
    )
    assert missing.func(missing) == EXIT_USAGE
    no_redis = parser().parse_args(["capture", "--source", str(folder), "--no-metrics"])
    no_redis.redis_url = None
    if "EFFICIENTAD_REDIS_URL" not in os.environ and "EFFICIENTAD__REDIS__URL" not in os.environ:
        assert no_redis.func(no_redis) == EXIT_USAGE  # explains the missing URL


def test_redis_command_in_foreground(tmp_path: Path) -> None:
    code = (
        "import sys; from efficientad.cli import build_parser;"
        "a = build_parser().parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "redis", "--port", "0", "--dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert line.startswith("EFFICIENTAD_REDIS_URL=redis://:") and "@127.0.0.1:" in line
        url = line.split("=", 1)[1]
        conn = redis.Redis.from_url(url)
        conn.xadd("s", {"a": 1})
        assert conn.xlen("s") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url, retry=None).ping()
        assert (tmp_path / "data" / "appendonly.aof").exists() or any(
            (tmp_path / "data").rglob("*.aof")
        )
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stop_event_ends_a_live_capture_thread_quickly(client, tmp_path: Path) -> None:
    """A signal to `capture` maps to stop_event: live sources end within the flush timeout."""
    from pipeline.core.config import CameraSettings
    from pipeline.stages.capture import run_capture

    conn, keys = client
    folder = tmp_path / "loop"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((8, 8, 3), np.uint8))
    stop = threading.Event()
    camera = CameraSettings(id="l", source=str(folder), loop=True, realtime=True, fps=30)
    out = []
    thread = threading.Thread(target=lambda: out.append(run_capture(camera, conn, keys, stop)))
    thread.start()
    time.sleep(0.3)
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and out[0].frames_written > 0


# ------------------------------------------------------------------------------- the whole line


def _cli_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("efficientad.cli") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _cli_available(), reason="efficientad.cli (the lead's CLI) not wired yet")
def test_run_until_drained_with_embedded_redis(tmp_path: Path) -> None:
    """`efficientad run --until-drained`: embedded Redis, capture, 2 workers, publisher, exit 0."""
    from pipeline.core.embedded_redis import EmbeddedRedis
    from pipeline.tools.tiny_model import random_model_dir

    random_model_dir(tmp_path / "model", threshold=1e9)  # a model that flags nothing
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(folder / f"{i:02d}.png"), rng.integers(0, 256, (48, 64, 3), np.uint8))
    data_dir = tmp_path / "redis"
    config = tmp_path / "line.yaml"
    config.write_text(
        f"""
redis: {{url: null, embedded_dir: {str(data_dir)!r}}}
cameras: [{{id: c1, source: {str(folder)!r}}}]
models: {{default: {str(tmp_path / "model")!r}}}
worker: {{device: cpu, batch_size: 4}}
metrics: {{port: 0}}
run: {{workers: 2, stop_timeout_s: 20, drain_timeout_s: 120}}
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EFFICIENTAD")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "efficientad.cli",
            "run",
            "--config",
            str(config),
            "--until-drained",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "line drained" in proc.stderr
    # the embedded Redis kept an append-only file: inspect what the line wrote
    with EmbeddedRedis(data_dir=data_dir) as server:
        conn = redis.Redis.from_url(server.url)
        frames = conn.xrange("frames:{c1}")
        results = [f for _, f in conn.xrange("results:{c1}")]
        assert len(frames) == 6
        assert sorted(int(f[b"seq"]) for f in results) == list(range(6))  # one result per frame
        assert {f[b"worker"] for f in results} <= {
            b"worker-%s-0" % _host(),
            b"worker-%s-1" % _host(),
        }
        assert stream_drained(conn, "frames:{c1}", "workers")
        events = [f[b"event"] for _, f in conn.xrange("status")]
        assert b"camera.finished" in events
        conn.close()


def _host() -> bytes:
    from pipeline.core.stage_settings import stable_consumer_name

    return stable_consumer_name("x").removeprefix("x-").encode()


def test_effective_config_round_trips(tmp_path: Path) -> None:
    from pipeline.stages.supervisor.service import _effective_config_file

    config = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "line.yaml",
        {"redis.password": "pw", "redis.url": "redis://h:1/0", "worker.batch_size": 3},
        environ={},
    )
    path = _effective_config_file(config, tmp_path)
    assert path.stat().st_mode & 0o077 == 0  # holds the password: owner-only
    again = load_config(path, environ={})
    assert again == config
    assert again.redis.resolved_password() == "pw"
