"""Wire format of every Redis stream the line monitor writes: key names and entry schemas.

Stream entries are flat field maps. Scalars travel as text (redis-py turns int/float into
their decimal form), binary blobs (image data, PNG masks, JPEG overlays) as raw bytes fields,
nested lists (regions, frame ids) as JSON text. Every entry carries ``v`` = ``SCHEMA_VERSION`` so
readers can refuse entries from a newer producer instead of misreading them.

Keys of one camera share the hash tag ``{cam}`` so that one MULTI/EXEC (result XADD + frame XACK,
publisher state + alarm XADD + result XACK) touches one Redis Cluster slot.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Collection
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from typing_extensions import Self

SCHEMA_VERSION = 1

FieldMap = dict[str, bytes | str | int | float]
FRAME_ENCODINGS = ("jpeg", "png", "raw")
ALARM_EVENT_TYPES = ("alarm.started", "alarm.updated", "alarm.ended")


class StreamKeys:
    """Names of all keys; ``prefix`` lets tests and tenants share one Redis."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def frames(self, cam: str) -> str:
        return f"{self.prefix}frames:{{{cam}}}"

    def results(self, cam: str) -> str:
        return f"{self.prefix}results:{{{cam}}}"

    def deadletter(self, cam: str) -> str:
        return f"{self.prefix}deadletter:{{{cam}}}"

    def alarms(self) -> str:
        return f"{self.prefix}alarms"

    def camera_alarms(self, cam: str) -> str:
        return f"{self.prefix}alarms:{{{cam}}}"

    def status(self) -> str:
        return f"{self.prefix}status"

    def publisher_state(self, cam: str) -> str:
        return f"{self.prefix}publisher:{{{cam}}}:state"

    def publisher_lease(self, cam: str) -> str:
        return f"{self.prefix}publisher:{{{cam}}}:lease"

    def capture_seq(self, cam: str) -> str:
        """The last ``seq`` capture wrote for ``cam`` (a lower bound when it restarts)."""
        return f"{self.prefix}capture:{{{cam}}}:seq"

    def worker_alive(self, consumer: str) -> str:
        """A worker's liveness key (expires when it stops renewing: its frames are reclaimed)."""
        return f"{self.prefix}worker:{consumer}:alive"


class WireError(ValueError):
    """A stream entry that cannot be read; names the offending field so it can be dead-lettered."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"field {field!r} = {_short(value)}: {reason}")


def _short(value: object, limit: int = 80) -> str:
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>" if len(value) > limit else repr(bytes(value))
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_text(value: bytes | str) -> str:
    """An entry id, key or field name as text (redis-py returns bytes with decode_responses off)."""
    return value.decode() if isinstance(value, bytes) else value


def decode_field_map(fields: dict[Any, Any]) -> dict[str, Any]:
    """Turn a redis-py entry (bytes keys) into str keys; values stay as they came."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes | bytearray) else str(key)
        out[name] = value
    return out


class WireModel(BaseModel):
    """Base of all stream entries: conversion to and from flat Redis field maps."""

    # JSON (state snapshots, logs) carries binary fields as base64; the Redis wire carries raw bytes
    model_config = ConfigDict(
        extra="ignore", frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )

    #: fields carried as raw bytes; everything else is UTF-8 text on the wire
    BYTES_FIELDS: ClassVar[frozenset[str]] = frozenset()
    #: fields carried as JSON text
    JSON_FIELDS: ClassVar[frozenset[str]] = frozenset()

    v: int = SCHEMA_VERSION

    @field_validator("v")
    @classmethod
    def _supported_version(cls, value: int) -> int:
        if value < 1 or value > SCHEMA_VERSION:
            raise ValueError(f"unsupported schema version (this reader knows 1..{SCHEMA_VERSION})")
        return value

    def to_fields(self) -> FieldMap:
        """Flat field map for XADD; ``None`` fields are left out."""
        out: FieldMap = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if name in self.JSON_FIELDS:
                out[name] = json.dumps(_jsonable(value), separators=(",", ":"))
            elif isinstance(value, bool):
                out[name] = int(value)
            elif isinstance(value, bytes | str | int | float):
                out[name] = value
            else:
                out[name] = str(value)
        return out

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> Self:
        """Parse a redis-py entry; raises ``WireError`` naming the first bad field."""
        if not fields:
            raise WireError("*", None, "entry has no fields (trimmed or deleted from the stream)")
        raw = decode_field_map(fields)
        data: dict[str, Any] = {}
        for name in cls.model_fields:
            if name not in raw:
                continue
            value = raw[name]
            if name in cls.BYTES_FIELDS:
                data[name] = bytes(value) if isinstance(value, bytes | bytearray) else value
                continue
            if isinstance(value, bytes | bytearray):
                try:
                    value = bytes(value).decode("utf-8")
                except UnicodeDecodeError:
                    raise WireError(name, value, "not UTF-8 text") from None
            if name in cls.JSON_FIELDS and isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise WireError(name, value, f"not JSON: {exc.msg}") from None
            data[name] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = err.get("loc") or ("*",)
            name = str(loc[0])
            missing = err.get("type") == "missing"
            shown = None if missing else raw.get(name, err.get("input"))
            reason = "missing" if missing else err.get("msg", "invalid")
            raise WireError(".".join(str(p) for p in loc), shown, reason) from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# frames:{cam}


