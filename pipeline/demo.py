"""``efficientad demo``: the whole product on one box, from nothing, in a few minutes.

It generates a synthetic production line (turned steel flanges on a conveyor, ``models.synth``)
with defect episodes whose frames are known, trains a small EfficientAD-S on normal images only,
then streams the line through the real pipeline: an embedded Redis, the capture, two worker
processes and the alarm publisher, supervised by ``run_line`` exactly as ``efficientad run``
does. The console shows throughput, per-frame scores and alarms as they happen; alarm masks and
overlays land in the output folder; the run ends with a scorecard against the ground truth:
every frame scored exactly once, each injected episode detected (an alarm overlapping it), no
alarm outside an episode, and the capture -> result / alarm latency.

The camera is paced below the measured scoring capacity of the machine, as a real line camera
would be, so the latency shows the pipeline and not an ever-growing backlog.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from pipeline.config import (
    CameraSettings,
    LineConfig,
    LoggingSettings,
    MetricsSettings,
    RedisSettings,
    RunSettings,
)
from pipeline.stage_settings import AlarmSettings, PublisherSettings, WorkerSettings
from pipeline.subscribe import AlarmRecord, save_event_files
from pipeline.wire import ResultMessage, StreamKeys, WireError

__all__ = [
    "CAMERA_ID",
    "DEFAULT_TRAIN_STEPS",
    "AlarmReport",
    "DemoError",
    "DemoSettings",
    "DemoSummary",
    "EpisodeReport",
    "percentiles",
    "quiet_loggers",
    "run_demo",
    "score_run",
]

log = logging.getLogger(__name__)

CAMERA_ID = "line1"
# With DEMO_LR, 40 Adam steps of EfficientAD-S on the shipped teacher put every frame of a scratch
# or crack episode at 2-3x the threshold and every normal frame below it (25 steps do not
# separate them yet); one step costs about 2.5 s on two CPU cores.
DEFAULT_TRAIN_STEPS = 40
FRAMES_PER_PART = 4  # frames one flange spends in the field of view
MAX_AUTO_FPS = 4.0  # keeps the demo a stream you can follow on a GPU box
CAPACITY_LOAD = 0.8  # camera rate as a fraction of the measured scoring capacity
EPISODE_FRAMES = (8, 12)  # two to three defective parts in a row
# Defects a model trained for two minutes on two CPU cores finds reliably. Small stains ("spot")
# need about 60 steps and are still caught only on some parts; a chipped-off piece of the rim
# ("missing") needs a much longer-trained model (it shows belt, which the model knows well, where
# metal should be). --defects and --train-steps add them.
DEMO_DEFECTS = ("scratch", "crack")
# A short schedule needs a larger step than the paper's 1e-4 (tuned for 70 000 steps).
DEMO_LR = 1e-3


class DemoError(RuntimeError):
    """The demo cannot run with these settings (said in the message, with what to change)."""


@dataclass
class DemoSettings:
    """Knobs of ``efficientad demo``; the defaults are the README's main command."""

    out: Path = Path("demo-output")
    frames: int = 120
    episodes: int = 3
    train_steps: int = DEFAULT_TRAIN_STEPS
    train_images: int = 48
    train_lr: float = DEMO_LR
    defects: tuple[str, ...] = DEMO_DEFECTS
    workers: int = 2
    batch_size: int = 4
    fps: float | None = None  # None: CAPACITY_LOAD x the measured capacity, at most MAX_AUTO_FPS
    model: Path | None = None  # an existing model directory instead of training one
    seed: int = 7
    size: int = 256
    keep: bool = False  # keep training data, line frames, model and a line.yaml under OUT/work
    color: bool | None = None  # None: when the console is a terminal and NO_COLOR is unset
    status_every_s: float = 5.0

    def check(self) -> None:
        problems = []
        if self.frames < 20:
            problems.append(f"frames must be >= 20, got {self.frames}")
        if self.episodes < 0:
            problems.append(f"episodes must be >= 0, got {self.episodes}")
        if self.train_steps < 1:
            problems.append(f"train_steps must be >= 1, got {self.train_steps}")
        if self.train_images < 8:
            problems.append(f"train_images must be >= 8, got {self.train_images}")
        if not 0 < self.train_lr < 1:
            problems.append(f"train_lr must be in (0, 1), got {self.train_lr}")
        from models.synth import DEFECT_TYPES

        unknown = sorted(set(self.defects) - set(DEFECT_TYPES))
        if unknown or not self.defects:
            problems.append(
                f"defects must be some of {list(DEFECT_TYPES)}, got {list(self.defects)}"
            )
        if self.workers < 1:
            problems.append(f"workers must be >= 1, got {self.workers}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.fps is not None and not 0 < self.fps <= 1000:
            problems.append(f"fps must be in (0, 1000], got {self.fps}")
        if self.size < 256:
            problems.append(f"size must be >= 256 (EfficientAD's minimum input), got {self.size}")
        if self.model is not None and not (Path(self.model) / "model.json").is_file():
            problems.append(f"model {str(self.model)!r} is not a model directory (no model.json)")
        if problems:
            raise DemoError("; ".join(problems))


# ------------------------------------------------------------------------------------------------
# scorecard


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


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 / max (None when there are no values)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "count": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(arr, 50)), 1),
        "p90": round(float(np.percentile(arr, 90)), 1),
        "p99": round(float(np.percentile(arr, 99)), 1),
        "max": round(float(arr.max()), 1),
        "count": int(arr.size),
    }


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

    ``episodes`` are ``models.synth.LineEpisode`` (start, length/end, defect) in frame numbers,
    which are the capture ``seq`` of a fresh stream. An episode counts as detected when an
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
        exit_code=0 if ok else 1,
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


