"""Alarm state machine semantics: k-of-n start, clear, cooldown, update rate limit, ignore mask."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from pipeline.core.stage_settings import AlarmSettings, PublisherSettings
from pipeline.core.wire import Region, ResultMessage
from pipeline.stages.alarms import AlarmStateMachine, IgnoreMask

SEC = 1_000_000_000
FPS = 10


def result(
    seq: int,
    anomalous: bool,
    score: float | None = None,
    regions: list[Region] | None = None,
    mask: bytes | None = None,
    cam: str = "cam1",
) -> ResultMessage:
    score = score if score is not None else (2.0 if anomalous else 0.2)
    return ResultMessage(
        cam=cam,
        frame_id=f"{1000 + seq}-0",
        seq=seq,
        ts_ns=seq * SEC // FPS,
        score=score,
        score_norm=min(1.0, score / 2),
        anomalous=anomalous,
        threshold=1.0,
        model="m",
        model_version="1",
        model_sha256="ab" * 32,
        map_w=16,
        map_h=16,
        regions=regions if regions is not None else [],
        mask=mask,
    )


def feed(machine: AlarmStateMachine, pattern: str, start: int = 0, scores=None) -> list:
    """Feed a pattern like '..xx.x' (x = anomalous); returns (seq, event type) pairs."""
    out = []
    for i, ch in enumerate(pattern):
        seq = start + i
        score = scores.get(seq) if scores else None
        for t in machine.observe(result(seq, ch == "x", score)):
            out.append((seq, t.event.type))
    return out


def settings(**kw) -> AlarmSettings:
    base = {"k": 3, "n": 5, "clear_after": 3, "cooldown_s": 0.0, "update_interval_s": 0.0}
    return AlarmSettings(**{**base, **kw})


def test_k_of_n_starts_only_with_enough_hits_in_window():
    m = AlarmStateMachine("cam1", settings())
    # x..x..x: never 3 hits within 5 consecutive frames
    assert feed(m, "x..x..x..x") == []
    m = AlarmStateMachine("cam1", settings())
    # hits at 0, 2, 4 -> 3 of the last 5 at seq 4
    assert feed(m, "x.x.x") == [(4, "alarm.started")]


def test_started_event_reports_episode_from_first_hit():
    m = AlarmStateMachine("cam1", settings())
    events = []
    for seq, ch in enumerate("..x.xx"):
        events += m.observe(result(seq, ch == "x", score={2: 3.0, 4: 2.5, 5: 2.0}.get(seq)))
    (start,) = events
    ev = start.event
    assert ev.alarm_id == "cam1-1002-0"
    assert ev.started_ns == 2 * SEC // FPS
    assert ev.frame_ids == ["1002-0", "1004-0", "1005-0"]
    assert ev.frame_count == 4 and ev.anomalous_count == 3
    assert ev.peak_frame_id == "1002-0" and ev.peak_score == 3.0
    assert ev.frame_id == "1005-0" and ev.threshold == 1.0 and ev.model_sha256 == "ab" * 32


def test_ends_after_clear_after_consecutive_normal_frames():
    m = AlarmStateMachine("cam1", settings(clear_after=3))
    got = feed(m, "xxx" + "..x" + "...")
    assert got == [(2, "alarm.started"), (8, "alarm.ended")]
    assert not m.active


def test_ended_event_has_duration_peak_and_counts():
    m = AlarmStateMachine("cam1", settings(clear_after=2))
    events = []
    for seq, ch in enumerate("xxxx.."):
        events += m.observe(result(seq, ch == "x", score=1.5 + seq * 0.1 if ch == "x" else None))
    ended = events[-1].event
    assert ended.type == "alarm.ended"
    assert ended.ended_ns == 5 * SEC // FPS
    assert ended.duration_s == pytest.approx(0.5)
    assert ended.peak_frame_id == "1003-0" and ended.peak_score == pytest.approx(1.8)
    assert ended.frame_count == 6 and ended.anomalous_count == 4
    assert ended.alarm_id == events[0].event.alarm_id


def test_cooldown_blocks_a_new_start_until_capture_time_passes():
    m = AlarmStateMachine("cam1", settings(clear_after=1, cooldown_s=1.0))  # 1 s = 10 frames
    got = feed(m, "xxx." + "xxxxx" + "xxx")
    # ended at seq 3 (ts 0.3 s); cooldown until 1.3 s = seq 13; hits keep coming but must wait
    assert got == [(2, "alarm.started"), (3, "alarm.ended")]
    got = feed(m, "xxxx", start=12)
    assert got == [(13, "alarm.started")]


def test_new_episode_needs_fresh_hits_after_end():
    m = AlarmStateMachine("cam1", settings(k=3, n=10, clear_after=2))
    got = feed(m, "xxxxx..x.x")
    # the window after the end is reset: x at 7 and 9 are only 2 hits
    assert got == [(2, "alarm.started"), (6, "alarm.ended")]


def test_updates_only_on_new_peak_and_rate_limited():
    m = AlarmStateMachine("cam1", settings(update_interval_s=0.5, clear_after=50))
    scores = {0: 2.0, 1: 2.0, 2: 2.0, 3: 2.5, 4: 2.6, 5: 2.4, 6: 2.0, 7: 2.0, 8: 3.0, 9: 3.1}
    scores.update({s: 2.0 for s in range(10, 20)})
    got = feed(m, "x" * 20, scores=scores)
    # start at 2 (t=0.2); new peaks at 3, 4 -> held until t >= 0.7 (seq 7), then 8, 9 -> seq 12
    assert got == [(2, "alarm.started"), (7, "alarm.updated"), (12, "alarm.updated")]


def test_no_update_without_a_new_peak():
    m = AlarmStateMachine("cam1", settings(clear_after=50))
    got = feed(m, "x" * 30)  # equal scores: nothing new to say
    assert got == [(2, "alarm.started")]


def _png(mask: np.ndarray) -> bytes:
    return cv2.imencode(".png", mask)[1].tobytes()


def test_ignore_mask_drops_anomalies_fully_inside_ignored_area():
    ignore = np.zeros((32, 32), np.uint8)
    ignore[:, :16] = 255  # left half ignored (drawn at 32x32, maps are 16x16)
    m = AlarmStateMachine("cam1", settings(k=2, n=3), ignore_mask=IgnoreMask(ignore))
    left = np.zeros((16, 16), np.uint8)
    left[2:5, 2:6] = 255
    left_region = Region(x=2, y=2, w=4, h=3, area=12, peak=2.0, mean=1.5)
    both = left.copy()
    both[10:12, 12:14] = 255
    right_region = Region(x=12, y=10, w=2, h=2, area=4, peak=1.4, mean=1.2)

    ignored_frames = [result(s, True, mask=_png(left), regions=[left_region]) for s in range(5)]
    assert all(m.observe(r) == [] for r in ignored_frames)
    assert m.counts(ignored_frames[0]) == (False, [])

    counted = result(5, True, mask=_png(both), regions=[left_region, right_region])
    assert m.counts(counted) == (True, [right_region])
    m.observe(counted)
    (start,) = m.observe(result(6, True, mask=_png(both), regions=[left_region, right_region]))
    assert start.event.type == "alarm.started"
    assert start.event.regions == [right_region]


def test_ignore_mask_uses_region_boxes_without_a_mask_png():
    ignore = np.zeros((16, 16), np.uint8)
    ignore[:8] = 1
    mask = IgnoreMask(ignore)
    inside = Region(x=0, y=0, w=5, h=5, area=10, peak=2.0, mean=1.5)
    crossing = Region(x=0, y=6, w=5, h=5, area=10, peak=2.0, mean=1.5)
    assert mask.filter(result(0, True, regions=[inside])) == (False, [])
    assert mask.filter(result(0, True, regions=[inside, crossing])) == (True, [crossing])


def test_ignore_mask_file_from_settings(tmp_path):
    path = tmp_path / "ignore.png"
    cv2.imwrite(str(path), np.full((8, 8), 255, np.uint8))
    m = AlarmStateMachine("cam1", settings(k=1, n=1, ignore_mask=path))
    region = Region(x=0, y=0, w=2, h=2, area=4, peak=2.0, mean=2.0)
    assert m.observe(result(0, True, regions=[region])) == []
    with pytest.raises(ValueError, match="not a readable image"):
        AlarmStateMachine("cam1", settings(ignore_mask=tmp_path / "missing.png"))


def test_state_round_trip_continues_an_open_alarm_identically():
    cfg = settings(update_interval_s=0.3, clear_after=4)
    pattern = "..xx.x" + "xx.x" + "x..." + ".." + "xxx...."
    scores = {s: 1.0 + (s % 7) * 0.3 for s in range(len(pattern))}
    reference = AlarmStateMachine("cam1", cfg)
    expected = [
        (seq, t.event.model_dump())
        for seq, ch in enumerate(pattern)
        for t in reference.observe(result(seq, ch == "x", scores[seq] if ch == "x" else None))
    ]
    # same feed, but the machine is serialised through JSON and rebuilt after every frame
    machine = AlarmStateMachine("cam1", cfg)
    got = []
    for seq, ch in enumerate(pattern):
        for t in machine.observe(result(seq, ch == "x", scores[seq] if ch == "x" else None)):
            got.append((seq, t.event.model_dump()))
        machine = AlarmStateMachine.from_dict(json.loads(json.dumps(machine.to_dict())), cfg)
    assert got == expected
    assert [e["type"] for _, e in expected].count("alarm.started") == 2


def test_wrong_camera_and_bad_settings_are_refused():
    m = AlarmStateMachine("cam1", settings())
    with pytest.raises(ValueError, match="camera 'cam2'"):
        m.observe(result(0, True, cam="cam2"))
    with pytest.raises(ValueError, match="k=6 must not exceed n=5"):
        AlarmSettings(k=6, n=5)


def test_per_camera_overrides_merge_with_defaults():
    p = PublisherSettings.model_validate(
        {"alarm": {"k": 2, "n": 4, "cooldown_s": 7}, "per_camera": {"cam9": {"clear_after": 9}}}
    )
    assert p.alarm_for("cam9").k == 2 and p.alarm_for("cam9").clear_after == 9
    assert p.alarm_for("cam9").cooldown_s == 7
    assert p.alarm_for("other").clear_after == 5


def test_out_of_order_seq_is_handled_not_asserted():
    """A camera that restarts its numbering (or a stray old seq) must not break the k-of-n rule."""
    machine = AlarmStateMachine("cam1", settings(k=3, n=5))
    got = []
    for seq in (10, 11, 3, 12):  # arrival order; seq 3 is out of order
        got += [(seq, t.event.type) for t in machine.observe(result(seq, True))]
    assert got == [(3, "alarm.started")]
    # the state survives a round trip and goes on identically
    again = AlarmStateMachine.from_dict(json.loads(json.dumps(machine.to_dict())), settings())
    ends = [t.event.type for s in (13, 14, 15) for t in again.observe(result(s, False))]
    assert ends == ["alarm.ended"]


def test_checkpoint_restore_undoes_a_frame_completely():
    machine = AlarmStateMachine("cam1", settings(k=2, n=3))
    feed(machine, "x")
    before = machine.to_dict()
    point = machine.checkpoint()
    assert [t.event.type for t in machine.observe(result(1, True))] == ["alarm.started"]
    machine.restore(point)
    assert machine.to_dict() == before and not machine.active
    # and the same frame again gives the same event
    assert [t.event.type for t in machine.observe(result(1, True))] == ["alarm.started"]


def test_state_format_1_still_loads():
    old = {
        "format": 1,
        "cam": "cam1",
        "window": [[True, 5, 500_000_000, "1005-0"], [False, 6, 600_000_000, "1006-0"]],
        "window_hits": [result(5, True).model_dump_json()],
        "cooldown_until_ns": 0,
        "alarm": None,
        "peak": None,
        "peak_regions": [],
    }
    machine = AlarmStateMachine.from_dict(old, settings(k=2, n=3))
    assert [t.event.type for t in machine.observe(result(7, True))] == ["alarm.started"]


def test_seqs_going_backwards_while_a_cooldown_runs_out():
    """The exact pattern that made the old machine raise (max() of no hits) on every restart."""
    pattern = [(1, 1), (2, 1), (3, 1), (4, 0), (5, 0), (6, 0), (7, 0), (-5, 1), (-9, 1), (8, 0)]
    machine = AlarmStateMachine("cam1", settings(k=2, n=3, clear_after=3, cooldown_s=0.35))
    got = []
    for i, (offset, anomalous) in enumerate(pattern):
        frame = result(100 + offset, bool(anomalous)).model_copy(
            update={"ts_ns": i * SEC // FPS, "frame_id": f"{5000 + i}-0"}
        )
        got += [(i, t.event.type) for t in machine.observe(frame)]
    assert got == [(1, "alarm.started"), (5, "alarm.ended"), (9, "alarm.started")]
    assert machine.to_dict()["peak"] is not None
