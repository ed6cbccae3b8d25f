"""``efficientad demo``: the scorecard logic, and the real thing end to end (real processes)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.wire import ResultMessage
from pipeline.stages.subscribe import AlarmRecord
from pipeline.tools.demo.run import DemoError, DemoSettings, run_demo, score_run
from pipeline.tools.scene import LineEpisode

FRAME_S = 0.5  # capture period of the hand-made streams below


def _results(n: int, anomalous: set[int]) -> list[ResultMessage]:
    out = []
    for seq in range(n):
        ts_ns = int(seq * FRAME_S * 1e9)
        out.append(
            ResultMessage(
                cam="line1",
                frame_id=f"{1000 + seq}-0",
                seq=seq,
                ts_ns=ts_ns,
                score=1.0 if seq in anomalous else 0.1,
                score_norm=0.9 if seq in anomalous else 0.2,
                anomalous=seq in anomalous,
                threshold=0.5,
                model="demo",
                t_total_ms=200.0 + seq,
                done_ns=ts_ns + int((200.0 + seq) * 1e6),
                map_w=256,
                map_h=256,
            )
        )
    return out


def _alarm(kind: str, alarm_id: str, seq: int, frames: list[int], *, started: int) -> AlarmRecord:
    ts_ns = int(seq * FRAME_S * 1e9)
    return AlarmRecord(
        type=kind,
        alarm_id=alarm_id,
        cam="line1",
        ts_ns=ts_ns,
        emitted_ns=ts_ns + 300_000_000,
        started_ns=int(started * FRAME_S * 1e9),
        duration_s=(seq - started) * FRAME_S,
        seq=seq,
        score=1.0,
        score_norm=0.9,
        peak_score=1.0,
        peak_score_norm=0.9,
        threshold=0.5,
        frame_count=len(frames),
        frame_ids=[f"{1000 + s}-0" for s in frames],
    )


def test_scorecard_detections_false_alarms_and_latency() -> None:
    episodes = [
        LineEpisode(start=10, length=8, defect="scratch"),
        LineEpisode(start=40, length=8, defect="spot"),
    ]
    results = _results(60, anomalous={11, 12, 13, 14, 15, 16, 30, 31, 32})
    alarms = [
        _alarm("alarm.started", "a1", 13, [11, 12, 13], started=11),
        _alarm("alarm.ended", "a1", 21, [11, 12, 13, 14, 15, 16], started=11),
        _alarm("alarm.started", "a2", 32, [30, 31, 32], started=30),
        _alarm("alarm.ended", "a2", 37, [30, 31, 32], started=30),
    ]
    summary = score_run(
        episodes=episodes,
        frames_rendered=60,
        frames_captured=60,
        results=results,
        alarms=alarms,
        dead_letters=0,
        alarm_files={"a1": ["x-overlay.jpg"]},
    )
    assert summary.ok and summary.exit_code == 0
    assert summary.frames_scored == 60 and summary.frames_lost == 0
    assert summary.episodes_injected == 2 and summary.episodes_detected == 1
    assert summary.false_alarms == 1
    first, second = summary.episodes
    assert first.detected and first.alarm_ids == ["a1"]
    assert first.delay_frames == 3  # alarm.started on frame 13, episode began at 10
    assert first.delay_s == pytest.approx(13 * FRAME_S - 10 * FRAME_S)
    assert first.anomalous_frames == 6
    assert not second.detected and second.anomalous_frames == 0
    a1, a2 = summary.alarms
    assert (a1.first_frame, a1.last_frame, a1.episode, a1.files) == (11, 16, 1, ["x-overlay.jpg"])
    assert a2.episode is None and a1.latency_ms == pytest.approx(300.0)
    assert summary.anomalous_frames_in_episodes == 6 and summary.defective_frames == 16
    assert summary.anomalous_frames_outside == 3 and summary.normal_frames == 44
    latency = summary.latency_ms["capture_to_result"]
    assert latency["count"] == 60 and 200 <= latency["p50"] <= latency["p99"] <= 260
    assert summary.throughput_fps > 0
    json.dumps(summary.to_dict())


def test_scorecard_fails_on_lost_and_duplicated_frames() -> None:
    results = _results(20, anomalous=set())
    del results[5]  # frame 5 never got a result
    results.append(results[0])  # and frame 0 got two
    summary = score_run(
        episodes=[],
        frames_rendered=20,
        frames_captured=20,
        results=results,
        alarms=[],
        dead_letters=0,
    )
    assert not summary.ok and summary.exit_code == 1
    assert summary.frames_lost == 1 and summary.duplicate_results == 1
    assert any("lost" in p for p in summary.problems)
    assert any("duplicate" in p for p in summary.problems)


def test_an_alarm_open_at_the_end_still_covers_its_episode() -> None:
    episodes = [LineEpisode(start=14, length=6, defect="crack")]
    results = _results(20, anomalous={15, 16, 17, 18, 19})
    alarms = [_alarm("alarm.started", "a1", 17, [15, 16, 17], started=15)]
    summary = score_run(
        episodes=episodes,
        frames_rendered=20,
        frames_captured=20,
        results=results,
        alarms=alarms,
        dead_letters=0,
    )
    assert summary.episodes_detected == 1 and summary.false_alarms == 0
    assert summary.alarms[0].ended is False and summary.alarms[0].last_frame == 19


def test_bad_settings_are_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="frames must be >= 20"):
        run_demo(DemoSettings(out=tmp_path, frames=5), stream=io.StringIO())
    with pytest.raises(DemoError, match="not a model directory"):
        run_demo(DemoSettings(out=tmp_path, model=tmp_path), stream=io.StringIO())
    proc = subprocess.run(
        [sys.executable, "-m", "efficientad.cli", "demo", "--out", str(tmp_path), "--frames", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "frames must be >= 20" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_end_to_end(tmp_path: Path) -> None:
    """Training, embedded Redis, capture + 2 workers + publisher as real processes."""
    out = tmp_path / "demo-output"
    console = io.StringIO()
    summary = run_demo(
        DemoSettings(
            out=out,
            frames=DEMO_TEST_FRAMES,
            episodes=2,
            train_steps=DEMO_TEST_STEPS,
            train_images=48,  # the default: 12 of them calibrate the threshold
            workers=2,
            fps=2.0,
            status_every_s=2.0,
        ),
        stream=console,
    )
    text = console.getvalue()
    assert summary.ok, text
    assert summary.exit_code == 0
    # every frame captured and scored exactly once, nothing dead-lettered
    assert summary.frames_rendered == summary.frames_captured == DEMO_TEST_FRAMES
    assert summary.frames_scored == summary.results_written == DEMO_TEST_FRAMES
    assert summary.duplicate_results == 0 and summary.frames_dead_lettered == 0
    assert summary.frames_lost == 0
    # the injected defects raise alarms, normal parts do not
    assert summary.episodes_injected == 2
    assert summary.episodes_detected == 2, text
    assert summary.false_alarms == 0, text
    # latency is measured from capture time
    result_latency = summary.latency_ms["capture_to_result"]
    assert result_latency["count"] == DEMO_TEST_FRAMES and result_latency["p50"] > 0
    assert summary.latency_ms["capture_to_alarm"]["count"] >= 2
    # alarm masks and overlays on disk, plus the summary
    files = [Path(f) for f in summary.files]
    assert any(f.name.endswith("-started-mask.png") for f in files)
    assert any(f.name.endswith("-started-overlay.jpg") for f in files)
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)
    written = json.loads((out / "summary.json").read_text())
    assert written["episodes_detected"] == 2 and written["frames_lost"] == 0
    # the console told the story: live lines, alarms, the scorecard
    assert "ALARM" in text and "CLEARED" in text and "Summary" in text and "OK" in text


DEMO_TEST_FRAMES = 60
DEMO_TEST_STEPS = 40
