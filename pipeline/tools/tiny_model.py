"""One tiny-model helper: a small calibrated model quickly, for the demo, the benches and tests.

``train_tiny_model`` trains EfficientAD-S briefly on a dataset, ``tiny_model`` on synthetic
flanges it renders first: every file and field of a real model is there, the detections are only
as good as the few steps allow. ``random_model_dir`` writes an untrained model with neutral
statistics (``models.networks.neutral_model``) in a blink, for code that needs a model directory
and not a good model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from models.checkpoint import save_checkpoint
from models.model_card import DEFAULT_IMAGE_SIZE
from models.networks import neutral_model
from models.train import TrainConfig, train
from pipeline.tools.scene import generate_mvtec

__all__ = ["random_model_dir", "tiny_model", "train_tiny_model"]


def train_tiny_model(
    data: Path,
    out: Path,
    *,
    steps: int,
    seed: int,
    teacher: str = "auto",
    lr: float | None = None,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    validation_fraction: float = 0.25,
    name: str | None = None,
    device: str = "auto",
    progress: bool = False,
    quiet: bool = False,
) -> Path:
    """EfficientAD-S trained ``steps`` steps on ``data`` and calibrated; returns the model dir.

    ``validation_fraction`` defaults above the paper's 0.1: with a few dozen images the
    calibration needs the extra normal images more than training does. ``quiet`` keeps the
    library's INFO/WARNING lines ("no penalty images") out of a tool's own output.
    """
    config = TrainConfig(
        data=data,
        out=out,
        model_size="s",
        steps=steps,
        teacher=teacher,
        seed=seed,
        image_size=image_size,
        validation_fraction=validation_fraction,
        device=device,
        progress=progress,
        name=name,
    )
    if lr is not None:
        config.lr = lr
    logger = logging.getLogger("models")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        return train(config)
    finally:
        logger.setLevel(level)


def tiny_model(
    work: Path,
    *,
    steps: int = 2,
    seed: int = 7,
    n_train: int = 8,
    name: str = "tiny",
    quiet: bool = True,
) -> Path:
    """A synthetic category under ``work/data`` and a model trained on it in ``work/model``.

    With the default two steps it takes seconds: a model to time or to wire up, not to trust.
    """
    data = generate_mvtec(
        work / "data", name, n_train=n_train, n_test_good=0, n_test_defect_per_type=0, seed=seed
    )
    return train_tiny_model(data, work / "model", steps=steps, seed=seed, name=name, quiet=quiet)


def random_model_dir(
    out: Path,
    *,
    threshold: float,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    score_range: tuple[float, float] = (0.0, 1.0),
    name: str = "rand",
    seed: int = 0,
) -> Path:
    """An untrained EfficientAD-S model directory with neutral statistics, written at once.

    ``threshold`` decides what it calls anomalous: 0 flags every frame, 1e9 none.
    """
    card = {
        "name": name,
        "version": "1",
        "image_size": list(image_size),
        "threshold": threshold,
        "score_min": score_range[0],
        "score_max": score_range[1],
    }
    return save_checkpoint(neutral_model("s", seed), card, out)
