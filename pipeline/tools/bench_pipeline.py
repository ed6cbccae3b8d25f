"""``bench pipeline``: the streaming pipeline against the bare model, on the same frames.

It answers "what does Redis + capture + worker cost over just calling the model?". It replays
synthetic line frames through the real line (``pipeline.tools.line``: capture process, worker
processes, an embedded or given Redis) twice:

- saturated: the camera runs at full speed, so the workers always find a full batch waiting; the
  steady-state throughput (from the first published batch to the last) is the pipeline's
  capacity;
- paced: the camera runs at ``latency_load`` x that capacity, as a real camera below capacity
  would, so capture -> result latency shows the pipeline and not a queue.

Then the bare model (``InferenceEngine.predict``, same device, same batch size) scores the very
frames the capture wrote, read back from Redis, in the same process run. The ratio of the two
throughputs is the pipeline's efficiency (target >= 0.90); lost, duplicated and dead-lettered
frames must all be zero. The bare model alone is ``models.speed_bench`` (``bench model``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from models.model_card import META_FILE, ModelCard
from models.speed_bench import BenchError, machine_info, say
from pipeline.core.stage_settings import WorkerSettings
from pipeline.core.wire import FrameMessage, ResultMessage
from pipeline.tools.line import (
    LINE_LOGGERS,
    ReplayLine,
    embedded_redis,
    percentiles,
    quiet_loggers,
    read_results,
    run_until_drained,
)

__all__ = [
    "TARGET_RATIO",
    "BenchError",
    "PipelineBenchSettings",
    "bench_pipeline",
    "pipeline_phase_stats",
]

TARGET_RATIO = 0.90
BENCH_CAMERA = "bench"


@dataclass
class PipelineBenchSettings:
    model: Path | None = None  # None: train a tiny model on synthetic data (timing only)
    frames: int = 64
    batch_size: int = 8
    workers: int = 1
    size: int | None = None  # frame size; None = the model's input size
    encoding: str = "jpeg"
    latency_load: float = 0.5  # paced phase at this fraction of the measured throughput; 0 = skip
    latency_frames: int | None = None
    device: str = "auto"
    half: bool = False
    redis_url: str | None = None
    tiny_steps: int = 2
    seed: int = 7

    def check(self) -> None:
        problems = []
        if self.frames < 2 * self.batch_size:
            problems.append(
                f"frames ({self.frames}) must be at least 2 x batch size ({self.batch_size}): "
                "the first batch is warm-up"
            )
        if self.workers < 1:
            problems.append(f"workers must be >= 1, got {self.workers}")
        if not 0 <= self.latency_load < 1:
            problems.append(f"latency_load must be in [0, 1), got {self.latency_load}")
        if self.size is not None and self.size < 64:
            problems.append(f"size must be >= 64, got {self.size}")
        if self.model is not None and not (Path(self.model) / META_FILE).is_file():
            problems.append(f"model {str(self.model)!r} is not a model directory (no {META_FILE})")
        if problems:
            raise BenchError("; ".join(problems))


def pipeline_phase_stats(
    results: Sequence[ResultMessage], captured: int, dead_letters: int, expected: int
) -> dict[str, Any]:
    """Throughput, latency and loss of one phase from its result entries.

    Steady-state throughput counts the frames published after the first publish (the first
    batch of a fresh worker pays for lazy initialisation, exactly like the bare model's warm-up
    call) over the time from that first publish to the last one.
    """
    unique: dict[str, ResultMessage] = {}
    for r in results:
        unique.setdefault(r.frame_id, r)
    rows = list(unique.values())
    lost = max(0, expected - captured) + max(0, captured - len(rows) - dead_letters)
    stats: dict[str, Any] = {
        "frames": expected,
        "frames_captured": captured,
        "results": len(results),
        "frames_scored": len(rows),
        "duplicates": len(results) - len(rows),
        "dead_letters": dead_letters,
        "frames_lost": lost,
    }
    if not rows:
        return {**stats, "images_per_s": 0.0}
    first_done = min(r.done_ns for r in rows)
    last_done = max(r.done_ns for r in rows)
    after_first = [r for r in rows if r.done_ns > first_done]
    span = (last_done - first_done) / 1e9
    steady = len(after_first) / span if span > 0 else 0.0
    first_read = min(r.ts_ns + int(r.t_queue_ms * 1e6) for r in rows)
    overall_span = (last_done - first_read) / 1e9
    service = [r.t_total_ms - r.t_queue_ms for r in rows]
    post = [r.t_total_ms - r.t_queue_ms - r.t_decode_ms - r.t_infer_ms for r in rows]
    stats.update(
        images_per_s=round(steady, 3),
        images_per_s_incl_warmup=round(len(rows) / overall_span, 3) if overall_span > 0 else 0.0,
        steady_frames=len(after_first),
        steady_seconds=round(span, 3),
        mean_batch=round(float(np.mean([r.batch for r in rows])), 2),
        latency_ms=percentiles([r.t_total_ms for r in rows]),
        queue_ms=percentiles([r.t_queue_ms for r in rows]),
        service_ms=percentiles(service),
        breakdown_ms_p50={
            "queue": round(float(np.median([r.t_queue_ms for r in rows])), 1),
            "decode": round(float(np.median([r.t_decode_ms for r in rows])), 1),
            "infer_batch": round(float(np.median([r.t_infer_ms for r in rows])), 1),
            "postprocess_publish": round(float(np.median(post)), 1),
        },
    )
    return stats


def _run_phase(
    settings: PipelineBenchSettings,
    url: str,
    frames_dir: Path,
    model_dir: Path,
    fps: float,
    n_frames: int,
) -> tuple[dict[str, Any], list[FrameMessage]]:
    """One run of the line; returns its stats and the frames as the capture wrote them."""
    from pipeline.core.redis_conn import connect

    line = ReplayLine(
        frames_dir=frames_dir,
        model_dir=model_dir,
        camera_id=BENCH_CAMERA,
        fps=fps,
        frames=n_frames,
        encoding=settings.encoding,
        key_prefix=f"bench:{uuid.uuid4().hex[:8]}:",
        workers=settings.workers,
        worker=WorkerSettings(
            batch_size=settings.batch_size,
            device=settings.device,
            half=settings.half,
            claim_min_idle_ms=600_000,  # never steal from a slow-but-alive peer mid-benchmark
        ),
        publisher=False,
        stop_timeout_s=30.0,
        drain_timeout_s=1800.0,
    )
    config = line.config(url)
    client = connect(config.redis, client_name="efficientad-bench")
    keys = config.keys
    try:
        started = time.monotonic()
        code = run_until_drained(config, workers=settings.workers)
        wall = time.monotonic() - started
        if code != 0:
            raise BenchError(f"the line exited with code {code} (see the log above)")
        results = read_results(client, keys, BENCH_CAMERA)
        captured = int(client.xlen(keys.frames(BENCH_CAMERA)))
        dead = int(client.xlen(keys.deadletter(BENCH_CAMERA)))
        frames = [
            FrameMessage.from_fields(fields)
            for _id, fields in client.xrange(keys.frames(BENCH_CAMERA))
        ]
        stats = pipeline_phase_stats(results, captured, dead, n_frames)
        stats["wall_s"] = round(wall, 2)
        return stats, frames
    finally:
        for key in client.scan_iter(match=f"{line.key_prefix}*", count=1000):
            client.delete(key)
        client.close()


def _bare_model(
    model_dir: Path, frames: Sequence[FrameMessage], settings: PipelineBenchSettings
) -> dict[str, Any]:
    """The bare engine on the same frames at the same batch size (decode outside the timing)."""
    import cv2
    import torch

    from models.inference import InferenceEngine
    from pipeline.core.image_codec import decode_image

    engine = InferenceEngine.load(model_dir, device=settings.device, half=settings.half)
    t0 = time.perf_counter()
    images = [cv2.cvtColor(decode_image(f), cv2.COLOR_BGR2RGB) for f in frames]
    decode_s = time.perf_counter() - t0
    tensors = [torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))) for img in images]
    batches = [
        torch.stack(tensors[i : i + settings.batch_size])
        for i in range(0, len(tensors), settings.batch_size)
    ]
    engine.predict(batches[0])  # warm-up, like the pipeline's first batch
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        engine.predict(batch)  # returns numpy: includes the device -> host copy
        times.append(time.perf_counter() - t0)
    total = sum(times)
    return {
        "images_per_s": round(len(frames) / total, 3),
        "ms_per_image": round(1000 * total / len(frames), 2),
        "batches": len(batches),
        "seconds": round(total, 3),
        "decode_ms_per_image_cpu": round(1000 * decode_s / len(frames), 2),
        "device": str(engine.device),
        "torch_threads": torch.get_num_threads(),
    }


def bench_pipeline(
    settings: PipelineBenchSettings, progress: TextIO | None = None
) -> dict[str, Any]:
    """Run the pipeline benchmark; returns the JSON-able report (``ok`` = no frame lost)."""
    from pipeline.tools.scene import plan_episodes, write_frames
    from pipeline.tools.tiny_model import tiny_model

    settings.check()
    started = time.monotonic()
    machine = machine_info(settings.device)  # before we load the machine ourselves
    with (
        tempfile.TemporaryDirectory(prefix="efficientad-bench-") as tmp,
        quiet_loggers(LINE_LOGGERS, logging.WARNING),
    ):
        work = Path(tmp)
        if settings.model is not None:
            model_dir = Path(settings.model)
            model_source = "given"
        else:
            say(progress, f"training a tiny model ({settings.tiny_steps} steps, timing only) ...")
            model_dir = tiny_model(
                work, steps=settings.tiny_steps, seed=settings.seed, name="bench-tiny"
            )
            model_source = f"tiny synthetic model ({settings.tiny_steps} training steps)"
        card = ModelCard.load(model_dir)
        model_size = card.image_size
        size = settings.size or max(model_size)
        frames_dir = work / "frames"
        # some defective frames: their masks and PNGs cost time too
        n_episodes = 2 if settings.frames >= 40 else 0
        episodes = (
            plan_episodes(settings.frames, n_episodes, 4, 8, 8, settings.seed) if n_episodes else []
        )
        write_frames(frames_dir, settings.frames, episodes, (size, size), settings.seed)

        server = embedded_redis().start() if settings.redis_url is None else None
        url = server.url if server is not None else str(settings.redis_url)
        try:
            say(
                progress,
                f"saturated: {settings.frames} frames, {settings.workers} worker(s), "
                f"batch {settings.batch_size} ...",
            )
            saturated, frames = _run_phase(
                settings, url, frames_dir, model_dir, 0.0, settings.frames
            )
            say(progress, f"  {saturated['images_per_s']} images/s")
            paced = None
            if settings.latency_load > 0 and saturated["images_per_s"] > 0:
                rate = settings.latency_load * saturated["images_per_s"]
                n_paced = settings.latency_frames or max(
                    2 * settings.batch_size, min(settings.frames, int(30 * rate))
                )
                paced_dir = work / "paced"
                paced_dir.mkdir()
                for src in sorted(frames_dir.glob("*.png"))[:n_paced]:
                    os.link(src, paced_dir / src.name)
                say(progress, f"paced: {n_paced} frames at {rate:.2f} fps ...")
                paced, _ = _run_phase(settings, url, paced_dir, model_dir, rate, n_paced)
                paced["camera_fps"] = round(rate, 3)
                paced["load"] = settings.latency_load
        finally:
            if server is not None:
                server.cleanup()
        say(progress, f"bare model: the same {len(frames)} frames, batch {settings.batch_size} ...")
        bare = _bare_model(model_dir, frames, settings)

    ratio = saturated["images_per_s"] / bare["images_per_s"] if bare["images_per_s"] else 0.0
    phases = [saturated] + ([paced] if paced else [])
    lost = sum(p["frames_lost"] for p in phases)
    duplicates = sum(p["duplicates"] for p in phases)
    dead = sum(p["dead_letters"] for p in phases)
    latency_source = paced or saturated
    return {
        "benchmark": "pipeline",
        "ok": lost == 0 and duplicates == 0 and dead == 0,
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "frames_lost": lost,
        "duplicates": duplicates,
        "dead_letters": dead,
        "pipeline_images_per_s": saturated["images_per_s"],
        "bare_images_per_s": bare["images_per_s"],
        "latency_ms": {
            "p50": latency_source["latency_ms"]["p50"],
            "p99": latency_source["latency_ms"]["p99"],
            "measured_at": "paced" if paced else "saturated (includes queueing)",
        },
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
            "frame_size": [size, size],
            "model_input": list(model_size),
            "redis": "embedded" if settings.redis_url is None else "given",
        },
        "model": {"source": model_source, "name": card.name, "path": str(model_dir)},
        "saturated": saturated,
        "paced": paced,
        "bare": bare,
        "machine": machine,
        "wall_s": round(time.monotonic() - started, 1),
    }