# ------------------------------------------------------------------------------------------------
# console


class _Console:
    """Compact, aligned output; colour only on a terminal (and never with NO_COLOR)."""

    BARS = "▁▂▃▄▅▆▇█"
    ASCII_BARS = "_.-=+*#@"

    def __init__(self, stream: TextIO, color: bool | None) -> None:
        self.stream = stream
        tty = bool(getattr(stream, "isatty", lambda: False)())
        self.tty = tty
        self.color = (tty and "NO_COLOR" not in os.environ) if color is None else color
        encoding = (getattr(stream, "encoding", None) or "").lower()
        self.bars = self.BARS if "utf" in encoding else self.ASCII_BARS
        self.arrow = "→" if "utf" in encoding else "->"
        self.dot = "·" if "utf" in encoding else "|"

    def _paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def bold(self, text: str) -> str:
        return self._paint(text, "1")

    def dim(self, text: str) -> str:
        return self._paint(text, "2")

    def red(self, text: str) -> str:
        return self._paint(text, "1;31")

    def green(self, text: str) -> str:
        return self._paint(text, "1;32")

    def yellow(self, text: str) -> str:
        return self._paint(text, "33")

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, number: int, total: int, title: str, detail: str) -> None:
        self.line(f"{self.bold(f'[{number}/{total}]')} {title:<14} {detail}")

    def scores(self, results: Sequence[ResultMessage]) -> str:
        """One character per frame: bar height = normalised score, red at or over threshold."""
        out = []
        top = len(self.bars) - 1
        for r in results:
            level = min(top, max(0, int(r.score_norm * len(self.bars))))
            char = self.bars[level]
            out.append(self.red(char) if r.anomalous else char)
        return "".join(out)


def _fmt_s(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)} min {rest:04.1f} s"


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.2f} s"


# ------------------------------------------------------------------------------------------------
# live view of the streams


