"""Publisher against a real Redis: ordering, de-duplication, alarms, restarts, lease takeover."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import cv2
import numpy as np
import pytest
import redis

from pipeline.core.heatmap import render_overlay
from pipeline.core.image_codec import encode_image
from pipeline.core.stage_settings import PublisherSettings
from pipeline.core.wire import AlarmEvent, FrameMessage, ResultMessage, StreamKeys
from pipeline.stages.publisher import AlarmPublisher
from pipeline.stages.subscribe import follow_alarms, print_alarms
from tests import pipeline_support
from worker.postprocess import postprocess

client = pipeline_support.client  # fixtures: real Redis, per-test key prefix
keys = pipeline_support.keys

CAM = "cam1"
WORKERS = "workers"


def settings(**kw) -> PublisherSettings:
    base = {
        "block_ms": 20,
        "lease_ttl_s": 1.0,
        "max_gap_wait_ms": 400,
        "alarm": {"k": 2, "n": 3, "clear_after": 2, "cooldown_s": 0, "update_interval_s": 10},
    }
    return PublisherSettings.model_validate({**base, **kw})


class FakeLine:
    """Frames in frames:{cam} held by a 'worker' consumer, and results written like a worker."""

    def __init__(self, client: redis.Redis, keys: StreamKeys, cam: str = CAM) -> None:
        self.client, self.keys, self.cam = client, keys, cam
        client.xgroup_create(keys.frames(cam), WORKERS, id="0", mkstream=True)
        self.frame_ids: list[str] = []
        self.amap = np.zeros((64, 64), np.float32)

    IMAGE = np.full((48, 64, 3), 120, np.uint8)

    def capture(self, count: int) -> None:
        img = self.IMAGE
        for _ in range(count):
            seq = len(self.frame_ids)
            msg = FrameMessage(
                cam=self.cam,
                seq=seq,
                ts_ns=1_000_000_000 + seq * 100_000_000,  # 10 fps capture clock
                enc="jpeg",
                w=64,
                h=48,
                c=3,
                data=encode_image(img, "jpeg"),
            )
            self.frame_ids.append(
                self.client.xadd(self.keys.frames(self.cam), msg.to_fields()).decode()
            )
        # a worker takes delivery of everything: older frames count as "in flight" until acked
        self.client.xreadgroup(WORKERS, "w1", {self.keys.frames(self.cam): ">"})

    def result(self, seq: int, anomalous: bool, score: float | None = None) -> ResultMessage:
        score = score if score is not None else (2.0 + seq * 0.01 if anomalous else 0.3)
        amap = self.amap.copy()
        if anomalous:
            amap[10:20, 30:40] = score
        post = postprocess(amap, 1.0, with_images=anomalous)
        overlay = None
        if anomalous:  # as a worker draws it, from the frame it decoded
            overlay = render_overlay(self.IMAGE, post.levels, post.regions, (64, 64))
        return ResultMessage(
            cam=self.cam,
            frame_id=self.frame_ids[seq],
            seq=seq,
            ts_ns=1_000_000_000 + seq * 100_000_000,
            score=score,
            score_norm=min(1.0, score / 2),
            anomalous=anomalous,
            threshold=1.0,
            model="m",
            model_version="7",
            model_sha256="cd" * 32,
            map_w=post.map_w,
            map_h=post.map_h,
            frame_w=64,
            frame_h=48,
            regions=post.regions,
            mask=post.mask_png,
            heatmap=post.heatmap_png,
            overlay=overlay,
        )

    def publish(self, seq: int, anomalous: bool, score: float | None = None, ack=True) -> None:
        pipe = self.client.pipeline(transaction=True)
        if ack:
            pipe.xack(self.keys.frames(self.cam), WORKERS, self.frame_ids[seq])
        pipe.xadd(self.keys.results(self.cam), self.result(seq, anomalous, score).to_fields())
        pipe.execute()


def events(client: redis.Redis, key: str) -> list[AlarmEvent]:
    return [AlarmEvent.from_fields(f) for _, f in client.xrange(key)]


def pump(pub: AlarmPublisher, until: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "condition not reached in time"
        pub.step()


def types_of(evts: list[AlarmEvent]) -> list[str]:
    return [e.type for e in evts]


def test_alarm_start_and_end_with_mask_and_overlay(client, keys):
    line = FakeLine(client, keys)
    line.capture(8)
    cfg = settings(
        alarm={"k": 2, "n": 3, "clear_after": 2, "cooldown_s": 0, "update_interval_s": 0}
    )
    pub = AlarmPublisher(client, keys, cfg, [CAM], worker_group=WORKERS, name="pubA")
    for seq, flag in enumerate([0, 1, 1, 1, 0, 0, 0, 0]):
        line.publish(seq, bool(flag))
    pump(pub, lambda: len(events(client, keys.alarms())) == 3)
    started, updated, ended = events(client, keys.alarms())
    expected = ["alarm.started", "alarm.updated", "alarm.ended"]
    assert types_of(events(client, keys.camera_alarms(CAM))) == expected
    assert started.type == "alarm.started" and ended.type == "alarm.ended"
    assert updated.peak_frame_id == line.frame_ids[3] and updated.frame_id == line.frame_ids[3]
    assert started.alarm_id == ended.alarm_id == f"{CAM}-{line.frame_ids[1]}"
    assert started.frame_id == line.frame_ids[2] and started.frame_ids == line.frame_ids[1:3]
    assert ended.ended_ns == line.result(5, False).ts_ns
    assert ended.duration_s == pytest.approx(0.4)
    assert ended.peak_frame_id == line.frame_ids[3] and ended.anomalous_count == 3
    assert ended.model_sha256 == "cd" * 32 and ended.threshold == 1.0
    (region,) = ended.regions
    assert (region.x, region.y, region.w, region.h, region.area) == (30, 10, 10, 10, 100)
    assert region.peak == pytest.approx(2.03) and region.mean == pytest.approx(2.03)
    mask = cv2.imdecode(np.frombuffer(ended.mask, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (64, 64) and int((mask > 0).sum()) == 100
    overlay = cv2.imdecode(np.frombuffer(ended.overlay, np.uint8), cv2.IMREAD_COLOR)
    assert ended.overlay_status == "ok" and overlay.shape == (48, 64, 3)
    assert started.publisher == "pubA" and started.emitted_ns > 0
    # everything consumed was acked, and the state says where we are
    assert client.xpending(keys.results(CAM), "publisher")["pending"] == 0
    stored = client.hgetall(keys.publisher_state(CAM))
    assert stored[b"hwm_id"].decode() == line.frame_ids[7]
    assert json.loads(stored[b"machine"])["alarm"] is None
    pub.close()


def test_results_are_reordered_by_capture_order(client, keys):
    line = FakeLine(client, keys)
    line.capture(6)
    pub = AlarmPublisher(
        client,
        keys,
        settings(max_gap_wait_ms=5000, alarm={"k": 2, "n": 2, "clear_after": 1, "cooldown_s": 0}),
        [CAM],
        worker_group=WORKERS,
    )
    pattern = {0: 1, 1: 1, 2: 0, 3: 1, 4: 1, 5: 0}
    # workers finish 0, 1, 3, 4 before 2: in order that is start, end, start, end
    for seq in (0, 1, 3, 4):
        line.publish(seq, bool(pattern[seq]))
    for _ in range(5):
        pub.step()
    assert types_of(events(client, keys.alarms())) == ["alarm.started"]  # 2 is still in flight
    assert sorted(b.result.seq for b in pub.owned[CAM].buffer.values()) == [3, 4]
    line.publish(2, False)
    line.publish(5, False)
    pump(pub, lambda: len(events(client, keys.alarms())) == 4)
    got = events(client, keys.alarms())
    assert types_of(got) == ["alarm.started", "alarm.ended"] * 2
    assert [e.frame_id for e in got] == [line.frame_ids[i] for i in (1, 2, 4, 5)]
    pub.close()


def test_a_lost_frame_stalls_for_at_most_the_reorder_wait(client, keys):
    line = FakeLine(client, keys)
    line.capture(5)
    pub = AlarmPublisher(client, keys, settings(max_gap_wait_ms=300), [CAM], worker_group=WORKERS)
    # frame 0 stays pending at a dead worker forever; 1..4 arrive
    for seq in (1, 2, 3, 4):
        line.publish(seq, True)
    t0 = time.monotonic()
    pump(pub, lambda: len(events(client, keys.alarms())) == 1)
    waited = time.monotonic() - t0
    assert 0.25 <= waited < 2.0
    assert events(client, keys.alarms())[0].frame_id == line.frame_ids[2]
    pub.close()


def test_redelivered_results_are_ignored(client, keys):
    line = FakeLine(client, keys)
    line.capture(6)
    pub = AlarmPublisher(client, keys, settings(), [CAM], worker_group=WORKERS)
    for seq, flag in enumerate([1, 1, 1, 0, 0]):
        line.publish(seq, bool(flag))
        if seq in (1, 2):
            line.publish(seq, bool(flag), ack=False)  # a redelivered frame scored twice
    pump(pub, lambda: len(events(client, keys.alarms())) == 2)
    line.publish(1, True, ack=False)  # a very late copy after it was consumed
    line.publish(5, False)
    pump(pub, lambda: pub.stats.results == 6)
    assert types_of(events(client, keys.alarms())) == ["alarm.started", "alarm.ended"]
    assert pub.stats.duplicates == 3
    assert events(client, keys.alarms())[1].anomalous_count == 3
    pub.close()


def test_restarted_publisher_continues_the_open_alarm(client, keys):
    line = FakeLine(client, keys)
    line.capture(12)
    first = AlarmPublisher(client, keys, settings(), [CAM], worker_group=WORKERS, name="pubA")
    for seq in range(4):
        line.publish(seq, True)
    pump(first, lambda: len(events(client, keys.alarms())) == 1)
    pump(first, lambda: first.stats.results == 4)
    # more results arrive; the first publisher reads them and dies before committing
    for seq in range(4, 7):
        line.publish(seq, True, score=5.0 if seq == 5 else None)
    first._read_results(None)
    assert client.xpending(keys.results(CAM), "publisher")["pending"] == 3
    # first never runs again and never calls close(): its lease must expire and its
    # uncommitted reads be claimed by the next owner

    second = AlarmPublisher(client, keys, settings(), [CAM], worker_group=WORKERS, name="pubB")
    for seq in range(7, 10):
        line.publish(seq, False)
    pump(second, lambda: len(events(client, keys.alarms())) >= 2, timeout=6)
    got = events(client, keys.alarms())
    assert types_of(got) == ["alarm.started", "alarm.ended"]
    assert got[0].alarm_id == got[1].alarm_id
    assert got[0].publisher == "pubA" and got[1].publisher == "pubB"
    assert got[1].anomalous_count == 7 and got[1].peak_frame_id == line.frame_ids[5]
    assert second.stats.acquired == 1
    assert second.stats.duplicates == 0  # adopted results are not redeliveries
    second.close()


def test_graceful_handover_keeps_one_episode(client, keys):
    line = FakeLine(client, keys)
    line.capture(10)
    first = AlarmPublisher(client, keys, settings(), [CAM], worker_group=WORKERS, name="pubA")
    for seq in range(3):
        line.publish(seq, True)
    pump(first, lambda: len(events(client, keys.alarms())) == 1)
    first.close()  # releases the lease at once
    second = AlarmPublisher(client, keys, settings(), [CAM], worker_group=WORKERS, name="pubB")
    second.step()
    assert CAM in second.owned and second.owned[CAM].machine.active
    for seq in range(3, 7):
        line.publish(seq, seq < 5)
    pump(second, lambda: len(events(client, keys.alarms())) == 2)
    assert types_of(events(client, keys.alarms())) == ["alarm.started", "alarm.ended"]
    second.close()


def test_lease_takeover_and_fencing(client, keys):
    line = FakeLine(client, keys)
    line.capture(6)
    a = AlarmPublisher(client, keys, settings(), [CAM], worker_group=WORKERS, name="pubA")
    b = AlarmPublisher(client, keys, settings(), [CAM], worker_group=WORKERS, name="pubB")
    a.step()
    b.step()
    assert CAM in a.owned and CAM not in b.owned
    # a stalls (no renewals) past the lease; b takes the camera over
    time.sleep(1.2)
    b._next_lease_check = 0
    b.step()
    assert CAM in b.owned
    # a wakes up with work in hand: its commit is fenced off, nothing reaches the streams
    for seq in range(3):
        line.publish(seq, True)
    state = a.owned[CAM]
    state.oldest_in_flight = a._oldest_in_flight(CAM)
    a._read_results(None)
    a._release_in_order(state)
    assert state.events, "a built an alarm.started it must not publish"
    a._commit(state)
    assert CAM not in a.owned
    assert events(client, keys.alarms()) == []
    # b owns the camera: it adopts what a read and publishes exactly one start
    pump(b, lambda: len(events(client, keys.alarms())) == 1)
    assert events(client, keys.alarms())[0].publisher == "pubB"
    b.close()


def test_malformed_results_are_dead_lettered(client, keys):
    line = FakeLine(client, keys)
    line.capture(1)
    client.xadd(keys.results(CAM), {"v": 1, "cam": CAM, "frame_id": "not-an-id", "seq": "x"})
    pub = AlarmPublisher(client, keys, settings(), [CAM], worker_group=WORKERS)
    pump(pub, lambda: client.xlen(keys.deadletter(CAM)) == 1)
    ((_, dead),) = client.xrange(keys.deadletter(CAM))
    assert dead[b"reason"] == b"malformed" and b"seq" in dead[b"detail"]
    assert client.xpending(keys.results(CAM), "publisher")["pending"] == 0
    pub.close()


def test_follow_alarms_and_cli_output(client, keys, tmp_path):
    import io

    line = FakeLine(client, keys)
    line.capture(6)
    pub = AlarmPublisher(client, keys, settings(), [CAM], worker_group=WORKERS)
    for seq, flag in enumerate([1, 1, 0, 0]):
        line.publish(seq, bool(flag))
    pump(pub, lambda: len(events(client, keys.alarms())) == 2)
    got = list(follow_alarms(client, keys, start="0", block_ms=50, idle_timeout_s=0.2))
    assert [e.type for e in got] == ["alarm.started", "alarm.ended"]
    resumed = list(follow_alarms(client, keys, cam=CAM, start=got[0].stream_id, idle_timeout_s=0.2))
    assert [e.type for e in resumed] == ["alarm.ended"]
    out = io.StringIO()
    shown = print_alarms(
        client, keys, start="0", as_json=True, save_dir=tmp_path, idle_timeout_s=0.2, out=out
    )
    lines = [json.loads(s) for s in out.getvalue().splitlines()]
    assert shown == 2 and lines[1]["type"] == "alarm.ended" and lines[1]["mask_bytes"] > 0
    saved = sorted(p.name for p in (tmp_path / CAM / got[0].alarm_id).iterdir())
    assert any(n.endswith("-overlay.jpg") for n in saved)
    assert any(n.endswith("-mask.png") for n in saved)
    out = io.StringIO()
    print_alarms(client, keys, start="0", count=1, out=out)
    assert "STARTED" in out.getvalue() and f"cam={CAM}" in out.getvalue()
    pub.close()


def replay(results: list[ResultMessage], cfg: PublisherSettings) -> list[tuple[str, str, str]]:
    """What an in-order replay of ``results`` through the alarm machine emits."""
    from pipeline.stages.alarms import AlarmStateMachine

    machine = AlarmStateMachine(CAM, cfg.alarm_for(CAM))
    out = []
    for r in sorted(results, key=lambda r: tuple(map(int, r.frame_id.split("-")))):
        out += [(t.event.type, t.event.alarm_id, t.event.frame_id) for t in machine.observe(r)]
    return out


def emitted(client: redis.Redis, keys: StreamKeys) -> list[tuple[str, str, str]]:
    return [(e.type, e.alarm_id, e.frame_id) for e in events(client, keys.camera_alarms(CAM))]


def status_events(client: redis.Redis, keys: StreamKeys, kind: str) -> list[dict]:
    from pipeline.core.status import StatusEvent

    rows = [StatusEvent.from_fields(f) for _, f in client.xrange(keys.status())]
    return [r.model_dump() for r in rows if r.event == kind]


def test_a_slow_frame_is_waited_for_and_alarms_equal_the_replay(client, keys):
    """Issue #8.1: results that come late but within the bound are applied, in order."""
    line = FakeLine(client, keys)
    line.capture(10)
    cfg = settings(max_gap_wait_ms=5000)
    pub = AlarmPublisher(client, keys, cfg, [CAM], worker_group=WORKERS)
    pattern = [0, 1, 1, 1, 0, 0, 1, 1, 0, 0]
    for seq in range(10):
        if seq != 2:  # frame 2 stays at a slow worker
            line.publish(seq, bool(pattern[seq]))
    deadline = time.monotonic() + 0.8  # longer than the old 400 ms reorder wait
    while time.monotonic() < deadline:
        pub.step()
    assert pub.stats.results == 2 and pub.stats.late == 0  # seq 0 and 1, then the gap
    line.publish(2, True)
    pump(pub, lambda: pub.stats.results == 10)
    assert pub.stats.late == 0 and pub.stats.gaps_given_up == 0
    assert emitted(client, keys) == replay(
        [line.result(s, bool(pattern[s])) for s in range(10)], cfg
    )
    assert client.xpending(keys.results(CAM), "publisher")["pending"] == 0
    pub.close()


