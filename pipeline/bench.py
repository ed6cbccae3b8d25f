"""Benchmarks: the streaming pipeline against the bare model, and the bare model alone.

``bench_pipeline`` answers "what does Redis + capture + worker cost over just calling the
model?". It replays synthetic line frames through the real line (``run_line``: capture process,
worker processes, an embedded or given Redis) twice:

- saturated: the camera runs at full speed, so the workers always find a full batch waiting; the
  steady-state throughput (from the first published batch to the last) is the pipeline's
  capacity;
- paced: the camera runs at ``latency_load`` x that capacity, as a real camera below capacity
  would, so capture -> result latency shows the pipeline and not a queue.

Then the bare model (``InferenceEngine.predict``, same device, same batch size) scores the very
frames the capture wrote, read back from Redis, in the same process run. The ratio of the two
throughputs is the pipeline's efficiency (target >= 0.90); lost, duplicated and dead-lettered
frames must all be zero.

``bench_model`` times ``InferenceEngine.predict`` for EfficientAD-S/M at several batch sizes,
each case in a fresh process so its peak RSS is its own. Weights are random: the cost of a
convolutional network does not depend on the weight values.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import platform
import resource
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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
from pipeline.demo import percentiles, quiet_loggers
from pipeline.stage_settings import WorkerSettings
from pipeline.wire import FrameMessage, ResultMessage, StreamKeys

__all__ = [
    "TARGET_RATIO",
    "BenchError",
    "ModelBenchSettings",
    "PipelineBenchSettings",
    "bench_model",
    "bench_pipeline",
    "pipeline_phase_stats",
]

TARGET_RATIO = 0.90
BENCH_CAMERA = "bench"


class BenchError(RuntimeError):
    """The benchmark cannot run with these settings."""


def _say(progress: TextIO | None, text: str) -> None:
    if progress is not None:
        progress.write(text + "\n")
        progress.flush()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # > cpu_count: other work competed
    }
    if device != "cpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ------------------------------------------------------------------------------------------------
# bench pipeline


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
        if self.model is not None and not (Path(self.model) / "model.json").is_file():
            problems.append(f"model {str(self.model)!r} is not a model directory (no model.json)")
        if problems:
            raise BenchError("; ".join(problems))


def _tiny_model(work: Path, steps: int, seed: int) -> Path:
    """A calibrated model in seconds: weights barely trained, which timing does not care about."""
    from models.synth import generate_mvtec
    from models.train import TrainConfig, train

    data = generate_mvtec(
        work / "data", "bench", n_train=8, n_test_good=0, n_test_defect_per_type=0, seed=seed
    )
    quiet = logging.getLogger("models")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return train(
            TrainConfig(
                data=data,
                out=work / "model",
                steps=steps,
                teacher="auto",
                seed=seed,
                validation_fraction=0.25,
                progress=False,
                name="bench-tiny",
            )
        )
    finally:
        quiet.setLevel(level)


def _render_frames(folder: Path, n: int, size: int, seed: int) -> None:
    import cv2

    from models.synth import line_frames, plan_episodes

    folder.mkdir(parents=True, exist_ok=True)
    n_episodes = 2 if n >= 40 else 0  # some defective frames: their masks and PNGs cost time too
    episodes = plan_episodes(n, n_episodes, 4, 8, 8, seed) if n_episodes else []
    for index, frame, _mask, _defect in line_frames(n, episodes, (size, size), seed=seed):
        if not cv2.imwrite(str(folder / f"frame_{index:06d}.png"), frame):
            raise OSError(f"could not write a frame to {folder}")


def _phase_config(
    settings: PipelineBenchSettings,
    url: str,
    prefix: str,
    frames_dir: Path,
    model_dir: Path,
    fps: float,
    n_frames: int,
) -> LineConfig:
    return LineConfig(
        redis=RedisSettings(url=url, key_prefix=prefix),
        cameras=[
            CameraSettings(
                id=BENCH_CAMERA,
                source=str(frames_dir),
                fps=fps,
                realtime=False,
                encoding=settings.encoding,
                maxlen=max(1000, 2 * n_frames),
                frozen_after_s=None,
            )
        ],
        models={"default": model_dir},
        worker=WorkerSettings(
            batch_size=settings.batch_size,
            device=settings.device,
            half=settings.half,
            claim_min_idle_ms=600_000,  # never steal from a slow-but-alive peer mid-benchmark
        ),
        metrics=MetricsSettings(enabled=False),
        logging=LoggingSettings(level="WARNING"),
        run=RunSettings(publisher=False, stop_timeout_s=30.0, drain_timeout_s=1800.0),
    )


def _read_results(client: Any, keys: StreamKeys) -> list[ResultMessage]:
    out = []
    for _entry_id, fields in client.xrange(keys.results(BENCH_CAMERA)):
        out.append(ResultMessage.from_fields(fields))
    return out


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
    from pipeline.redis_conn import connect
    from pipeline.supervisor import run_line

    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    config = _phase_config(settings, url, prefix, frames_dir, model_dir, fps, n_frames)
    client = connect(config.redis, client_name="efficientad-bench")
    keys = config.keys
    try:
        started = time.monotonic()
        code = run_line(config, workers=settings.workers, until_drained=True, install_signals=False)
        wall = time.monotonic() - started
        if code != 0:
            raise BenchError(f"the line exited with code {code} (see the log above)")
        results = _read_results(client, keys)
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
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()


def _bare_model(
    model_dir: Path, frames: Sequence[FrameMessage], settings: PipelineBenchSettings
) -> dict[str, Any]:
    """The bare engine on the same frames at the same batch size (decode outside the timing)."""
    import cv2
    import torch

    from models.inference import InferenceEngine
    from pipeline.wire import decode_image

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
    from models.checkpoint import read_metadata
    from pipeline.acl import random_password
    from pipeline.redis_conn import EmbeddedRedis

    settings.check()
    started = time.monotonic()
    machine = machine_info(settings.device)  # before we load the machine ourselves
    noisy = ("models", "pipeline.supervisor", "pipeline.redis_conn")
    with (
        tempfile.TemporaryDirectory(prefix="efficientad-bench-") as tmp,
        quiet_loggers(noisy, logging.WARNING),
    ):
        work = Path(tmp)
        if settings.model is not None:
            model_dir = Path(settings.model)
            model_source = "given"
        else:
            _say(progress, f"training a tiny model ({settings.tiny_steps} steps, timing only) ...")
            model_dir = _tiny_model(work, settings.tiny_steps, settings.seed)
            model_source = f"tiny synthetic model ({settings.tiny_steps} training steps)"
        meta = read_metadata(model_dir / "model.json")
        model_size = int(meta["image_size"][0]), int(meta["image_size"][1])
        size = settings.size or max(model_size)
        frames_dir = work / "frames"
        _render_frames(frames_dir, settings.frames, size, settings.seed)

        server = (
            EmbeddedRedis(password=random_password()).start()
            if settings.redis_url is None
            else None
        )
        url = server.url if server is not None else str(settings.redis_url)
        try:
            _say(
                progress,
                f"saturated: {settings.frames} frames, {settings.workers} worker(s), "
                f"batch {settings.batch_size} ...",
            )
            saturated, frames = _run_phase(
                settings, url, frames_dir, model_dir, 0.0, settings.frames
            )
            _say(progress, f"  {saturated['images_per_s']} images/s")
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
                _say(progress, f"paced: {n_paced} frames at {rate:.2f} fps ...")
                paced, _ = _run_phase(settings, url, paced_dir, model_dir, rate, n_paced)
                paced["camera_fps"] = round(rate, 3)
                paced["load"] = settings.latency_load
        finally:
            if server is not None:
                server.cleanup()
        _say(
            progress, f"bare model: the same {len(frames)} frames, batch {settings.batch_size} ..."
        )
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
        "model": {"source": model_source, "name": meta.get("name"), "path": str(model_dir)},
        "saturated": saturated,
        "paced": paced,
        "bare": bare,
        "machine": machine,
        "wall_s": round(time.monotonic() - started, 1),
    }


# ------------------------------------------------------------------------------------------------
# bench model


@dataclass
class ModelBenchSettings:
    sizes: list[str]
    batches: list[int]
    device: str = "auto"
    half: bool = False
    image_size: int = 256
    threads: int | None = None
    min_seconds: float = 3.0
    min_iterations: int = 3

    def check(self) -> None:
        problems = []
        bad = [s for s in self.sizes if s not in ("s", "m")]
        if bad or not self.sizes:
            problems.append(f"model sizes must be 's' and/or 'm', got {self.sizes}")
        if not self.batches or any(b < 1 for b in self.batches):
            problems.append(f"batch sizes must be >= 1, got {self.batches}")
        if self.image_size < 256:
            problems.append(
                f"image size must be >= 256 (EfficientAD minimum), got {self.image_size}"
            )
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1, got {self.threads}")
        if problems:
            raise BenchError("; ".join(problems))


def time_model_case(
    size: str,
    batch: int,
    device: str,
    half: bool,
    image_size: int,
    threads: int | None,
    min_seconds: float,
    min_iterations: int,
) -> dict[str, Any]:
    """Time one (model size, batch) case in this process; meant for a fresh child process."""
    import torch

    from models.inference import InferenceEngine, ModelInfo
    from models.networks import EfficientAD

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = EfficientAD(size)
    with torch.no_grad():  # neutral statistics: the full scoring path runs, values do not matter
        model.mean_std.mean.zero_()
        model.mean_std.std.fill_(1.0)
        for name, value in (("qa_st", 0.0), ("qb_st", 1.0), ("qa_ae", 0.0), ("qb_ae", 1.0)):
            getattr(model.quantiles, name).fill_(value)
    info = ModelInfo(
        name=f"random-{size}",
        version="random",
        sha256="",
        image_size=(image_size, image_size),
        threshold=1.0,
        score_min=0.0,
        score_max=2.0,
    )
    engine = InferenceEngine.from_model(model, info, device=device, half=half)
    cuda = engine.device.type == "cuda"
    frames = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)
    if cuda:
        frames = frames.pin_memory()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3 if cuda else 1):
        engine.predict(frames)
    times = []
    begin = time.perf_counter()
    cpu_begin = time.process_time()
    while len(times) < min_iterations or time.perf_counter() - begin < min_seconds:
        t0 = time.perf_counter()
        engine.predict(frames)  # ends with a device -> host copy, so CUDA work is finished
        times.append(time.perf_counter() - t0)
    cpu_s = time.process_time() - cpu_begin
    total = sum(times)
    per_image = [t / batch for t in times]
    out: dict[str, Any] = {
        "model_size": size,
        "batch": batch,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "image_size": image_size,
        "iterations": len(times),
        "ms_per_image": round(1000 * total / (batch * len(times)), 3),
        "ms_per_image_p50": round(1000 * float(np.median(per_image)), 3),
        "ms_per_batch_p50": round(1000 * float(np.median(times)), 3),
        "images_per_s": round(batch * len(times) / total, 3),
        # CPU time of this process per image: unlike wall time, not inflated by other load
        "cpu_ms_per_image": round(1000 * cpu_s / (batch * len(times)), 3),
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if cuda:
        out["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name(engine.device)
    return out


def bench_model(settings: ModelBenchSettings, progress: TextIO | None = None) -> dict[str, Any]:
    """Time every (size, batch) case, each in a fresh process; returns the JSON-able report."""
    settings.check()
    started = time.monotonic()
    machine = machine_info(settings.device)  # before we load the machine ourselves
    cases = []
    context = multiprocessing.get_context("spawn")
    for size in settings.sizes:
        for batch in settings.batches:
            _say(progress, f"EfficientAD-{size.upper()} batch {batch} ...")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                case = pool.submit(
                    time_model_case,
                    size,
                    batch,
                    settings.device,
                    settings.half,
                    settings.image_size,
                    settings.threads,
                    settings.min_seconds,
                    settings.min_iterations,
                ).result()
            _say(
                progress,
                f"  {case['ms_per_image']:.1f} ms/image, {case['images_per_s']:.2f} images/s, "
                f"peak RSS {case['peak_rss_mb']:.0f} MB",
            )
            cases.append(case)
    return {
        "benchmark": "model",
        "ok": True,
        "weights": "random (inference cost does not depend on the weight values)",
        "measures": "InferenceEngine.predict: uint8 frames in, scores + anomaly maps out "
        "(normalisation, resize-free at the model size, device->host copy included)",
        "settings": asdict(settings),
        "cases": cases,
        "machine": machine,
        "wall_s": round(time.monotonic() - started, 1),
    }