class _StreamWatcher:
    """Reads results and alarm events as they appear (plain XREAD, no consumer group, so the
    pipeline's own groups are untouched) and keeps everything for the scorecard."""

    def __init__(self, client: Any, keys: StreamKeys, cam: str, alarm_dir: Path) -> None:
        self.client = client
        self.keys = keys
        self.cam = cam
        self.alarm_dir = alarm_dir
        self.results: list[ResultMessage] = []
        self.alarms: list[AlarmRecord] = []
        self.alarm_files: dict[str, list[str]] = {}
        self.unreadable = 0
        self._positions = {keys.results(cam): "0-0", keys.camera_alarms(cam): "0-0"}

    def poll(self) -> tuple[list[ResultMessage], list[AlarmRecord]]:
        new_results: list[ResultMessage] = []
        new_alarms: list[AlarmRecord] = []
        while True:
            reply = self.client.xread(self._positions, count=500)
            if not reply:
                break
            for key, items in reply:
                key = key.decode() if isinstance(key, bytes) else key
                for entry_id, fields in items:
                    self._positions[key] = (
                        entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    )
                    try:
                        if key == self.keys.results(self.cam):
                            new_results.append(ResultMessage.from_fields(fields))
                        else:
                            record = AlarmRecord.from_fields({**fields, b"stream_id": entry_id})
                            saved = save_event_files(record, self.alarm_dir)
                            self.alarm_files.setdefault(record.alarm_id, []).extend(
                                str(p) for p in saved
                            )
                            new_alarms.append(record)
                    except WireError as exc:
                        self.unreadable += 1
                        log.warning("unreadable entry %s in %s: %s", entry_id, key, exc)
        self.results.extend(new_results)
        self.alarms.extend(new_alarms)
        return new_results, new_alarms

    def captured(self) -> int:
        return int(self.client.xlen(self.keys.frames(self.cam)))

    def dead_letters(self) -> int:
        return int(self.client.xlen(self.keys.deadletter(self.cam)))


# ------------------------------------------------------------------------------------------------
# the run


@contextlib.contextmanager
def quiet_loggers(names: Sequence[str], level: int) -> Iterator[None]:
    """Library INFO/WARNING chatter (supervisor start lines, "no penalty images") would bury the
    demo's own output; the same facts are printed in plain words instead."""
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, old in saved.items():
            logging.getLogger(name).setLevel(old)


def _plan(settings: DemoSettings, fps: float, alarm: AlarmSettings) -> list[Any]:
    """Defect episodes with room for every alarm to end and cool down before the next one;
    their types cycle through ``settings.defects`` in a seeded random order."""
    from models.synth import LineEpisode, plan_episodes

    cooldown_frames = math.ceil(alarm.cooldown_s * fps)
    min_gap = alarm.clear_after + cooldown_frames + 3
    lo, hi = EPISODE_FRAMES
    try:
        planned = plan_episodes(settings.frames, settings.episodes, lo, hi, min_gap, settings.seed)
    except ValueError as exc:
        need = settings.episodes * hi + (settings.episodes + 1) * min_gap
        raise DemoError(
            f"{settings.frames} frames are too few for {settings.episodes} defect episodes at "
            f"{fps:.1f} fps (need about {need}: episodes of {lo}-{hi} frames with {min_gap} "
            f"clean frames around each); raise --frames or lower --episodes ({exc})"
        ) from None
    rng = np.random.default_rng(settings.seed)
    kinds = [str(k) for k in rng.permutation(np.resize(np.array(settings.defects), len(planned)))]
    return [LineEpisode(e.start, e.length, kind) for e, kind in zip(planned, kinds, strict=True)]


def _render_line(folder: Path, settings: DemoSettings, episodes: list[Any]) -> int:
    import cv2

    from models.synth import line_frames

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    count = 0
    size = (settings.size, settings.size)
    for index, frame, _mask, _defect in line_frames(
        settings.frames, episodes, size, seed=settings.seed, frames_per_part=FRAMES_PER_PART
    ):
        if not cv2.imwrite(str(folder / f"frame_{index:06d}.png"), frame):
            raise OSError(f"could not write {folder / f'frame_{index:06d}.png'}")
        count += 1
    return count


def _measure_capacity(model_dir: Path, size: int, frames: int = 2) -> float:
    """Frames per second this machine scores (all cores, one process): what N workers share."""
    import torch

    from models.inference import InferenceEngine

    engine = InferenceEngine.load(model_dir)
    batch = torch.randint(0, 256, (frames, 3, size, size), dtype=torch.uint8)
    engine.predict(batch[:1])  # first call pays for lazy initialisation
    started = time.perf_counter()
    engine.predict(batch)
    elapsed = time.perf_counter() - started
    del engine
    return frames / max(elapsed, 1e-6)