class FrameMessage(WireModel):
    """One captured frame in ``frames:{cam}``.

    - ``v`` schema version; ``cam`` camera id
    - ``seq`` per-camera capture sequence number (0, 1, 2, ...; frames dropped before Redis still
      consume a number, so gaps mean drops)
    - ``ts_ns`` capture time, ns since the Unix epoch
    - ``enc`` jpeg | png | raw; ``w``/``h``/``c`` pixel size and channels (1 or 3)
    - ``data`` the encoded image (raw = BGR or grey uint8, row-major, h*w*c bytes)
    """

    BYTES_FIELDS: ClassVar[frozenset[str]] = frozenset({"data"})

    cam: str = Field(min_length=1)
    seq: int = Field(ge=0)
    ts_ns: int = Field(ge=0)
    enc: Literal["jpeg", "png", "raw"]
    w: int = Field(gt=0)
    h: int = Field(gt=0)
    c: int
    data: bytes = Field(min_length=1)

    @field_validator("c")
    @classmethod
    def _grey_or_colour(cls, value: int) -> int:
        if value not in (1, 3):
            raise ValueError("channels must be 1 (grey) or 3 (BGR)")
        return value

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> FrameMessage:
        msg = super().from_fields(fields)
        if msg.enc == "raw" and len(msg.data) != msg.w * msg.h * msg.c:
            raise WireError(
                "data",
                msg.data,
                f"raw frame has {len(msg.data)} bytes, expected w*h*c = {msg.w * msg.h * msg.c}",
            )
        return msg


# --------------------------------------------------------------------------------------------
# results:{cam}


