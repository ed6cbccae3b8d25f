"""What the publisher holds per camera, and how it is stored in and read back from Redis.

The state of a camera (alarm machine, high-water mark, applied seqs) is committed with every
batch of applied results (``state_snapshot``, written by the service in the same MULTI/EXEC as
the events and acks) and read back by whichever publisher takes the camera over
(``load_state``). A stored state that cannot be read is moved aside with a
``publisher.state_reset`` notice instead of crash-looping the publisher.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.lock import Lock

from pipeline.core.stage_settings import AlarmSettings
from pipeline.core.status import StatusEvent
from pipeline.core.wire import AlarmEvent, ResultMessage, StreamKeys
from pipeline.stages.alarms import AlarmStateMachine, IgnoreMask

__all__ = [
    "EVENT_TYPES",
    "STREAM_ID_ZERO",
    "Buffered",
    "CameraState",
    "PublisherStats",
    "SeqRanges",
    "format_stream_id",
    "load_state",
    "parse_stream_id",
    "publisher_notice",
    "state_snapshot",
]

log = logging.getLogger(__name__)

EVENT_TYPES = ("alarm.started", "alarm.updated", "alarm.ended")
STREAM_ID_ZERO = (0, 0)


def parse_stream_id(value: bytes | str) -> tuple[int, int]:
    """``b"<ms>-<seq>"`` as a comparable tuple (capture order of frame entries)."""
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_stream_id(value: tuple[int, int]) -> str:
    return f"{value[0]}-{value[1]}"


class SeqRanges:
    """Applied ``seq`` numbers as sorted disjoint ``[lo, hi]`` ranges (tiny when seqs run on)."""

    def __init__(self, ranges: Sequence[Sequence[int]] = ()) -> None:
        self.ranges: list[list[int]] = sorted([int(lo), int(hi)] for lo, hi in ranges)

    def __contains__(self, seq: int) -> bool:
        return any(lo <= seq <= hi for lo, hi in reversed(self.ranges))

    def add(self, seq: int) -> None:
        ranges = self.ranges
        if ranges and ranges[-1][1] + 1 == seq:  # the common case: the next seq
            ranges[-1][1] = seq
            return
        if seq in self:
            return
        ranges.append([seq, seq])
        ranges.sort()
        merged: list[list[int]] = [ranges[0]]
        for lo, hi in ranges[1:]:
            if lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.ranges = merged

    def forget_below(self, seq: int) -> None:
        """Bound the memory: drop what lies entirely below ``seq``."""
        self.ranges = [[max(lo, seq), hi] for lo, hi in self.ranges if hi >= seq]


@dataclass
class Buffered:
    """A result held until no older frame can still bring one (capture order)."""

    entry_id: str  # id in results:{cam}
    result: ResultMessage
    frame_key: tuple[int, int]
    arrived: float  # monotonic
    attempts: int = 0  # failed applications


@dataclass
class CameraState:
    """Everything a publisher holds for one camera while it owns the lease."""

    cam: str
    lease: Lock
    token: bytes
    machine: AlarmStateMachine
    hwm: tuple[int, int] = STREAM_ID_ZERO  # newest frame id applied (or given up on)
    hwm_seq: int = -1
    applied: SeqRanges = field(default_factory=SeqRanges)
    buffer: dict[tuple[int, int], Buffered] = field(default_factory=dict)
    to_ack: list[str] = field(default_factory=list)  # result entries consumed, not yet committed
    events: list[AlarmEvent] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    notices: list[StatusEvent] = field(default_factory=list)  # status events to commit
    # frames above hwm that a worker still holds (sorted; checked before each read);
    # None = unknown, re-check before applying anything that is not provably next
    outstanding: list[tuple[int, int]] | None = None
    outstanding_complete: bool = True  # the list holds every such frame
    drained: bool = False  # the last read returned everything the results stream had
    renewed: float = 0.0


@dataclass
class PublisherStats:
    """Counters of one ``run`` (tests and the exit log line)."""

    events: dict[str, int] = field(default_factory=lambda: {t: 0 for t in EVENT_TYPES})
    results: int = 0
    duplicates: int = 0
    late: int = 0
    gaps_given_up: int = 0
    apply_failures: int = 0
    max_hold_s: float = 0.0
    acquired: int = 0
    lost: int = 0


def publisher_notice(
    publisher: str, event: str, cam: str, reason: str, detail: dict[str, Any]
) -> StatusEvent:
    """A ``publisher.*`` status event (late result, gap given up, state reset, ...)."""
    return StatusEvent(
        event=event,  # type: ignore[arg-type]
        source="publisher",
        cam=cam,
        reason=reason,
        detail={"publisher": publisher, **detail},
    )


def state_snapshot(state: CameraState, owner: str) -> dict[str, Any]:
    """The ``publisher:{cam}:state`` hash for ``state`` (machine, high-water mark, seqs)."""
    return {
        "machine": json.dumps(state.machine.to_dict(), separators=(",", ":")),
        "hwm_id": format_stream_id(state.hwm),
        "hwm_seq": state.hwm_seq,
        "applied": json.dumps(state.applied.ranges, separators=(",", ":")),
        "owner": owner,
        "updated_ns": time.time_ns(),
    }


def load_state(
    client: redis.Redis,
    keys: StreamKeys,
    cam: str,
    alarm_settings: AlarmSettings,
    ignore_mask: IgnoreMask | None,
    *,
    lease: Lock,
    token: bytes,
    publisher: str,
) -> CameraState:
    """The stored state of ``cam``, or a fresh one when there is none (or it is unreadable)."""
    key = keys.publisher_state(cam)
    stored = client.hgetall(key)
    state = CameraState(
        cam=cam,
        lease=lease,
        token=token,
        machine=AlarmStateMachine(cam, alarm_settings, ignore_mask),
    )
    try:
        if stored.get(b"machine"):
            state.machine = AlarmStateMachine.from_dict(
                json.loads(stored[b"machine"]), alarm_settings, ignore_mask
            )
        if stored.get(b"hwm_id"):
            state.hwm = parse_stream_id(stored[b"hwm_id"])
            state.hwm_seq = int(stored.get(b"hwm_seq", b"-1"))
        if stored.get(b"applied"):
            state.applied = SeqRanges(json.loads(stored[b"applied"]))
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        _quarantine(client, state, key, stored, exc, alarm_settings, ignore_mask, publisher)
    state.renewed = time.monotonic()
    return state


def _quarantine(
    client: redis.Redis,
    state: CameraState,
    key: str,
    stored: dict[bytes, bytes],
    exc: Exception,
    alarm_settings: AlarmSettings,
    ignore_mask: IgnoreMask | None,
    publisher: str,
) -> None:
    """An unreadable stored state must not crash-loop the camera: set it aside, say so loudly,
    and go on from a fresh machine (keeping the high-water mark if it is readable, so old
    results are not applied a second time)."""
    aside = f"{key}:corrupt:{time.time_ns()}"
    log.error(
        "stored publisher state is unreadable; moved aside, starting a fresh alarm machine",
        extra={"camera": state.cam, "error": str(exc), "moved_to": aside},
    )
    client.rename(key, aside)
    state.machine = AlarmStateMachine(state.cam, alarm_settings, ignore_mask)
    state.applied = SeqRanges()
    try:
        state.hwm = parse_stream_id(stored.get(b"hwm_id", b"0-0"))
        state.hwm_seq = int(stored.get(b"hwm_seq", b"-1"))
    except ValueError:
        state.hwm, state.hwm_seq = STREAM_ID_ZERO, -1
    state.notices.append(
        publisher_notice(
            publisher, "publisher.state_reset", state.cam, str(exc)[:500], {"moved_to": aside}
        )
    )
