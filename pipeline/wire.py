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
import re
import struct
import time
import zlib
from collections.abc import Collection
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from typing_extensions import Self

SCHEMA_VERSION = 1

FieldMap = dict[str, bytes | str | int | float]
FRAME_ENCODINGS = ("jpeg", "png", "raw")
ALARM_EVENT_TYPES = ("alarm.started", "alarm.updated", "alarm.ended")

#: default pixel limit of a frame (or result PNG): the header is checked before any decoder runs
MAX_FRAME_PIXELS = 40_000_000
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_MAX_CHUNKS = 100_000  # OpenCV/libpng write 8 kB IDATs: 800 MB; junk chunks cost CPU


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


class ImageTooLargeError(WireError):
    """An image whose header declares more pixels than allowed (dead-lettered as ``oversize``)."""


def _short(value: object, limit: int = 80) -> str:
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>" if len(value) > limit else repr(bytes(value))
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def encode_image(img_bgr: np.ndarray, enc: str, quality: int = 90) -> bytes:
    """Encode a BGR (or grey) uint8 image for ``FrameMessage.data``."""
    if img_bgr.dtype != np.uint8 or img_bgr.ndim not in (2, 3):
        raise WireError(
            "data", img_bgr.dtype, f"need uint8 HxW or HxWxC, got shape {img_bgr.shape}"
        )
    if enc == "raw":
        return np.ascontiguousarray(img_bgr).tobytes()
    if enc == "jpeg":
        ok, buf = cv2.imencode(".jpg", img_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif enc == "png":
        ok, buf = cv2.imencode(".png", img_bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        raise WireError("enc", enc, f"unknown encoding, expected one of {FRAME_ENCODINGS}")
    if not ok:
        raise WireError("data", enc, "OpenCV could not encode the image")
    return buf.tobytes()


def image_header(data: bytes, enc: str = "png") -> tuple[int, int, int]:
    """(width, height, channels) from a PNG IHDR or JPEG SOFn header, without decoding.

    Reads a few dozen bytes, so a 600-byte file that declares gigapixels is caught before a
    decoder allocates for it. Raises ``WireError`` when the bytes do not start like ``enc``
    (field ``enc`` when they are the other known format, ``data`` otherwise) or the header is
    cut short or invalid.
    """
    if enc not in ("jpeg", "png"):
        raise WireError("enc", enc, "only jpeg and png have an image header")
    magic = JPEG_MAGIC if enc == "jpeg" else PNG_MAGIC
    if not data.startswith(magic):
        other = "png" if enc == "jpeg" else "jpeg"
        if data.startswith(PNG_MAGIC if other == "png" else JPEG_MAGIC):
            raise WireError("enc", enc, f"data is a {other} image, not {enc}")
        raise WireError("data", data, f"not a decodable {enc} image: no {enc} signature")
    return _png_header(data) if enc == "png" else _jpeg_header(data)


def _png_header(data: bytes) -> tuple[int, int, int]:
    # signature, then the IHDR chunk: length 13, "IHDR", w, h, depth, colour type, ..., CRC
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise WireError("data", data, "not a decodable png image: no IHDR chunk")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        raise WireError("data", data, "not a decodable png image: IHDR checksum mismatch")
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour)
    if channels is None or depth not in (1, 2, 4, 8, 16) or width == 0 or height == 0:
        raise WireError("data", data, "not a decodable png image: invalid IHDR")
    _png_chunks_fit(data)
    return width, height, channels


def _png_chunks_fit(data: bytes) -> None:
    """Every chunk must fit in the buffer: OpenCV allocates a chunk's declared length up front,
    so one flipped length byte in a 500-byte PNG cost 3.6 GB and 3 s before this check."""
    pos, count = 8, 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if length > len(data) - pos - 12:
            kind = data[pos + 4 : pos + 8]
            left = len(data) - pos - 12
            raise WireError(
                "data",
                data,
                f"not a decodable png image: chunk {kind!r} of {length} bytes, {left} left",
            )
        if data[pos + 4 : pos + 8] == b"IEND":
            return
        count += 1
        if count > PNG_MAX_CHUNKS:
            raise WireError(
                "data", data, f"not a decodable png image: over {PNG_MAX_CHUNKS} chunks"
            )
        pos += 12 + length
    raise WireError("data", data, "not a decodable png image: cut short (no IEND chunk)")


# SOF0..SOF15 without DHT (C4), JPG (C8) and DAC (CC): the frame header with the image size
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_MARKER = re.compile(rb"\xff+(.)", re.DOTALL)  # fill bytes (0xFF...), then the marker code
JPEG_MAX_MARKERS = 1000  # before the frame header; real files have a dozen (APPn, DQT, COM)


def _jpeg_header(data: bytes) -> tuple[int, int, int]:
    pos = 2
    for _ in range(JPEG_MAX_MARKERS):
        pos = data.find(b"\xff", pos)  # stray bytes before a marker are skipped, as libjpeg does
        found = _JPEG_MARKER.match(data, pos) if pos >= 0 else None
        if found is None:
            break
        marker, pos = found.group(1)[0], found.end()
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length field
            continue
        if marker in (0xD9, 0xDA) or pos + 2 > len(data):  # image/scan before a frame header
            break
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if marker in _JPEG_SOF:
            if length < 8 or pos + 8 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            if width == 0 or height == 0:
                raise WireError("data", data, "not a decodable jpeg image: zero size in SOF")
            return width, height, data[pos + 7]
        if length < 2:
            break
        pos += length
    else:
        raise WireError(
            "data", data, f"not a decodable jpeg image: over {JPEG_MAX_MARKERS} markers"
        )
    raise WireError("data", data, "not a decodable jpeg image: no frame header (SOF)")


def check_frame(msg: FrameMessage, *, max_pixels: int = MAX_FRAME_PIXELS) -> tuple[int, int]:
    """Check a frame without decoding it: magic bytes, header size == declared w/h, pixel limit.

    Returns (width, height). Raises ``ImageTooLargeError`` above ``max_pixels`` and
    ``WireError`` for anything else, so callers can dead-letter before any decoder allocates.
    """
    if msg.enc != "raw":
        width, height, _ = image_header(msg.data, msg.enc)
        if (width, height) != (msg.w, msg.h):
            said = f"{msg.enc} header says {width}x{height}"
            raise WireError("data", msg.data, f"{said}, declared {msg.w}x{msg.h}")
    if msg.w * msg.h > max_pixels:
        raise ImageTooLargeError(
            "data",
            msg.data,
            f"{msg.w}x{msg.h} = {msg.w * msg.h} pixels, limit max_frame_pixels={max_pixels}",
        )
    return msg.w, msg.h


def _imdecode(data: bytes, flags: int, enc: str, field: str = "data") -> np.ndarray:
    """cv2.imdecode that only ever raises ``WireError`` (cv2.error and MemoryError included)."""
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except Exception as exc:  # cv2.error, MemoryError, ...: the bytes are at fault, not the process
        raise WireError(field, data, f"not a decodable {enc} image: {exc}") from None
    if img is None:
        raise WireError(field, data, f"not a decodable {enc} image")
    return img


def decode_image(msg: FrameMessage, *, max_pixels: int = MAX_FRAME_PIXELS) -> np.ndarray:
    """Decode ``msg.data`` to BGR uint8 HxWx3 (grey expanded); checks the declared size.

    The header is checked first (``check_frame``), so the decoder never allocates for more than
    ``max_pixels``; every decoder failure is a ``WireError``. EXIF orientation is ignored, as by
    the CUDA decoder, so the decoded size is always the header's.
    """
    check_frame(msg, max_pixels=max_pixels)
    if msg.enc == "raw":
        arr = np.frombuffer(msg.data, dtype=np.uint8)
        if arr.size != msg.w * msg.h * msg.c:
            raise WireError("data", msg.data, "raw frame size does not match w*h*c")
        img = arr.reshape(msg.h, msg.w, msg.c)
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if msg.c == 1 else img.copy()
    img = _imdecode(msg.data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION, msg.enc)
    if img.ndim != 3 or img.shape[0] != msg.h or img.shape[1] != msg.w or img.shape[2] != 3:
        raise WireError(
            "data", msg.data, f"decoded {img.shape[1]}x{img.shape[0]}, declared {msg.w}x{msg.h}"
        )
    return img


def decode_result_png(
    data: bytes,
    expected: tuple[int, int] | None = None,
    *,
    max_pixels: int = MAX_FRAME_PIXELS,
    field: str = "mask",
) -> np.ndarray:
    """A result's mask/heatmap PNG as grey uint8 (h, w); ``expected`` = (h, w) when known.

    Bounded like frames (header first, pixel limit) because results come from the same Redis a
    hostile producer can write to; raises nothing but ``WireError`` (naming ``field``).
    """
    try:
        width, height, _ = image_header(data, "png")
    except WireError as exc:
        raise WireError(field, data, exc.reason) from None
    if expected is not None and (height, width) != tuple(expected):
        raise WireError(
            field, data, f"png is {width}x{height}, expected {expected[1]}x{expected[0]}"
        )
    if width * height > max_pixels:
        raise ImageTooLargeError(
            field, data, f"{width}x{height} = {width * height} pixels, limit {max_pixels}"
        )
    img = _imdecode(data, cv2.IMREAD_GRAYSCALE, "png", field)
    if img.ndim != 2 or img.shape != (height, width) or img.dtype != np.uint8:
        raise WireError(field, data, f"decoded {img.shape} {img.dtype}, header {width}x{height}")
    return img


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
    - ``heatmap`` 8-bit PNG of the map scaled so 128 == threshold, 255 == twice it; sent with
      ``mask``
    - ``batch`` the batch size the frame ran in; ``worker`` the consumer name that scored it
    """

    BYTES_FIELDS: ClassVar[frozenset[str]] = frozenset({"mask", "heatmap"})
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
    - ``mask`` PNG of the peak frame; ``overlay`` JPEG of the peak frame with its heatmap blended in
      and region boxes drawn; ``overlay_status`` ok | frame_trimmed | no_heatmap |
      frame_undecodable says why an overlay is missing
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
