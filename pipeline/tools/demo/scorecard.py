"""The demo's scorecard: what the pipeline produced, held against the synthetic ground truth.

Every frame scored exactly once, each injected episode detected (an alarm overlapping it), no
alarm outside an episode, and the capture -> result / alarm latency.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.core.lifecycle import EXIT_FAILURE, EXIT_OK
from pipeline.core.wire import ResultMessage
from pipeline.stages.subscribe import AlarmRecord
from pipeline.tools.line import percentiles

__all__ = ["AlarmReport", "DemoSummary", "EpisodeReport", "score_run"]


@dataclass
class EpisodeReport:
    """One injected defect episode: frames [start, end) and whether an alarm covered it."""

    index: int
    start: int
    end: int
    defect: str
    detected: bool = False
    alarm_ids: list[str] = field(default_factory=list)
    delay_frames: int | None = None  # alarm.started trigger frame - first defective frame
    delay_s: float | None = None  # the same in capture time
    anomalous_frames: int = 0  # frames of the episode scored above the threshold
    peak_score_norm: float | None = None


@dataclass
class AlarmReport:
    """One alarm episode as the publisher emitted it, placed against the ground truth."""

    alarm_id: str
    first_frame: int  # first anomalous frame of the alarm (seq)
    last_frame: int  # last anomalous frame (seq)
    trigger_frame: int  # the frame that completed k-of-n (alarm.started)
    ended: bool
    peak_score: float
    peak_score_norm: float
    episode: int | None  # index of the overlapping episode; None = false alarm
    latency_ms: float | None  # capture of the trigger frame -> alarm.started written
    files: list[str] = field(default_factory=list)


@dataclass
class DemoSummary:
    """The result of a demo run (``--json`` writes ``to_dict()``)."""

    ok: bool
    exit_code: int
    problems: list[str]
    frames_rendered: int
    frames_captured: int
    frames_scored: int
    results_written: int
    duplicate_results: int
    frames_dead_lettered: int
    frames_lost: int
    episodes_injected: int
    episodes_detected: int
    false_alarms: int
    alarms: list[AlarmReport]
    episodes: list[EpisodeReport]
    anomalous_frames_in_episodes: int
    defective_frames: int
    anomalous_frames_outside: int
    normal_frames: int
    latency_ms: dict[str, dict[str, float | None]]
    throughput_fps: float
    camera_fps: float
    wall_s: float = 0.0
    stages_s: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    output_dir: str = ""
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _alarm_spans(
    alarms: Sequence[AlarmRecord], seq_of: dict[str, int], last_seq: int
) -> dict[str, dict[str, Any]]:
    """alarm id -> first/last anomalous frame, trigger frame, peak, events (in emission order)."""
    spans: dict[str, dict[str, Any]] = {}
    for event in alarms:
        span = spans.setdefault(
            event.alarm_id,
            {
                "seqs": set(),
                "trigger": None,
                "ended": False,
                "peak": 0.0,
                "peak_norm": 0.0,
                "latency_ms": None,
                "started_ts": None,
                "events": [],
            },
        )
        span["events"].append(event)
        span["seqs"].update(seq_of[f] for f in event.frame_ids if f in seq_of)
        if event.peak_score >= span["peak"]:
            span["peak"], span["peak_norm"] = event.peak_score, event.peak_score_norm
        if event.type == "alarm.started":
            span["trigger"] = event.seq
            span["started_ts"] = event.ts_ns
            if event.emitted_ns:
                span["latency_ms"] = max(0.0, (event.emitted_ns - event.ts_ns) / 1e6)
            span["seqs"].add(event.seq)
        elif event.type == "alarm.ended":
            span["ended"] = True
    for span in spans.values():
        if span["trigger"] is None:  # started before we looked: only updates/end seen
            span["trigger"] = min(span["seqs"]) if span["seqs"] else 0
        if not span["seqs"]:
            span["seqs"] = {span["trigger"]}
        if not span["ended"]:
            span["seqs"].add(last_seq)  # still open at the end: it covers the rest of the run
    return spans


def score_run(
    *,
    episodes: Sequence[Any],
    frames_rendered: int,
    frames_captured: int,
    results: Sequence[ResultMessage],
    alarms: Sequence[AlarmRecord],
    dead_letters: int,
    alarm_files: dict[str, list[str]] | None = None,
) -> DemoSummary:
    """Compare what the pipeline produced with the ground truth of the synthetic line.

    ``episodes`` are ``pipeline.tools.scene.LineEpisode`` (start, length/end, defect) in frame
    numbers, which are the capture ``seq`` of a fresh stream. An episode counts as detected when an
    alarm's frames [first anomalous, last anomalous] overlap it; an alarm that overlaps no
    episode is a false alarm.
    """
    first: dict[str, ResultMessage] = {}
    for result in results:
        first.setdefault(result.frame_id, result)
    unique = list(first.values())
    seq_of = {r.frame_id: r.seq for r in unique}
    by_seq = {r.seq: r for r in unique}
    last_seq = max(by_seq) if by_seq else 0
    defective = np.zeros(max(frames_rendered, last_seq + 1), dtype=bool)
    reports = []
    for i, ep in enumerate(sorted(episodes, key=lambda e: e.start)):
        defective[ep.start : ep.end] = True
        reports.append(EpisodeReport(index=i + 1, start=ep.start, end=ep.end, defect=ep.defect))

    spans = _alarm_spans(alarms, seq_of, last_seq)
    alarm_reports = []
    for alarm_id, span in spans.items():
        lo, hi = min(span["seqs"]), max(span["seqs"])
        hit = next((r for r in reports if lo < r.end and hi >= r.start), None)
        if hit is not None:
            hit.alarm_ids.append(alarm_id)
            if not hit.detected:
                hit.detected = True
                hit.delay_frames = span["trigger"] - hit.start
                start_frame = by_seq.get(hit.start)
                if start_frame is not None and span["started_ts"] is not None:
                    hit.delay_s = round((span["started_ts"] - start_frame.ts_ns) / 1e9, 3)
        alarm_reports.append(
            AlarmReport(
                alarm_id=alarm_id,
                first_frame=lo,
                last_frame=hi,
                trigger_frame=span["trigger"],
                ended=span["ended"],
                peak_score=round(span["peak"], 5),
                peak_score_norm=round(span["peak_norm"], 4),
                episode=hit.index if hit is not None else None,
                latency_ms=None if span["latency_ms"] is None else round(span["latency_ms"], 1),
                files=sorted((alarm_files or {}).get(alarm_id, [])),
            )
        )
    alarm_reports.sort(key=lambda a: a.first_frame)
    for report in reports:
        scored = [by_seq[s] for s in range(report.start, report.end) if s in by_seq]
        report.anomalous_frames = sum(r.anomalous for r in scored)
        if scored:
            report.peak_score_norm = round(max(r.score_norm for r in scored), 4)

    anomalous_in = sum(r.anomalous for r in unique if r.seq < defective.size and defective[r.seq])
    anomalous_out = sum(
        r.anomalous for r in unique if not (r.seq < defective.size and defective[r.seq])
    )
    result_latency = [max(0.0, (r.done_ns - r.ts_ns) / 1e6) for r in unique if r.done_ns]
    alarm_latency = [a.latency_ms for a in alarm_reports if a.latency_ms is not None]
    lost = max(0, frames_rendered - frames_captured) + max(
        0, frames_captured - len(unique) - dead_letters
    )
    if unique:
        start = min(r.ts_ns for r in unique)
        stop = max(r.done_ns or r.ts_ns for r in unique)
        span_s = max((stop - start) / 1e9, 1e-9)
        throughput = len(unique) / span_s
        capture_span = (max(r.ts_ns for r in unique) - start) / 1e9
        camera_fps = (len(unique) - 1) / capture_span if capture_span > 0 else 0.0
    else:
        throughput = camera_fps = 0.0

    false_alarms = sum(a.episode is None for a in alarm_reports)
    detected = sum(r.detected for r in reports)
    problems = []
    if lost:
        problems.append(f"{lost} frame(s) lost between capture and results")
    if len(results) != len(unique):
        problems.append(f"{len(results) - len(unique)} duplicate result(s)")
    if dead_letters:
        problems.append(f"{dead_letters} frame(s) dead-lettered")
    ok = not problems
    return DemoSummary(
        ok=ok,
        exit_code=EXIT_OK if ok else EXIT_FAILURE,
        problems=problems,
        frames_rendered=frames_rendered,
        frames_captured=frames_captured,
        frames_scored=len(unique),
        results_written=len(results),
        duplicate_results=len(results) - len(unique),
        frames_dead_lettered=dead_letters,
        frames_lost=lost,
        episodes_injected=len(reports),
        episodes_detected=detected,
        false_alarms=false_alarms,
        alarms=alarm_reports,
        episodes=reports,
        anomalous_frames_in_episodes=int(anomalous_in),
        defective_frames=int(sum(defective[r.seq] for r in unique if r.seq < defective.size)),
        anomalous_frames_outside=int(anomalous_out),
        normal_frames=int(sum(not defective[r.seq] for r in unique if r.seq < defective.size)),
        latency_ms={
            "capture_to_result": percentiles(result_latency),
            "capture_to_alarm": percentiles(alarm_latency),
        },
        throughput_fps=round(throughput, 3),
        camera_fps=round(camera_fps, 3),
    )