def test_results_of_a_lost_read_reply_are_re_read_before_newer_ones(client, keys):
    """A read the client retried while Redis was frozen delivered results nobody saw; the frames
    behind them are acked, so only the publisher's own pending list still knows them."""
    line = FakeLine(client, keys)
    line.capture(8)
    cfg = settings(max_gap_wait_ms=60_000)
    pub = AlarmPublisher(client, keys, cfg, [CAM], worker_group=WORKERS, name="pubA")
    pattern = [0, 1, 1, 1, 0, 0, 0, 1]
    line.publish(0, False)
    pump(pub, lambda: pub.stats.results == 1)
    for seq in (1, 2, 3):
        line.publish(seq, bool(pattern[seq]))
    # the lost reply: delivered to pubA, never seen by it
    client.xreadgroup("publisher", "pubA", {keys.results(CAM): ">"})
    for seq in range(4, 8):
        line.publish(seq, bool(pattern[seq]))
    pump(pub, lambda: pub.stats.results == 8)
    assert pub.stats.late == 0 and pub.stats.gaps_given_up == 0
    assert emitted(client, keys) == replay(
        [line.result(s, bool(pattern[s])) for s in range(8)], cfg
    )
    assert client.xpending(keys.results(CAM), "publisher")["pending"] == 0
    pub.close()