def _line_config(
    settings: DemoSettings, redis_url: str, frames_dir: Path, model_dir: Path, fps: float
) -> LineConfig:
    return LineConfig(
        redis=RedisSettings(url=redis_url),
        cameras=[
            CameraSettings(
                id=CAMERA_ID,
                source=str(frames_dir),
                fps=fps,
                realtime=False,  # a replay: every frame, none dropped
                maxlen=max(1000, 2 * settings.frames),  # nothing trimmed before it is scored
                frozen_after_s=None,
            )
        ],
        models={"default": model_dir},
        worker=WorkerSettings(batch_size=settings.batch_size, device="auto"),
        publisher=PublisherSettings(),
        metrics=MetricsSettings(enabled=False),
        logging=LoggingSettings(level="WARNING"),
        # the demo ends when the line is drained, however slow the machine: no drain deadline
        run=RunSettings(workers=settings.workers, stop_timeout_s=20.0, drain_timeout_s=3600.0),
    )


def _write_line_yaml(path: Path, config: LineConfig) -> None:
    """A config that replays the demo line with ``efficientad run`` (embedded Redis)."""
    import yaml

    data = config.model_dump(mode="json", exclude_defaults=True)
    data["redis"] = {"url": None}
    for section in ("logging", "metrics"):
        data.pop(section, None)
    data["run"] = {"workers": config.run.workers}
    path.write_text(
        "# written by `efficientad demo --keep`: replay the demo line with\n"
        f"#   efficientad run --config {path} --until-drained\n"
        + yaml.safe_dump(data, sort_keys=False)
    )


def run_demo(settings: DemoSettings, stream: TextIO | None = None) -> DemoSummary:
    """Run the demo end to end; returns the scorecard (``exit_code`` says success)."""
    settings.check()
    console = _Console(stream or sys.stdout, settings.color)
    started = time.monotonic()
    stages: dict[str, float] = {}
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    alarm_dir = out / "alarms"
    shutil.rmtree(alarm_dir, ignore_errors=True)  # files of an earlier run would mix in
    if settings.keep:
        work_ctx: Any = contextlib.nullcontext(str(out / "work"))
    else:
        work_ctx = tempfile.TemporaryDirectory(prefix="efficientad-demo-")
    noisy = ("models", "pipeline.supervisor", "pipeline.redis_conn", "efficientad")
    with work_ctx as work_name, quiet_loggers(noisy, logging.ERROR):
        work = Path(work_name)
        work.mkdir(parents=True, exist_ok=True)
        dot = console.dot
        console.line(console.bold("EfficientAD line monitor demo"))
        console.line(
            console.dim(
                f"  a synthetic flange line {dot} {settings.frames} frames {dot} "
                f"{settings.episodes} defect episodes {dot} embedded Redis {dot} "
                f"{settings.workers} workers {dot} alarm publisher"
            )
        )
        console.line()
        model_dir, model_info = _prepare_model(settings, work, console, stages)

        t0 = time.monotonic()
        alarm = AlarmSettings()
        if settings.fps is not None:
            fps = settings.fps
            capacity_note = "as requested"
        else:
            capacity = _measure_capacity(model_dir, settings.size)
            fps = max(0.2, min(MAX_AUTO_FPS, CAPACITY_LOAD * capacity))
            capacity_note = (
                f"this machine scores ~{capacity:.1f} frames/s, camera paced at "
                f"{CAPACITY_LOAD:.0%} of that"
            )
        episodes = _plan(settings, fps, alarm)
        frames_dir = work / "line"
        rendered = _render_line(frames_dir, settings, episodes)
        stages["render"] = time.monotonic() - t0
        kinds = ", ".join(f"{e.defect}@{e.start}" for e in episodes) or "none"
        console.step(
            3,
            4,
            "camera feed",
            f"{rendered} frames at {fps:.1f} fps ({capacity_note}); "
            f"defects at frames {kinds}  {console.dim(_fmt_s(stages['render']))}",
        )
        summary = _stream(
            settings,
            console,
            frames_dir,
            model_dir,
            fps,
            episodes,
            rendered,
            alarm_dir,
            work,
            stages,
        )
    summary.wall_s = round(time.monotonic() - started, 1)
    summary.stages_s = {k: round(v, 1) for k, v in stages.items()}
    summary.model = model_info
    settings_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()}
    settings_dict["fps"] = round(fps, 3)
    summary.settings = settings_dict
    summary.output_dir = str(out)
    summary.files = sorted(str(p) for p in alarm_dir.rglob("*") if p.is_file())
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    _print_summary(console, summary, out)
    return summary


