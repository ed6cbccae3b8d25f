"""The demo's scenario: its settings, the synthetic line with its defect episodes, the pace.

The line is turned steel flanges on a conveyor (``pipeline.tools.scene``) with defect episodes at
known frames. The camera is paced below the measured scoring capacity of the machine, as a real
line camera would be, so the latency shows the pipeline and not an ever-growing backlog.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.model_card import DEFAULT_IMAGE_SIZE, META_FILE, image_size_problem
from pipeline.core.stage_settings import AlarmSettings
from pipeline.tools.scene import DEFECT_TYPES, LineEpisode, plan_episodes, write_frames

__all__ = [
    "CAMERA_ID",
    "CAPACITY_LOAD",
    "DEFAULT_TRAIN_STEPS",
    "DEMO_DEFECTS",
    "DEMO_LR",
    "MAX_AUTO_FPS",
    "DemoError",
    "DemoSettings",
    "measure_capacity",
    "plan_line",
    "render_line",
]

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
    size: int = DEFAULT_IMAGE_SIZE[0]  # square frames of this side
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
        size_problem = image_size_problem(self.size, self.size)
        if size_problem is not None:
            problems.append(f"size {self.size}: {size_problem}")
        if self.model is not None and not (Path(self.model) / META_FILE).is_file():
            problems.append(f"model {str(self.model)!r} is not a model directory (no {META_FILE})")
        if problems:
            raise DemoError("; ".join(problems))


def plan_line(settings: DemoSettings, fps: float, alarm: AlarmSettings) -> list[LineEpisode]:
    """Defect episodes with room for every alarm to end and cool down before the next one;
    their types cycle through ``settings.defects`` in a seeded random order."""
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


def render_line(folder: Path, settings: DemoSettings, episodes: list[LineEpisode]) -> int:
    """The camera feed: the line's frames as PNGs in ``folder``; returns how many."""
    return write_frames(
        folder,
        settings.frames,
        episodes,
        (settings.size, settings.size),
        seed=settings.seed,
        frames_per_part=FRAMES_PER_PART,
    )


def measure_capacity(model_dir: Path, size: int, frames: int = 2) -> float:
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
