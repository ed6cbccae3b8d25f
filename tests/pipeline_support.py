"""Fixtures and helpers shared by the pipeline tests (worker, publisher, capture).

``client`` and ``keys`` build on conftest's ``redis_client`` / ``redis_prefix``: a real Redis at
127.0.0.1:6379 (skipped when absent) and a key prefix whose keys are deleted after each test.
Test modules import the fixtures by name.
"""

from __future__ import annotations

import pytest
import redis

from pipeline.core.wire import StreamKeys


@pytest.fixture
def client(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


@pytest.fixture
def keys(redis_prefix: str) -> StreamKeys:
    return StreamKeys(redis_prefix)


def pending(client: redis.Redis, key: str, group: str) -> int:
    """Entries of ``group`` delivered but not acked on stream ``key`` (0 when no group yet)."""
    try:
        return int(client.xpending(key, group)["pending"])
    except redis.ResponseError:
        return 0