def _prepare_model(
    settings: DemoSettings, work: Path, console: _Console, stages: dict[str, float]
) -> tuple[Path, dict[str, Any]]:
    from models.checkpoint import read_metadata
    from models.synth import generate_mvtec

    if settings.model is not None:
        model_dir = Path(settings.model)
        meta = read_metadata(model_dir / "model.json")
        console.step(1, 4, "training data", console.dim("skipped (--model given)"))
        console.step(
            2, 4, "model", f"{model_dir} {console.dot} threshold {float(meta['threshold']):.4f}"
        )
        stages["data"] = stages["train"] = 0.0
        return model_dir, _model_info(model_dir, meta)

    t0 = time.monotonic()
    data = generate_mvtec(
        work / "data",
        category="flange",
        n_train=settings.train_images,
        n_test_good=0,
        n_test_defect_per_type=0,
        size=(settings.size, settings.size),
        seed=settings.seed,
        overwrite=True,
    )
    stages["data"] = time.monotonic() - t0
    console.step(
        1,
        4,
        "training data",
        f"{settings.train_images} normal flanges, {settings.size}x{settings.size}, "
        f"no defects shown to the model  {console.dim(_fmt_s(stages['data']))}",
    )

    from models.train import TrainConfig, train

    t0 = time.monotonic()
    console.step(
        2,
        4,
        "model",
        f"training EfficientAD-S, {settings.train_steps} steps at lr {settings.train_lr:g} "
        f"(a short schedule; the paper trains 70 000 steps) ...",
    )
    model_dir = train(
        TrainConfig(
            data=data,
            out=work / "model",
            model_size="s",
            steps=settings.train_steps,
            teacher="auto",
            seed=settings.seed,
            lr=settings.train_lr,
            image_size=(settings.size, settings.size),
            validation_fraction=0.25,  # more normal images to calibrate maps and threshold on
            progress=console.tty,
            name="demo-flange",
        )
    )
    stages["train"] = time.monotonic() - t0
    meta = read_metadata(model_dir / "model.json")
    info = _model_info(model_dir, meta)
    if not settings.keep:
        info["path"] = None  # in a temporary folder that is gone after the run (see --keep)
    console.line(
        f"      {'':<14} trained in {_fmt_s(stages['train'])} {console.dot} teacher "
        f"{info['teacher']} {console.dot} threshold {info['threshold']:.4f} "
        f"({info['threshold_method']})"
    )
    return model_dir, info


