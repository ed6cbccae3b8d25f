"""The demo's console: aligned live lines (throughput, score strip, alarms) and the summary.

Colour only on a terminal and never with ``NO_COLOR``; plain ASCII where the stream cannot take
UTF-8.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from pipeline.core.wire import ResultMessage
from pipeline.stages.subscribe import AlarmRecord
from pipeline.tools.demo.scorecard import DemoSummary

__all__ = ["Console", "fmt_s", "print_alarm", "print_status", "print_summary"]


class Console:
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


def fmt_s(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)} min {rest:04.1f} s"


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def print_status(
    console: Console,
    seen: int,
    captured: int,
    batch: list[ResultMessage],
    t0: float,
    interval_s: float,
) -> None:
    """One line: frames so far, scoring rate over the interval, median latency, score strip."""
    batch = sorted(batch, key=lambda r: r.seq)
    fps = len(batch) / interval_s if interval_s > 0 else 0.0
    latency = [(r.done_ns - r.ts_ns) / 1e6 for r in batch if r.done_ns]
    p50 = float(np.median(latency)) if latency else None
    console.line(
        f"  {time.monotonic() - t0:7.1f}s  {captured:8d}  {seen:6d}  {fps:5.1f}  "
        f"{fmt_ms(p50):>8}  {console.scores(batch)}"
    )


def print_alarm(console: Console, event: AlarmRecord, t0: float, files: list[str]) -> None:
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


def print_summary(console: Console, summary: DemoSummary, out: Path) -> None:
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
        f"  latency      capture {console.arrow} result  p50 {fmt_ms(res['p50'])}  "
        f"p99 {fmt_ms(res['p99'])}"
    )
    console.line(
        f"               capture {console.arrow} alarm   p50 {fmt_ms(alm['p50'])}  "
        f"p99 {fmt_ms(alm['p99'])}"
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
    stages = " ".join(f"{k} {fmt_s(v)}" for k, v in summary.stages_s.items())
    console.line(f"  wall time    {fmt_s(summary.wall_s)}  {console.dim('(' + stages + ')')}")
    if summary.ok:
        console.line(console.green("OK") + "  every frame scored exactly once")
    else:
        console.line(console.red("FAILED") + "  " + "; ".join(summary.problems))
