"""The speed bench of the bare model (``efficientad bench model``): ms/image, images/s, memory.

``bench_model`` times ``InferenceEngine.predict`` (uint8 frames in, scores and maps out) for
EfficientAD-S/M at several batch sizes, each case in a fresh process so its peak RSS is its own.
Weights are random (``models.networks.neutral_model``): the cost of a convolutional network does
not depend on the weight values. The streaming pipeline's bench, which compares against this
bare model, is ``pipeline.tools.bench_pipeline``; the accuracy benchmark is ``models.accuracy``.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from models.model_card import DEFAULT_IMAGE_SIZE, image_size_problem

__all__ = [
    "BenchError",
    "ModelBenchSettings",
    "bench_model",
    "machine_info",
    "say",
    "time_model_case",
]


class BenchError(RuntimeError):
    """A bench cannot run with these settings (said in the message, with what to change)."""


def say(progress: TextIO | None, text: str) -> None:
    """A progress line (benches print JSON on stdout; progress goes to stderr or nowhere)."""
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


@dataclass
class ModelBenchSettings:
    sizes: list[str]
    batches: list[int]
    device: str = "auto"
    half: bool = False
    image_size: int = DEFAULT_IMAGE_SIZE[0]  # square frames of this side
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
        size_problem = image_size_problem(self.image_size, self.image_size)
        if size_problem is not None:
            problems.append(f"image size {self.image_size}: {size_problem}")
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
    from models.networks import neutral_model

    if threads is not None:
        torch.set_num_threads(threads)
    model = neutral_model(size)  # the full scoring path runs, values do not matter
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
            say(progress, f"EfficientAD-{size.upper()} batch {batch} ...")
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
            say(
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
