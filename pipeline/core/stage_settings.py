"""Settings of the worker and the publisher stages (sections ``worker:`` and ``publisher:``).

Plain pydantic models with ``extra="forbid"`` so a typo in the YAML is an error naming the key;
``pipeline.core.config.LineConfig`` embeds them and adds env-var overrides.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

_NAME_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def stable_consumer_name(role: str = "worker", index: int | None = None) -> str:
    """A consumer name that survives restarts: host name (+ slot index), never the pid.

    A restarted worker with the same name finds its own pending entries and finishes them. Several
    workers on one host must each get their own ``index`` (``efficientad run`` passes 0..N-1):
    two live processes with one name would both re-read the same pending entries.
    """
    host = _NAME_SAFE.sub("-", socket.gethostname()) or "host"
    return f"{role}-{host}" if index is None else f"{role}-{host}-{index}"


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WorkerSettings(_Settings):
    """How a worker reads frames, batches them, and writes results."""

    group: str = Field(default="workers", min_length=1, description="consumer group on frames")
    consumer: str | None = Field(
        default=None,
        description="consumer name; default worker-<hostname>, stable across restarts",
    )
    batch_size: int = Field(default=8, ge=1, le=1024, description="max frames per model call")
    max_wait_ms: float = Field(
        default=25.0, ge=0, description="max time a partial batch waits for more frames"
    )
    block_ms: int = Field(
        default=500,
        ge=1,
        le=4000,
        description="XREADGROUP BLOCK when idle; kept below the client's socket timeout",
    )
    read_count: int | None = Field(
        default=None, ge=1, description="entries per stream per read; default batch_size"
    )
    claim_min_idle_ms: int = Field(
        default=30_000,
        ge=100,
        description=(
            "XAUTOCLAIM entries idle longer than this even from a live (heartbeating) consumer: "
            "a hung worker; keep above the worst batch time"
        ),
    )
    claim_interval_s: float = Field(
        default=1.0, gt=0, description="how often to look for frames of dead or hung consumers"
    )
    heartbeat_ttl_ms: int = Field(
        default=3000,
        ge=200,
        description=(
            "liveness key lifetime, renewed every third of it; a consumer without one is dead "
            "and its pending frames are claimed at once"
        ),
    )
    dead_claim_min_idle_ms: int = Field(
        default=500,
        ge=0,
        description="a dead consumer's frame must be idle this long before it is claimed",
    )
    max_deliveries: int = Field(
        default=5, ge=1, description="delivery count above which a frame is dead-lettered (poison)"
    )
    max_frame_bytes: int = Field(
        default=20_000_000, ge=1, description="frames with a larger data field are dead-lettered"
    )
    max_frame_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description=(
            "frames whose image header declares more pixels are dead-lettered (oversize) before "
            "decoding: a tiny JPEG/PNG can declare gigapixels"
        ),
    )
    max_age_s: float | None = Field(
        default=None,
        gt=0,
        description="skip (and dead-letter as too_old) frames captured longer ago; None = never",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    half: bool = Field(default=False, description="fp16 inference on CUDA")
    mask_for_normal: bool = Field(
        default=False, description="also attach mask/heatmap PNGs to normal frames"
    )
    map_resolution: Literal["model", "frame"] = Field(
        default="model", description="post-process the map at model input or source frame size"
    )
    overlays: bool = Field(
        default=True,
        description="draw a heat-map overlay JPEG into the result of every anomalous frame",
    )
    overlay_quality: int = Field(default=85, ge=1, le=100, description="overlay JPEG quality")
    overlay_max_side: int = Field(
        default=1280,
        ge=64,
        description=(
            "overlays (and the decoded copy kept for them until post-processing) are shrunk to "
            "this longest side"
        ),
    )
    results_maxlen: int = Field(default=10_000, ge=1, description="approximate MAXLEN of results")
    deadletter_maxlen: int = Field(default=10_000, ge=1, description="MAXLEN of dead letters")
    create_group_from: str = Field(
        default="0",
        description="id the consumer group starts at when the worker creates it (0 = backlog too)",
    )

    def consumer_name(self, index: int | None = None) -> str:
        return self.consumer or stable_consumer_name("worker", index)


class AlarmSettings(_Settings):
    """Alarm episode rules for one camera."""

    k: int = Field(default=3, ge=1, description="anomalous frames among the last n to start")
    n: int = Field(default=5, ge=1, le=10_000, description="window of the k-of-n start rule")
    clear_after: int = Field(
        default=5, ge=1, description="consecutive normal frames that end an alarm"
    )
    cooldown_s: float = Field(
        default=2.0, ge=0, description="capture-time seconds after an end before a new start"
    )
    update_interval_s: float = Field(
        default=1.0, ge=0, description="min capture-time seconds between alarm.updated events"
    )
    ignore_mask: Path | None = Field(
        default=None,
        description="grey image, non-zero = ignore; regions fully inside it do not count",
    )
    max_frame_ids: int = Field(
        default=500, ge=1, description="cap on frame ids listed in one alarm event"
    )

    @model_validator(mode="after")
    def _k_within_n(self) -> AlarmSettings:
        if self.k > self.n:
            raise ValueError(f"k={self.k} must not exceed n={self.n}")
        return self


class PublisherSettings(_Settings):
    """How the publisher orders results, owns cameras, and emits alarms.

    ``per_camera`` entries override only the keys they name; the rest comes from ``alarm``.
    """

    group: str = Field(default="publisher", min_length=1, description="consumer group on results")
    consumer: str | None = Field(
        default=None, description="consumer name; default publisher-<hostname>"
    )
    window: int = Field(
        default=4096,
        ge=1,
        description="results held while an older frame is awaited; beyond it the gap is given up",
    )
    max_gap_wait_ms: float = Field(
        default=20_000.0,
        ge=0,
        validation_alias=AliasChoices("max_gap_wait_ms", "reorder_wait_ms"),
        description=(
            "longest wait for an older frame a worker still holds before newer results are "
            "applied without it (its result then counts as late); keep above a dead worker's "
            "reclaim time (worker heartbeat_ttl_ms + claim_interval_s + one batch)"
        ),
    )
    max_apply_attempts: int = Field(
        default=3,
        ge=1,
        description="a result whose alarm processing fails this often is dead-lettered",
    )
    lease_ttl_s: float = Field(default=5.0, gt=0.2, description="camera ownership lease")
    block_ms: int = Field(default=200, ge=1, le=4000, description="XREADGROUP BLOCK when idle")
    read_count: int = Field(default=64, ge=1, description="results per camera per read")
    alarms_maxlen: int = Field(default=100_000, ge=1, description="approximate MAXLEN of alarms")
    overlays: bool = Field(
        default=True,
        description="copy the peak frame's overlay JPEG (drawn by a worker) into events",
    )
    overlay_quality: int = Field(
        default=85,
        ge=1,
        le=100,
        description="no longer used: workers draw overlays (worker.overlay_quality); kept so "
        "existing configs load",
    )
    dedupe_memory: int = Field(
        default=100_000,
        ge=16,
        description="how far back (in seq numbers) applied seqs are remembered for de-duplication",
    )
    alarm: AlarmSettings = Field(default_factory=AlarmSettings)
    per_camera: dict[str, AlarmSettings] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _merge_camera_overrides(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("per_camera"):
            return data
        base = data.get("alarm") or {}
        base = base.model_dump() if isinstance(base, AlarmSettings) else dict(base)
        merged: dict[str, Any] = {}
        for cam, override in data["per_camera"].items():
            if isinstance(override, AlarmSettings):
                override = override.model_dump(exclude_unset=True)
            if not isinstance(override, dict):
                merged[cam] = override  # let validation name the bad value
                continue
            merged[cam] = {**base, **override}
        return {**data, "per_camera": merged}

    def consumer_name(self, index: int | None = None) -> str:
        return self.consumer or stable_consumer_name("publisher", index)

    def alarm_for(self, cam: str) -> AlarmSettings:
        return self.per_camera.get(cam, self.alarm)
