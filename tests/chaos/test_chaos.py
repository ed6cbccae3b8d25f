"""Chaos scenarios of issue #8: real processes, an own redis-server, faults, checks from Redis.

Every scenario ends with ``chaos.finish(line)``: wait until every captured frame has an outcome,
SIGTERM the line, then verify from Redis (see ``verify``: one outcome per frame, no duplicate seq,
XPENDING 0, no crash loop, alarm events == in-order replay, capture seqs increasing) and print one
line of figures. Fast scenarios also run in ``make test``; the ``slow`` ones with ``make chaos``.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.chaos.frameset import POOL_SIZE, jpeg_bomb, png_bomb

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

CAM = "cam-a"
H, W = POOL_SIZE


def _capture_finished(line, run: int = -1) -> bool:
    proc = line.captures[run]
    return not proc.alive


# ------------------------------------------------------------------------------------ workers


@pytest.mark.parametrize(
    "restart",
    [
        pytest.param(False, id="takeover"),
        pytest.param(True, id="restart", marks=pytest.mark.slow),
    ],
)
def test_worker_kill9_holding_batch(chaos, restart: bool) -> None:
    """kill -9 a worker while frames are pending on it; the peer (or its restart) finishes them."""
    line = chaos.line({CAM: chaos.frames.folder(24, seed=1)}).start()
    consumer = line.worker_consumer(0)
    held = line.wait_for(
        f"{consumer} to hold frames (XPENDING per consumer) after the first results",
        lambda: line.results(CAM) >= 4 and line.pending_by_consumer(CAM).get(consumer, 0) > 0,
        90,
    )
    if held:
        pending = line.pending_by_consumer(CAM).get(consumer, 0)
        line.kill("worker-0")
        line.report.notes.append(f"{consumer} held {pending} frame(s) when killed")
        if restart:
            line.sleep(1.0)
            line.restart("worker-0")
    chaos.finish(line)


# ---------------------------------------------------------------------------------- publisher


@pytest.mark.slow
def test_publisher_kill9_with_open_alarm(chaos) -> None:
    """kill -9 the publisher while an alarm is open; the restart continues it (no 2nd start)."""
    line = chaos.line({CAM: chaos.frames.folder(32, seed=2)}).start()
    alarm = line.wait_for("an open alarm in alarms:{cam-a}", lambda: line.open_alarm(CAM), 90)
    if alarm:
        line.report.notes.append(f"open alarm at the kill: {alarm}")
        line.kill("publisher")
        line.sleep(1.5)
        line.restart("publisher")
    chaos.finish(line)


# -------------------------------------------------------------------------------------- redis


@pytest.mark.slow
def test_redis_kill9_restart_aof(chaos) -> None:
    """kill -9 redis-server mid-run and start it again from its AOF (appendfsync always)."""
    line = chaos.line({CAM: chaos.frames.folder(32, seed=3)}, fps=4.0, aof=True).start()
    if line.wait_for("6 results while capture runs", lambda: line.results(CAM) >= 6, 90):
        line.redis_kill()
        line.sleep(2.0)
        line.redis_start()
    chaos.finish(line, drain_timeout_s=120)


@pytest.mark.slow
def test_redis_frozen_past_socket_timeout(chaos) -> None:
    """SIGSTOP redis-server for longer than redis.socket_timeout_s, then SIGCONT."""
    line = chaos.line({CAM: chaos.frames.folder(32, seed=4)}, fps=4.0).start()
    freeze_s = line.config.redis.socket_timeout_s + 3.0
    if line.wait_for("6 results while capture runs", lambda: line.results(CAM) >= 6, 90):
        line.redis_signal(signal.SIGSTOP)
        line.sleep(freeze_s)
        line.redis_signal(signal.SIGCONT)
    chaos.finish(line, drain_timeout_s=120)


# ------------------------------------------------------------------------------------ backlog


@pytest.mark.slow
def test_backlog_capture_faster_than_workers(chaos) -> None:
    """Two cameras replayed at full speed into one worker with batches of 1."""
    line = chaos.line(
        {CAM: chaos.frames.folder(20, seed=5), "cam-b": chaos.frames.folder(20, seed=6)},
        workers=1,
        settings={"worker": {"batch_size": 1}},
    ).start()
    backlog = line.wait_for(
        "a backlog of 20+ frames",
        lambda: (
            sum(line.count(line.keys.frames(c)) - line.results(c) for c in (CAM, "cam-b")) >= 20
        ),
        60,
    )
    line.report.notes.append(f"backlog reached: {bool(backlog)}")
    chaos.finish(line, drain_timeout_s=150)


# ------------------------------------------------------------------------------------ SIGTERM


def test_sigterm_everything_then_restart(chaos) -> None:
    """SIGTERM capture, workers and publisher mid-run (each must exit 0), restart, finish."""
    line = chaos.line({CAM: chaos.frames.folder(18, seed=7)}, fps=3.0).start()
    mid_run = line.wait_for(
        "4 results while capture still runs",
        lambda: line.results(CAM) >= 4 and line.captures[-1].alive,
        90,
    )
    if mid_run:
        live = [p for p in line.procs.values() if p.alive]
        for proc in live:
            line.fault(f"SIGTERM {proc.name}")
            proc.send(signal.SIGTERM, "fault: stop everything mid-run")
        for proc in live:
            if not proc.wait(30.0):
                line.report.failures.append(f"{proc.name} ignored SIGTERM for 30 s")
        line.tick()
        for i in range(line.n_workers):
            line.restart(f"worker-{i}")
        line.restart("publisher")
        line.fault("restart capture")
        line.start_capture()
    chaos.finish(line)


# ------------------------------------------------------------------------------ poison frames


def test_poison_frames(chaos) -> None:
    """Bombs (PNG 50000x50000, JPEG 16000x16000), junk bytes and a frame missing a field, XADDed
    between normal frames: each becomes one dead letter, the workers survive, alarms stay right."""
    frames = chaos.frames
    line = chaos.line({CAM: frames.folder(12, seed=8)}).start()
    line.wait_for("capture run 1 to finish", lambda: _capture_finished(line), 60)
    seq = (line.last_seq(CAM) or 0) + 1
    normal = frames.image_bytes

    def add(kind: str, fields: dict) -> str:
        return line.inject(CAM, fields, kind)

    poison: dict[str, str] = {}
    plan = [
        ("normal", False),
        ("png-bomb", None),
        ("normal", True),
        ("jpeg-bomb", None),
        ("normal", True),
        ("junk", None),
        ("normal", True),
        ("missing-field", None),
        ("normal", False),
        ("normal", False),
        ("normal", False),
    ]
    for i, (kind, anomalous) in enumerate(plan):
        if kind == "normal":
            fields = line.frame_fields(CAM, seq, normal(bool(anomalous), i), "png", W, H)
        elif kind == "png-bomb":
            fields = line.frame_fields(CAM, seq, png_bomb(), "png", 50_000, 50_000)
        elif kind == "jpeg-bomb":
            fields = line.frame_fields(CAM, seq, jpeg_bomb(), "jpeg", 16_000, 16_000)
        elif kind == "junk":
            fields = line.frame_fields(CAM, seq, b"\x00not an image\xff" * 40, "png", W, H)
        else:
            fields = line.frame_fields(CAM, seq, normal(False, i), "png", W, H)
            del fields["enc"]
        entry = add(kind, fields)
        if kind != "normal":
            poison[entry] = kind
        seq += 1
    line.start_capture()
    verdict_extra = _poison_outcomes(line, poison)
    line.report.failures.extend(verdict_extra)
    chaos.finish(line)


def _poison_outcomes(line, poison: dict[str, str]) -> list[str]:
    """Wait for the poison entries' outcomes; each must be a dead letter, never a result."""
    from tests.chaos.harness import xrange_all

    def outcomes() -> dict[str, list[str]]:
        found: dict[str, list[str]] = {e: [] for e in poison}

        def read(c):
            for _, f in xrange_all(c, line.keys.deadletter(CAM)):
                sid = f.get(b"source_id", b"").decode()
                if sid in found:
                    found[sid].append("dead letter: " + f.get(b"reason", b"?").decode())
            for _, f in xrange_all(c, line.keys.results(CAM)):
                fid = f.get(b"frame_id", b"").decode()
                if fid in found:
                    found[fid].append("result")
            return found

        return line.safe(read, found)

    line.wait_for("an outcome for every poison frame", lambda: all(outcomes().values()), 120)
    failures = []
    got = outcomes()
    summary = ", ".join(f"{poison[e]}: {'/'.join(v) or 'nothing'}" for e, v in got.items())
    line.report.notes.append(f"poison outcomes: {summary}")
    for entry, kinds in got.items():
        if any(k == "result" for k in kinds):
            failures.append(
                f"(p) poison frame {poison[entry]} ({entry}) was scored: {kinds}; expected a dead "
                "letter"
            )
    return failures