def test_a_result_after_a_given_up_gap_is_reported_not_dropped(client, keys):
    line = FakeLine(client, keys)
    line.capture(5)
    pub = AlarmPublisher(client, keys, settings(max_gap_wait_ms=200), [CAM], worker_group=WORKERS)
    for seq in (1, 2, 3, 4):
        line.publish(seq, False)
    pump(pub, lambda: pub.stats.results == 4)
    assert pub.stats.gaps_given_up == 1
    line.publish(0, True)  # the held frame finally comes back
    pump(pub, lambda: pub.stats.late == 1)
    pub.step()
    assert client.xpending(keys.results(CAM), "publisher")["pending"] == 0
    (late,) = status_events(client, keys, "publisher.late_result")
    assert late["cam"] == CAM and late["detail"]["seq"] == 0 and late["detail"]["anomalous"]
    (gap,) = status_events(client, keys, "publisher.gap_given_up")
    assert gap["detail"]["awaited_frame_id"] == line.frame_ids[0]
    pub.close()


def test_a_dead_lettered_frame_closes_its_gap_at_once(client, keys):
    line = FakeLine(client, keys)
    line.capture(4)
    pub = AlarmPublisher(
        client, keys, settings(max_gap_wait_ms=60_000), [CAM], worker_group=WORKERS
    )
    for seq in (0, 2, 3):
        line.publish(seq, False)
    client.xack(keys.frames(CAM), WORKERS, line.frame_ids[1])  # a worker dead-lettered it
    t0 = time.monotonic()
    pump(pub, lambda: pub.stats.results == 3, timeout=2.0)
    assert time.monotonic() - t0 < 1.0 and pub.stats.gaps_given_up == 0
    pub.close()