class Region(BaseModel):
    """A connected anomalous region in anomaly-map pixels (``map_w`` x ``map_h``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    w: int = Field(gt=0)
    h: int = Field(gt=0)
    area: int = Field(gt=0)  # pixels above threshold
    peak: float  # max map value inside the region (raw score units)
    mean: float  # mean map value over the region's pixels


class ResultMessage(WireModel):
    """Model output for one frame in ``results:{cam}``.

    - ``cam``; ``frame_id`` source entry id in ``frames:{cam}``; ``seq``, ``ts_ns`` from the frame
    - ``score`` raw EfficientAD score; ``score_norm`` in [0,1], 0.5 == threshold
    - ``anomalous`` 0|1; ``threshold`` the raw-score threshold applied
    - ``model``, ``model_version``, ``model_sha256`` identify the weights
    - ``t_queue_ms`` capture -> worker read; ``t_decode_ms``; ``t_infer_ms`` (the batch's
      inference); ``t_total_ms`` capture -> result written; ``done_ns`` when the result was written
    - ``frame_w``/``frame_h`` source frame size; ``map_w``/``map_h`` anomaly-map size (model input
      or frame size) that ``regions`` and ``mask`` refer to
    - ``regions`` JSON list of {x, y, w, h, area, peak, mean} (peak/mean in raw score units)
    - ``mask`` 8-bit PNG, 255 = anomalous pixel; always for anomalous frames, optional otherwise
    - ``heatmap`` 8-bit PNG of the map scaled so 128 == threshold, 255 == twice it
      (``pipeline.core.heatmap``); sent with ``mask``
    - ``overlay`` JPEG of the frame (longest side <= ``worker.overlay_max_side``) with the heat
      map blended in and the regions boxed; anomalous frames only, unless ``worker.overlays`` is
      off. Drawn by the worker while the decoded frame is in memory, so the publisher never reads
      the frame back and frame retention does not decide whether an alarm gets its picture.
    - ``batch`` the batch size the frame ran in; ``worker`` the consumer name that scored it
    """

    BYTES_FIELDS: ClassVar[frozenset[str]] = frozenset({"mask", "heatmap", "overlay"})
    JSON_FIELDS: ClassVar[frozenset[str]] = frozenset({"regions"})

    cam: str = Field(min_length=1)
    frame_id: str = Field(min_length=3)
    seq: int = Field(ge=0)
    ts_ns: int = Field(ge=0)
    score: float
    score_norm: float
    anomalous: bool
    threshold: float
    model: str
    model_version: str = ""
    model_sha256: str = ""
    t_queue_ms: float = 0.0
    t_decode_ms: float = 0.0
    t_infer_ms: float = 0.0
    t_total_ms: float = 0.0
    done_ns: int = 0
    frame_w: int = Field(default=0, ge=0)
    frame_h: int = Field(default=0, ge=0)
    map_w: int = Field(gt=0)
    map_h: int = Field(gt=0)
    regions: list[Region] = Field(default_factory=list)
    mask: bytes | None = None
    heatmap: bytes | None = None
    overlay: bytes | None = None
    batch: int = Field(default=1, ge=1)
    worker: str = ""


# --------------------------------------------------------------------------------------------
# alarms and alarms:{cam}


class AlarmEvent(WireModel):
    """An alarm-episode event in ``alarms`` and ``alarms:{cam}``.

    - ``type`` alarm.started | alarm.updated | alarm.ended; ``alarm_id`` unique per episode
    - ``cam``; ``ts_ns`` capture time of the frame that caused the event; ``emitted_ns`` write time
    - ``started_ns`` capture time of the episode's first anomalous frame; ``ended_ns`` capture time
      of the frame that cleared it (ended only); ``duration_s`` = ts_ns - started_ns in seconds
    - ``frame_id``, ``seq``, ``score``, ``score_norm`` of the triggering frame
    - ``peak_score``, ``peak_score_norm``, ``peak_frame_id``, ``peak_seq``: the worst frame so far
    - ``threshold``; ``frame_count`` frames seen in the episode, ``anomalous_count`` of them
      anomalous
    - ``frame_ids`` JSON list of the episode's anomalous frame ids (capped;
      ``frame_ids_truncated`` 1 when capped)
    - ``model``, ``model_version``, ``model_sha256`` of the peak frame's model
    - ``regions`` JSON regions of the peak frame in ``map_w`` x ``map_h`` pixels;
      ``frame_w``/``frame_h`` the source frame size
    - ``mask`` PNG of the peak frame; ``overlay`` the peak frame's overlay JPEG as its worker drew
      it (heat map blended in, region boxes); ``overlay_status`` ok | disabled
      (``publisher.overlays`` off) | no_overlay (the peak result carries none, e.g. the worker's
      ``overlays`` are off)
    - ``publisher`` the instance that emitted it
    """

    BYTES_FIELDS: ClassVar[frozenset[str]] = frozenset({"mask", "overlay"})
    JSON_FIELDS: ClassVar[frozenset[str]] = frozenset({"regions", "frame_ids"})

    type: Literal["alarm.started", "alarm.updated", "alarm.ended"]
    alarm_id: str = Field(min_length=1)
    cam: str = Field(min_length=1)
    ts_ns: int = Field(ge=0)
    emitted_ns: int = Field(default=0, ge=0)
    started_ns: int = Field(ge=0)
    ended_ns: int | None = None
    duration_s: float = Field(ge=0.0)
    frame_id: str = ""
    seq: int = Field(default=0, ge=0)
    score: float
    score_norm: float = 0.0
    peak_score: float
    peak_score_norm: float = 0.0
    peak_frame_id: str = ""
    peak_seq: int = Field(default=0, ge=0)
    threshold: float
    frame_count: int = Field(ge=0)
    anomalous_count: int = Field(default=0, ge=0)
    frame_ids: list[str] = Field(default_factory=list)
    frame_ids_truncated: bool = False
    model: str = ""
    model_version: str = ""
    model_sha256: str = ""
    regions: list[Region] = Field(default_factory=list)
    frame_w: int = Field(default=0, ge=0)
    frame_h: int = Field(default=0, ge=0)
    map_w: int = Field(default=0, ge=0)
    map_h: int = Field(default=0, ge=0)
    mask: bytes | None = None
    overlay: bytes | None = None
    overlay_status: str = ""
    publisher: str = ""

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view without the binary blobs (for logs and ``--json`` output)."""
        out = self.model_dump(mode="json", exclude={"mask", "overlay"})
        out["mask_bytes"] = len(self.mask) if self.mask else 0
        out["overlay_bytes"] = len(self.overlay) if self.overlay else 0
        return out


