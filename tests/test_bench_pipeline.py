"""``efficientad bench pipeline``: real processes, real Redis, real frames."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from pipeline.core.wire import ResultMessage
from pipeline.tools.bench_pipeline import (
    BenchError,
    PipelineBenchSettings,
    bench_pipeline,
    pipeline_phase_stats,
)
from tests.conftest import REDIS_HOST, REDIS_PORT


def _result(
    seq: int,
    *,
    ts_s: float,
    queue_ms: float,
    total_ms: float,
    batch: int = 2,
    frame_id: str | None = None,
) -> ResultMessage:
    ts_ns = int(ts_s * 1e9)
    return ResultMessage(
        cam="bench",
        frame_id=frame_id or f"{1000 + seq}-0",
        seq=seq,
        ts_ns=ts_ns,
        score=0.1,
        score_norm=0.2,
        anomalous=False,
        threshold=0.5,
        model="m",
        t_queue_ms=queue_ms,
        t_decode_ms=1.0,
        t_infer_ms=50.0,
        t_total_ms=total_ms,
        done_ns=ts_ns + int(total_ms * 1e6),
        map_w=256,
        map_h=256,
        batch=batch,
    )


def test_phase_stats_excludes_the_warm_up_batch_and_counts_losses() -> None:
    # four frames captured at t=0; two batches of two published at t=1.0 and t=1.5
    rows = [
        _result(0, ts_s=0.0, queue_ms=100, total_ms=1000),
        _result(1, ts_s=0.0, queue_ms=100, total_ms=1000),
        _result(2, ts_s=0.0, queue_ms=1000, total_ms=1500),
        _result(3, ts_s=0.0, queue_ms=1000, total_ms=1500),
    ]
    stats = pipeline_phase_stats(rows, captured=4, dead_letters=0, expected=4)
    assert stats["frames_lost"] == 0 and stats["duplicates"] == 0
    assert stats["steady_frames"] == 2
    assert stats["images_per_s"] == pytest.approx(2 / 0.5, abs=1e-3)
    assert stats["images_per_s_incl_warmup"] == pytest.approx(4 / 1.4, abs=1e-3)
    assert stats["latency_ms"]["p50"] == pytest.approx(1250)
    assert stats["mean_batch"] == 2

    duplicate = _result(1, ts_s=0.0, queue_ms=100, total_ms=1000)
    lossy = pipeline_phase_stats([*rows[:2], duplicate], captured=4, dead_letters=1, expected=5)
    assert lossy["duplicates"] == 1
    assert lossy["frames_scored"] == 2
    assert lossy["frames_lost"] == 1 + 1  # one never captured, one captured but never scored


def test_settings_are_checked() -> None:
    with pytest.raises(BenchError, match="warm-up"):
        PipelineBenchSettings(frames=4, batch_size=4).check()
    with pytest.raises(BenchError, match="latency_load"):
        PipelineBenchSettings(latency_load=1.5).check()


@pytest.mark.slow
def test_bench_pipeline_through_redis_loses_nothing(
    tiny_model_dir: Path, redis_client: redis.Redis
) -> None:
    before = set(redis_client.scan_iter(match="bench:*"))
    report = bench_pipeline(
        PipelineBenchSettings(
            model=tiny_model_dir,
            frames=6,
            batch_size=2,
            workers=1,
            latency_load=0.5,
            latency_frames=4,
            device="cpu",
            redis_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
        )
    )
    assert report["ok"] is True
    assert report["frames_lost"] == 0 and report["duplicates"] == 0
    assert report["dead_letters"] == 0
    sat, paced, bare = report["saturated"], report["paced"], report["bare"]
    assert sat["frames_captured"] == sat["frames_scored"] == sat["results"] == 6
    assert paced["frames_captured"] == paced["frames_scored"] == 4
    assert sat["images_per_s"] > 0 and bare["images_per_s"] > 0
    assert report["ratio"] == pytest.approx(sat["images_per_s"] / bare["images_per_s"], rel=1e-2)
    assert report["latency_ms"]["measured_at"] == "paced"
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert sat["mean_batch"] > 1  # a saturated worker finds full batches waiting
    assert report["settings"]["batch_size"] == 2 and bare["batches"] == 3
    json.dumps(report)  # JSON-able as a whole
    # its own keys are gone from the shared server
    assert set(redis_client.scan_iter(match="bench:*")) == before


def test_bench_cli_rejects_bad_arguments() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "efficientad.cli", "bench", "pipeline", "--frames", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "warm-up" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "efficientad.cli", "bench"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "pipeline" in proc.stdout and "model" in proc.stdout