def test_the_same_seq_under_two_frame_ids_is_applied_once(client, keys):
    """Issue #8.2: a retried capture XADD must not reach the alarm logic twice."""
    line = FakeLine(client, keys)
    line.capture(6)
    # frame 3 is a second copy of frame 2 (same seq), as a retried XADD would write
    results = [line.result(s, s in (1, 2, 3)) for s in range(6)]
    results[3] = results[2].model_copy(update={"frame_id": line.frame_ids[3]})
    cfg = settings(alarm={"k": 3, "n": 3, "clear_after": 2, "cooldown_s": 0})
    pub = AlarmPublisher(client, keys, cfg, [CAM], worker_group=WORKERS)
    for seq, result in enumerate(results):
        client.xack(keys.frames(CAM), WORKERS, line.frame_ids[seq])
        client.xadd(keys.results(CAM), result.to_fields())
    pump(pub, lambda: pub.stats.results + pub.stats.duplicates == 6)
    assert pub.stats.duplicates == 1 and pub.stats.results == 5
    assert events(client, keys.alarms()) == []  # 2 distinct anomalous frames: k=3 not reached
    pub.close()


def test_a_failing_result_is_retried_then_dead_lettered_and_nothing_half_done_is_stored(
    client, keys, monkeypatch
):
    """Issue #8.3: an exception applying a result must not corrupt the state or stop the camera."""
    from pipeline.stages.alarms import AlarmStateMachine

    line = FakeLine(client, keys)
    line.capture(8)
    real = AlarmStateMachine.observe

    def observe(self, result):
        transitions = real(self, result)  # mutate first, then fail: the worst case
        if result.seq == 2:
            raise RuntimeError("boom on seq 2")
        return transitions

    monkeypatch.setattr(AlarmStateMachine, "observe", observe)
    cfg = settings(alarm={"k": 2, "n": 3, "clear_after": 2, "cooldown_s": 0})
    pub = AlarmPublisher(client, keys, cfg, [CAM], worker_group=WORKERS)
    pattern = [1, 0, 1, 1, 0, 0, 0, 0]
    for seq, flag in enumerate(pattern):
        line.publish(seq, bool(flag))
    pump(pub, lambda: pub.stats.results == 7)
    assert pub.stats.apply_failures == 3
    ((_, dead),) = client.xrange(keys.deadletter(CAM))
    assert dead[b"reason"] == b"apply_failed" and b"boom on seq 2" in dead[b"detail"]
    # the replay without the dead-lettered result is what went out
    kept = [line.result(s, bool(pattern[s])) for s in range(8) if s != 2]
    assert emitted(client, keys) == replay(kept, cfg)
    assert client.xpending(keys.results(CAM), "publisher")["pending"] == 0
    pub.close()