# --------------------------------------------------------------------------------------------
# deadletter:{cam}


DEADLETTER_META_FIELDS = (
    "reason",
    "detail",
    "source_key",
    "source_id",
    "consumer",
    "deliveries",
    "deadlettered_ns",
)
#: values longer than this are left out of dead letters (length and SHA-256 kept instead)
DEADLETTER_MAX_VALUE_BYTES = 64 * 1024
#: ... and once the kept values add up to this, every further value longer than 256 bytes
DEADLETTER_MAX_TOTAL_BYTES = 4 * DEADLETTER_MAX_VALUE_BYTES
DEADLETTER_MAX_NAME_CHARS = 256
DROPPED_BYTES_SUFFIX = ".dropped_bytes"
DROPPED_SHA256_SUFFIX = ".dropped_sha256"
_DROPPED_SUFFIXES = (DROPPED_BYTES_SUFFIX, DROPPED_SHA256_SUFFIX)
DEADLETTER_REASONS = (
    "undecodable",
    "malformed",
    "oversize",
    "poison",
    "too_old",
    "trimmed",
    "publish_failed",
    "apply_failed",
)


def deadletter_fields(
    original: dict[Any, Any] | None,
    *,
    reason: str,
    detail: str,
    source_key: str,
    source_id: str,
    consumer: str,
    deliveries: int = 0,
    drop: Collection[str] = (),
    max_value_bytes: int = DEADLETTER_MAX_VALUE_BYTES,
    max_total_bytes: int = DEADLETTER_MAX_TOTAL_BYTES,
) -> FieldMap:
    """Dead-letter entry: why it was rejected plus the original fields (large payloads left out).

    Fields: ``reason`` (one of ``DEADLETTER_REASONS``), ``detail`` human-readable text,
    ``source_key``/``source_id`` where the entry came from, ``consumer`` that rejected it,
    ``deliveries`` its delivery count, ``deadlettered_ns``; then every original field under its own
    name (one that clashes with these names is stored as ``orig.<name>``), so ``original_fields``
    gives back an entry that can be XADDed to ``frames:{cam}`` again.

    Dead letters are kept far longer than frames, so a value longer than ``max_value_bytes``
    (an oversize frame, a junk blob), one that would take the kept values past
    ``max_total_bytes`` (many mid-sized junk fields), and every field named in ``drop`` are not
    copied: in their place ``<name>.dropped_bytes`` holds the length and ``<name>.dropped_sha256``
    the SHA-256 (hex), enough to match it against a copy elsewhere. Such an entry cannot be
    replayed without the payload (``original_fields`` leaves the markers out, so a replayed frame
    is missing ``data``, not carrying a marker as its image). Field names are cut to 256
    characters. A small frame stays whole and replayable.
    """
    out: FieldMap = {
        "reason": reason,
        "detail": detail[:2000],
        "source_key": source_key,
        "source_id": source_id,
        "consumer": consumer,
        "deliveries": int(deliveries),
        "deadlettered_ns": time.time_ns(),
    }
    kept = 0
    for key, value in decode_field_map(original or {}).items():
        key = key[:DEADLETTER_MAX_NAME_CHARS]
        name = f"orig.{key}" if key in out or key.startswith("orig.") else key
        raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
        if isinstance(raw, bytes | bytearray):
            size = len(raw)
            too_many = size > 256 and kept + size > max_total_bytes
            if key in drop or size > max_value_bytes or too_many:
                out[name + DROPPED_BYTES_SUFFIX] = size
                out[name + DROPPED_SHA256_SUFFIX] = hashlib.sha256(raw).hexdigest()
                continue
            kept += size
        out[name] = value
    return out


def original_fields(deadletter_entry: dict[Any, Any]) -> dict[str, Any]:
    """The original entry carried by a dead-letter entry (for inspection or replay).

    Values that were too large to keep are absent (see ``deadletter_fields``).
    """
    out: dict[str, Any] = {}
    for key, value in decode_field_map(deadletter_entry).items():
        if key in DEADLETTER_META_FIELDS or key.endswith(_DROPPED_SUFFIXES):
            continue
        out[key.removeprefix("orig.")] = value
    return out
