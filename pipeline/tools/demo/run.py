"""``efficientad demo``: the whole product on one box, from nothing, in a few minutes.

``run_demo`` generates a synthetic production line (``scenario``), trains a small EfficientAD-S
on its normal parts only (``pipeline.tools.tiny_model``), then streams the line through the real
pipeline: an embedded Redis, the capture, two worker processes and the alarm publisher, run by
``run_line`` exactly as ``efficientad run`` does (``pipeline.tools.line``). The console
(``console``) shows throughput, per-frame scores and alarms as they happen; alarm masks and
overlays land in the output folder; the run ends with a scorecard against the ground truth
(``scorecard``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from models.model_card import ModelCard
from pipeline.core.lifecycle import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK
from pipeline.core.redis_conn import connect
from pipeline.core.stage_settings import AlarmSettings, WorkerSettings
from pipeline.core.wire import ResultMessage, StreamKeys, WireError
from pipeline.stages.subscribe import AlarmRecord, save_event_files
from pipeline.tools.demo.console import Console, fmt_s, print_alarm, print_status, print_summary
from pipeline.tools.demo.scenario import (
    CAMERA_ID,
    CAPACITY_LOAD,
    MAX_AUTO_FPS,
    DemoError,
    DemoSettings,
    measure_capacity,
    plan_line,
    render_line,
)
from pipeline.tools.demo.scorecard import DemoSummary, score_run
from pipeline.tools.line import (
    LINE_LOGGERS,
    ReplayLine,
    embedded_redis,
    quiet_loggers,
    run_until_drained,
    write_line_yaml,
)

__all__ = ["DemoError", "DemoSettings", "DemoSummary", "run_demo"]

log = logging.getLogger(__name__)


class StreamWatcher:
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

    def status(
        self, batch: list[ResultMessage], t0: float, interval_s: float, console: Console
    ) -> None:
        """One status line for ``batch`` (results since the last line)."""
        seen = len({r.frame_id for r in self.results})
        print_status(console, seen, self.captured(), batch, t0, interval_s)


def run_demo(settings: DemoSettings, stream: TextIO | None = None) -> DemoSummary:
    """Run the demo end to end; returns the scorecard (``exit_code`` says success)."""
    settings.check()
    console = Console(stream or sys.stdout, settings.color)
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
    with work_ctx as work_name, quiet_loggers((*LINE_LOGGERS, "efficientad"), logging.ERROR):
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
            capacity = measure_capacity(model_dir, settings.size)
            fps = max(0.2, min(MAX_AUTO_FPS, CAPACITY_LOAD * capacity))
            capacity_note = (
                f"this machine scores ~{capacity:.1f} frames/s, camera paced at "
                f"{CAPACITY_LOAD:.0%} of that"
            )
        episodes = plan_line(settings, fps, alarm)
        frames_dir = work / "line"
        rendered = render_line(frames_dir, settings, episodes)
        stages["render"] = time.monotonic() - t0
        kinds = ", ".join(f"{e.defect}@{e.start}" for e in episodes) or "none"
        console.step(
            3,
            4,
            "camera feed",
            f"{rendered} frames at {fps:.1f} fps ({capacity_note}); "
            f"defects at frames {kinds}  {console.dim(fmt_s(stages['render']))}",
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
    print_summary(console, summary, out)
    return summary


def _prepare_model(
    settings: DemoSettings, work: Path, console: Console, stages: dict[str, float]
) -> tuple[Path, dict[str, Any]]:
    from pipeline.tools.scene import generate_mvtec
    from pipeline.tools.tiny_model import train_tiny_model

    if settings.model is not None:
        model_dir = Path(settings.model)
        card = ModelCard.load(model_dir)
        console.step(1, 4, "training data", console.dim("skipped (--model given)"))
        console.step(2, 4, "model", f"{model_dir} {console.dot} threshold {card.threshold:.4f}")
        stages["data"] = stages["train"] = 0.0
        return model_dir, _model_info(model_dir, card)

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
        f"no defects shown to the model  {console.dim(fmt_s(stages['data']))}",
    )
    t0 = time.monotonic()
    console.step(
        2,
        4,
        "model",
        f"training EfficientAD-S, {settings.train_steps} steps at lr {settings.train_lr:g} "
        f"(a short schedule; the paper trains 70 000 steps) ...",
    )
    model_dir = train_tiny_model(
        data,
        work / "model",
        steps=settings.train_steps,
        seed=settings.seed,
        lr=settings.train_lr,
        image_size=(settings.size, settings.size),
        progress=console.tty,
        name="demo-flange",
    )
    stages["train"] = time.monotonic() - t0
    info = _model_info(model_dir, ModelCard.load(model_dir))
    if not settings.keep:
        info["path"] = None  # in a temporary folder that is gone after the run (see --keep)
    console.line(
        f"      {'':<14} trained in {fmt_s(stages['train'])} {console.dot} teacher "
        f"{info['teacher']} {console.dot} threshold {info['threshold']:.4f} "
        f"({info['threshold_method']})"
    )
    return model_dir, info


def _model_info(model_dir: Path, card: ModelCard) -> dict[str, Any]:
    training = card.training or {}
    return {
        "path": str(model_dir),
        "name": card.name,
        "version": card.version,
        "sha256": card.weights_sha256,
        "threshold": card.threshold,
        "threshold_method": card.threshold_method.split("(")[0],
        "teacher": card.teacher.source if card.teacher else "?",
        "train_steps": training.get("steps"),
        "train_seconds": training.get("seconds"),
    }


def _stream(
    settings: DemoSettings,
    console: Console,
    frames_dir: Path,
    model_dir: Path,
    fps: float,
    episodes: list[Any],
    rendered: int,
    alarm_dir: Path,
    work: Path,
    stages: dict[str, float],
) -> DemoSummary:
    t0 = time.monotonic()
    line = ReplayLine(
        frames_dir=frames_dir,
        model_dir=model_dir,
        camera_id=CAMERA_ID,
        fps=fps,
        frames=settings.frames,
        workers=settings.workers,
        worker=WorkerSettings(batch_size=settings.batch_size, device="auto"),
    )
    with embedded_redis() as server:
        config = line.config(server.url)
        if settings.keep:
            write_line_yaml(work / "line.yaml", config)
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
        watcher = StreamWatcher(client, config.keys, CAMERA_ID, alarm_dir)
        stop = threading.Event()
        outcome: dict[str, Any] = {}

        def line_thread() -> None:
            try:
                outcome["code"] = run_until_drained(
                    config, workers=settings.workers, stop_event=stop
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
                    print_alarm(console, event, t0, watcher.alarm_files.get(event.alarm_id, []))
                now = time.monotonic()
                if now - last_print >= settings.status_every_s and pending:
                    watcher.status(pending, t0, now - last_print, console)
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
            print_alarm(console, event, t0, watcher.alarm_files.get(event.alarm_id, []))
        if pending:
            watcher.status(pending, t0, time.monotonic() - last_print, console)
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
    code = outcome.get("code", EXIT_FAILURE)
    if interrupted:
        summary.problems.append("interrupted")
    if code != EXIT_OK:
        summary.problems.append(f"the line exited with code {code} (see the log above)")
    if summary.problems:
        summary.ok = False
        summary.exit_code = EXIT_INTERRUPTED if interrupted else EXIT_FAILURE
    return summary