def test_a_crash_mid_step_commits_nothing_and_the_next_owner_redoes_it(client, keys):
    line = FakeLine(client, keys)
    line.capture(6)
    cfg = settings()
    first = AlarmPublisher(client, keys, cfg, [CAM], worker_group=WORKERS, name="pubA")
    line.publish(0, False)
    pump(first, lambda: first.stats.results == 1)
    before = client.hgetall(keys.publisher_state(CAM))
    for seq in range(1, 4):
        line.publish(seq, True)
    state = first.owned[CAM]
    first._check_outstanding(state)
    first._read_results(None)
    first._release_in_order(state)
    assert state.events  # an alarm.started was built...
    first.close(commit=False)  # ...and the process died before committing it
    assert events(client, keys.alarms()) == []
    assert client.hgetall(keys.publisher_state(CAM)) == before
    second = AlarmPublisher(client, keys, cfg, [CAM], worker_group=WORKERS, name="pubB")
    pump(second, lambda: len(events(client, keys.alarms())) == 1)
    assert emitted(client, keys) == replay([line.result(s, s > 0) for s in range(4)], cfg)
    second.close()


def test_an_unreadable_stored_state_is_set_aside_not_crash_looped(client, keys):
    line = FakeLine(client, keys)
    line.capture(3)
    client.hset(
        keys.publisher_state(CAM),
        mapping={"machine": '{"format": 2, "cam": "cam1", "alarm": {"x": 1}}', "hwm_id": "0-0"},
    )
    pub = AlarmPublisher(client, keys, settings(), [CAM], worker_group=WORKERS)
    for seq in range(3):
        line.publish(seq, True)
    pump(pub, lambda: len(events(client, keys.alarms())) == 1)
    (reset,) = status_events(client, keys, "publisher.state_reset")
    assert client.exists(reset["detail"]["moved_to"])
    pub.close()


