"""Shared fixtures: one tiny trained model per session, and Redis key prefixes that clean up.

``tiny_model_dir`` trains EfficientAD-S for a couple of steps on a small synthetic MVTec category
with the shipped teacher, once per test session; tests that need a real model directory (json,
safetensors, quantiles, threshold) use it instead of training their own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379

# the synthetic category behind tiny_model_dir: 5 train images (4 train + 1 validation),
# 2 good and 1 defective test image per defect type
TINY_COUNTS = {"n_train": 5, "n_test_good": 2, "n_test_defect_per_type": 1}
TINY_STEPS = 2


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic MVTec-layout category (256x256 PNGs) shared by the whole session."""
    from pipeline.tools.scene import generate_mvtec

    root = tmp_path_factory.mktemp("tiny_data")
    return generate_mvtec(root, "flange", size=(256, 256), seed=7, **TINY_COUNTS)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibrated EfficientAD-S model directory (model.safetensors + model.json).

    Trained for a few steps only: its detections are meaningless, but every file and field a real
    model has is there. Treat it as read-only (copy it before changing anything).
    """
    from pipeline.tools.tiny_model import train_tiny_model

    out = tmp_path_factory.mktemp("tiny_model") / "tiny-s"
    return train_tiny_model(
        tiny_dataset,
        out,
        steps=TINY_STEPS,
        teacher="shipped",
        seed=42,
        device="cpu",
        validation_fraction=0.1,  # TrainConfig's default: 4 training images + 1 validation
    )


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    """A client of the Redis server at 127.0.0.1:6379; skips the test when none is running."""
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=10)
    try:
        client.ping()
    except redis.ConnectionError:
        client.close()
        pytest.skip(f"needs a Redis server at {REDIS_HOST}:{REDIS_PORT}")
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A unique key prefix (``test-<hex>:``); every key under it is deleted after the test."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    for key in redis_client.scan_iter(match=f"{prefix}*", count=1000):
        redis_client.delete(key)