def _model_info(model_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    teacher = meta.get("teacher") or {}
    training = meta.get("training") or {}
    return {
        "path": str(model_dir),
        "name": meta.get("name"),
        "version": meta.get("version"),
        "sha256": meta.get("weights_sha256"),
        "threshold": float(meta["threshold"]),
        "threshold_method": str(meta.get("threshold_method", "")).split("(")[0],
        "teacher": teacher.get("source", "?"),
        "train_steps": training.get("steps"),
        "train_seconds": training.get("seconds"),
    }


def _stream(
    settings: DemoSettings,
    console: _Console,
    frames_dir: Path,
    model_dir: Path,
    fps: float,
    episodes: list[Any],
    rendered: int,
    alarm_dir: Path,
    work: Path,
    stages: dict[str, float],
) -> DemoSummary:
    from pipeline.acl import random_password
    from pipeline.redis_conn import EmbeddedRedis, connect
    from pipeline.supervisor import run_line

    t0 = time.monotonic()
    with EmbeddedRedis(password=random_password()) as server:
        config = _line_config(settings, server.url, frames_dir, model_dir, fps)
        if settings.keep:
            _write_line_yaml(work / "line.yaml", config)
        client = connect(config.redis, client_name="efficientad-demo")
        version = client.info("server").get("redis_version", "?")
        arrow = console.arrow
        console.step(
            4,
            4,
            "streaming",
            f"embedded Redis {version} {console.dot} capture {arrow} "
            f"{settings.workers} workers (batch <= {settings.batch_size}) {arrow} publisher",
        )
        console.line()
        console.line(
            console.dim(
                "      time  captured  scored    fps   latency  scores (one char per frame, "
                "height = score, red = over threshold)"
            )
        )
        watcher = _StreamWatcher(client, config.keys, CAMERA_ID, alarm_dir)
        stop = threading.Event()
        outcome: dict[str, Any] = {}

        def line_thread() -> None:
            try:
                outcome["code"] = run_line(
                    config,
                    workers=settings.workers,
                    until_drained=True,
                    stop_event=stop,
                    install_signals=False,
                )
            except BaseException as exc:  # reported in the main thread
                outcome["error"] = exc

        runner = threading.Thread(target=line_thread, name="demo-line", daemon=True)
        runner.start()
        pending: list[ResultMessage] = []
        last_print = time.monotonic()
        interrupted = False
        try:
            while runner.is_alive():
                runner.join(0.5)
                new_results, new_alarms = watcher.poll()
                pending.extend(new_results)
                for event in new_alarms:
                    _print_alarm(console, event, t0, watcher.alarm_files.get(event.alarm_id, []))
                now = time.monotonic()
                if now - last_print >= settings.status_every_s and pending:
                    _print_status(console, watcher, pending, t0, now - last_print)
                    pending = []
                    last_print = now
        except KeyboardInterrupt:
            interrupted = True
            console.line(console.yellow("  interrupted: stopping the line ..."))
            stop.set()
            runner.join()
        new_results, new_alarms = watcher.poll()
        pending.extend(new_results)
        for event in new_alarms:
            _print_alarm(console, event, t0, watcher.alarm_files.get(event.alarm_id, []))
        if pending:
            _print_status(console, watcher, pending, t0, time.monotonic() - last_print)
        stages["stream"] = time.monotonic() - t0
        summary = score_run(
            episodes=episodes,
            frames_rendered=rendered,
            frames_captured=watcher.captured(),
            results=watcher.results,
            alarms=watcher.alarms,
            dead_letters=watcher.dead_letters(),
            alarm_files=watcher.alarm_files,
        )
        client.close()
    if "error" in outcome:
        raise outcome["error"]
    code = outcome.get("code", 1)
    if interrupted:
        summary.problems.append("interrupted")
    if code != 0:
        summary.problems.append(f"the line exited with code {code} (see the log above)")
    if summary.problems:
        summary.ok = False
        summary.exit_code = 130 if interrupted else 1
    return summary


def _print_status(
    console: _Console,
    watcher: _StreamWatcher,
    batch: list[ResultMessage],
    t0: float,
    interval_s: float,
) -> None:
    """One line: frames so far, scoring rate over the interval, median latency, score strip."""
    batch = sorted(batch, key=lambda r: r.seq)
    seen = len({r.frame_id for r in watcher.results})
    fps = len(batch) / interval_s if interval_s > 0 else 0.0
    latency = [(r.done_ns - r.ts_ns) / 1e6 for r in batch if r.done_ns]
    p50 = float(np.median(latency)) if latency else None
    console.line(
        f"  {time.monotonic() - t0:7.1f}s  {watcher.captured():8d}  {seen:6d}  {fps:5.1f}  "
        f"{_fmt_ms(p50):>8}  {console.scores(batch)}"
    )


def _print_alarm(console: _Console, event: AlarmRecord, t0: float, files: list[str]) -> None:
    kind = event.type.removeprefix("alarm.")
    elapsed = f"{time.monotonic() - t0:7.1f}s"
    if kind == "started":
        worst = event.regions[0] if event.regions else None
        where = (
            f" {console.dot} defect at x={worst.x} y={worst.y} ({worst.w}x{worst.h} px)"
            if worst is not None
            else ""
        )
        overlay = next((f for f in files if f.endswith("-started-overlay.jpg")), None)
        console.line(
            console.red(f"  {elapsed}  ALARM   {event.alarm_id}")
            + f"  frame {event.seq} {console.dot} score {event.score_norm:.2f}{where}"
            + (f"\n            {console.dim('overlay ' + overlay)}" if overlay else "")
        )
    elif kind == "ended":
        console.line(
            console.green(f"  {elapsed}  CLEARED {event.alarm_id}")
            + f"  after {event.frame_count} frames ({event.anomalous_count} anomalous) "
            f"{console.dot} peak {event.peak_score_norm:.2f} {console.dot} "
            f"{event.duration_s:.1f} s"
        )


def _print_summary(console: _Console, summary: DemoSummary, out: Path) -> None:
    dot = console.dot
    lat = summary.latency_ms
    console.line()
    console.line(console.bold("Summary"))
    frames = (
        f"{summary.frames_captured} captured {dot} {summary.frames_scored} scored {dot} "
        f"{summary.frames_dead_lettered} dead-lettered {dot} {summary.frames_lost} lost"
    )
    if summary.duplicate_results:
        frames += f" {dot} {summary.duplicate_results} duplicate results"
    console.line(f"  frames       {frames}")
    console.line(
        f"  throughput   {summary.throughput_fps:.2f} frames/s scored "
        f"(camera {summary.camera_fps:.2f} fps)"
    )
    res, alm = lat["capture_to_result"], lat["capture_to_alarm"]
    console.line(
        f"  latency      capture {console.arrow} result  p50 {_fmt_ms(res['p50'])}  "
        f"p99 {_fmt_ms(res['p99'])}"
    )
    console.line(
        f"               capture {console.arrow} alarm   p50 {_fmt_ms(alm['p50'])}  "
        f"p99 {_fmt_ms(alm['p99'])}"
    )
    det = f"{summary.episodes_detected}/{summary.episodes_injected}"
    det = (
        console.green(det)
        if summary.episodes_detected == summary.episodes_injected
        else (console.red(det))
    )
    fa = str(summary.false_alarms)
    fa = console.green(fa) if summary.false_alarms == 0 else console.red(fa)
    console.line(f"  episodes     {det} detected {dot} {fa} false alarms")
    for ep in summary.episodes:
        if ep.detected:
            state = f"alarm {', '.join(ep.alarm_ids)}  +{ep.delay_frames} frames" + (
                f" ({ep.delay_s:.1f} s)" if ep.delay_s is not None else ""
            )
        else:
            state = console.red("MISSED")
        peak = "-" if ep.peak_score_norm is None else f"{ep.peak_score_norm:.2f}"
        console.line(
            f"    #{ep.index}  frames {ep.start:>4}-{ep.end - 1:<4} {ep.defect:<8} "
            f"{ep.anomalous_frames:>2}/{ep.end - ep.start} frames over threshold, peak {peak}  "
            f"{state}"
        )
    for alarm in summary.alarms:
        if alarm.episode is None:
            console.line(
                console.red(f"    false alarm {alarm.alarm_id}")
                + f"  frames {alarm.first_frame}-{alarm.last_frame}, peak "
                f"{alarm.peak_score_norm:.2f}"
            )
    console.line(
        f"  frames over  {summary.anomalous_frames_in_episodes}/{summary.defective_frames} "
        f"defective {dot} {summary.anomalous_frames_outside}/{summary.normal_frames} normal"
    )
    n_files = len(summary.files)
    console.line(f"  output       {out}/alarms ({n_files} files: masks, overlays, events)")
    console.line(f"               {out}/summary.json")
    stages = " ".join(f"{k} {_fmt_s(v)}" for k, v in summary.stages_s.items())
    console.line(f"  wall time    {_fmt_s(summary.wall_s)}  {console.dim('(' + stages + ')')}")
    if summary.ok:
        console.line(console.green("OK") + "  every frame scored exactly once")
    else:
        console.line(console.red("FAILED") + "  " + "; ".join(summary.problems))