# ------------------------------------------------------------------------------ seq anomalies


@pytest.mark.slow
def test_out_of_order_seq(chaos) -> None:
    """Frames whose seqs go backwards (a camera that restarted its numbering) while a cooldown
    runs out: the pattern that made the old alarm machine raise on every restart (issue #8.3)."""
    frames = chaos.frames
    alarm = {"k": 2, "n": 3, "clear_after": 3, "cooldown_s": 0.35, "update_interval_s": 0}
    line = chaos.line({CAM: frames.folder(16, seed=9)}, settings={"publisher": {"alarm": alarm}})
    line.start()
    line.wait_for("capture run 1 to finish", lambda: _capture_finished(line), 60)
    last = line.last_seq(CAM) or 0
    # (seq offset, anomalous) in arrival order, 100 ms of capture time apart: an episode ends,
    # then two anomalous frames with decreasing, out-of-order seqs fall inside the cooldown and
    # the window is judged again once it has passed
    pattern = [(1, 1), (2, 1), (3, 1), (4, 0), (5, 0), (6, 0), (7, 0), (-5, 1), (-9, 1), (8, 0)]
    pattern += [(9, 1), (10, 0), (11, 1), (12, 0), (13, 0), (14, 0), (15, 0)]
    t0 = time.time_ns()
    for i, (offset, anomalous) in enumerate(pattern):
        kind = "out-of-order" if offset < 0 else "normal"
        image = frames.image_bytes(bool(anomalous), i)
        fields = line.frame_fields(
            CAM, last + 10 + offset, image, "png", W, H, ts_ns=t0 + i * 10**8
        )
        line.inject(CAM, fields, kind)
    line.start_capture()
    chaos.finish(line)


@pytest.mark.slow
def test_seqless_stream_tail(chaos) -> None:
    """An entry without seq at the tail of frames:{cam} between two capture runs: the restarted
    capture must continue after the last real seq, never reuse one."""
    frames = chaos.frames
    line = chaos.line({CAM: frames.folder(16, seed=10)}).start()
    line.wait_for("capture run 1 to finish", lambda: _capture_finished(line), 60)
    fields = line.frame_fields(CAM, None, frames.image_bytes(False, 0), "png", W, H)
    line.inject(CAM, fields, "seq-less")
    line.start_capture()
    chaos.finish(line)
