"""Following alarm events: a Python iterator for integrators and the ``efficientad alarms`` command.

Subscribers read ``alarms`` (all cameras) or ``alarms:{cam}`` with plain XREAD, so any number of
them can follow without coordinating, and each can resume exactly where it stopped by passing the
last ``event.stream_id`` it handled as ``start``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import redis

from pipeline.core.wire import AlarmEvent, StreamKeys, WireError, as_text

log = logging.getLogger(__name__)


class AlarmRecord(AlarmEvent):
    """An ``AlarmEvent`` as read from a stream, with the entry id to resume from."""

    stream_id: str = ""


def _last_id(client: redis.Redis, key: str) -> str:
    """The stream's current last id, so "$" becomes a concrete position (no gap between reads)."""
    try:
        info = client.xinfo_stream(key)
    except redis.ResponseError:  # no such key yet
        return "0-0"
    return as_text(info["last-generated-id"])


def follow_alarms(
    client: redis.Redis,
    keys: StreamKeys,
    cam: str | None = None,
    start: str = "$",
    block_ms: int = 1000,
    *,
    idle_timeout_s: float | None = None,
    stop: threading.Event | None = None,
    types: tuple[str, ...] | None = None,
) -> Iterator[AlarmRecord]:
    """Yield alarm events as they arrive.

    ``start``: "$" = only new events, "0" = the whole retained history, or an entry id to resume
    after. ``cam`` follows one camera's stream instead of the all-camera one. Ends when ``stop``
    is set or nothing arrived for ``idle_timeout_s``; otherwise runs forever. Entries that do not
    parse are logged and skipped, never fatal.
    """
    key = keys.camera_alarms(cam) if cam else keys.alarms()
    position = _last_id(client, key) if start == "$" else start
    last_event = time.monotonic()
    while stop is None or not stop.is_set():
        reply = client.xread({key: position}, count=100, block=block_ms)
        if not reply:
            if idle_timeout_s is not None and time.monotonic() - last_event >= idle_timeout_s:
                return
            continue
        last_event = time.monotonic()
        for entry_id, fields in reply[0][1]:
            position = as_text(entry_id)
            try:
                record = AlarmRecord.from_fields({**fields, b"stream_id": entry_id})
            except WireError as exc:
                log.warning("skipping unreadable alarm entry %s: %s", position, exc)
                continue
            if types and record.type not in types:
                continue
            yield record


# ------------------------------------------------------------------------------- CLI output


def _iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, tz=timezone.utc).isoformat(timespec="milliseconds")


def format_event(event: AlarmRecord) -> str:
    """One human-readable line per event."""
    kind = event.type.removeprefix("alarm.").upper()
    parts = [
        _iso(event.ts_ns),
        f"{kind:<7}",
        f"cam={event.cam}",
        f"alarm={event.alarm_id}",
        f"score={event.score:.3f}",
        f"peak={event.peak_score:.3f}",
        f"thr={event.threshold:.3f}",
        f"frames={event.anomalous_count}/{event.frame_count}",
    ]
    if event.type == "alarm.ended":
        parts.append(f"duration={event.duration_s:.2f}s")
    if event.regions:
        worst = event.regions[0]
        parts.append(
            f"regions={len(event.regions)} worst=[x={worst.x} y={worst.y} w={worst.w} h={worst.h}]"
        )
    parts.append(f"model={event.model}@{event.model_version or '?'}")
    return "  ".join(parts)


_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
MAX_FILE_NAME_CHARS = 80


def safe_file_name(text: str) -> str:
    """``text`` as one harmless path component: [A-Za-z0-9_.-] only, no leading dot, no "..".

    Camera and alarm ids come from a stream anyone with Redis access can write to, so they must
    not steer a file outside the save directory. A name that had to change (or be cut to
    ``MAX_FILE_NAME_CHARS``) gets a short hash of the original, so distinct ids stay distinct.
    """
    name = re.sub(r"\.{2,}", ".", _UNSAFE_CHARS.sub("_", text)).lstrip(".")
    if name == text and 0 < len(name) <= MAX_FILE_NAME_CHARS:
        return name
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{name[:MAX_FILE_NAME_CHARS]}~{digest}" if name else f"~{digest}"


def save_event_files(event: AlarmRecord, directory: Path) -> list[Path]:
    """Write mask PNG, overlay JPEG and the event JSON under ``directory/cam/alarm_id/``.

    ``cam`` and ``alarm_id`` are made safe file names (``safe_file_name``) and the result must
    resolve inside ``directory``: an event cannot write anywhere else.
    """
    folder = Path(directory) / safe_file_name(event.cam) / safe_file_name(event.alarm_id)
    root = Path(directory).resolve()
    if not folder.resolve().is_relative_to(root):  # e.g. a symlink planted in the save dir
        raise ValueError(f"refusing to save alarm files outside {root}: {folder.resolve()}")
    folder.mkdir(parents=True, exist_ok=True)
    kind = event.type.removeprefix("alarm.")
    stem = safe_file_name(f"{event.stream_id or event.ts_ns}-{kind}")
    written = []
    if event.mask:
        path = folder / f"{stem}-mask.png"
        path.write_bytes(event.mask)
        written.append(path)
    if event.overlay:
        path = folder / f"{stem}-overlay.jpg"
        path.write_bytes(event.overlay)
        written.append(path)
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(event.summary(), indent=2))
    written.append(path)
    return written


def print_alarms(
    client: redis.Redis,
    keys: StreamKeys,
    *,
    cam: str | None = None,
    start: str = "$",
    as_json: bool = False,
    save_dir: Path | None = None,
    count: int | None = None,
    idle_timeout_s: float | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """The ``efficientad alarms`` command body; returns how many events were shown."""
    shown = 0
    for event in follow_alarms(client, keys, cam, start, idle_timeout_s=idle_timeout_s):
        saved = save_event_files(event, save_dir) if save_dir is not None else []
        if as_json:
            line = event.summary()
            if saved:
                line["saved"] = [str(p) for p in saved]
            out.write(json.dumps(line, separators=(",", ":")) + "\n")
        else:
            out.write(format_event(event) + "\n")
        out.flush()
        shown += 1
        if count is not None and shown >= count:
            break
    return shown