def test_a_heatmap_bomb_loses_its_overlay_not_its_alarm(client, keys):
    """Issue #8.4: a heat map that cannot be drawn must not swallow alarm.started.

    The publisher decodes no heat map at all any more (workers draw the overlay): a result that
    carries a bomb and no overlay opens its alarm without a picture.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    bomb += chunk(b"IEND", b"")
    line = FakeLine(client, keys)
    line.capture(3)
    pub = AlarmPublisher(client, keys, settings(), [CAM], worker_group=WORKERS)
    for seq in range(3):
        result = line.result(seq, True).model_copy(update={"heatmap": bomb, "overlay": None})
        client.xack(keys.frames(CAM), WORKERS, line.frame_ids[seq])
        client.xadd(keys.results(CAM), result.to_fields())
    pump(pub, lambda: len(events(client, keys.alarms())) == 1)
    (started,) = events(client, keys.alarms())
    assert started.type == "alarm.started" and started.overlay is None
    assert started.overlay_status == "no_overlay"
    pub.close()


def test_overlays_come_from_the_results_never_from_frames(client, keys):
    """The publisher copies the peak result's overlay; trimmed frames do not lose it."""
    line = FakeLine(client, keys)
    line.capture(4)
    client.delete(keys.frames(CAM))  # retention can no longer decide whether an alarm has one
    client.xgroup_create(keys.frames(CAM), WORKERS, id="0", mkstream=True)
    pub = AlarmPublisher(client, keys, settings(), [CAM], worker_group=WORKERS)
    for seq in range(4):
        line.publish(seq, True, ack=False)
    pump(pub, lambda: len(events(client, keys.alarms())) == 1)
    (started,) = events(client, keys.alarms())
    assert started.overlay_status == "ok"
    assert started.overlay == line.result(int(started.peak_seq), True).overlay
    pub.close()
    off = AlarmPublisher(
        client, keys, settings(overlays=False, alarm={"k": 1, "n": 1}), ["cam2"], name="off"
    )
    off_line = FakeLine(client, keys, "cam2")
    off_line.capture(1)
    off_line.publish(0, True)
    pump(off, lambda: len(events(client, keys.camera_alarms("cam2"))) == 1)
    (event,) = events(client, keys.camera_alarms("cam2"))
    assert event.overlay is None and event.overlay_status == "disabled"
    off.close()
