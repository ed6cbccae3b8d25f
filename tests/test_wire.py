"""Wire format: key names, round trips through real Redis, and errors that name the field."""

from __future__ import annotations

import uuid

import cv2
import numpy as np
import pytest
import redis

from pipeline.wire import (
    SCHEMA_VERSION,
    AlarmEvent,
    FrameMessage,
    Region,
    ResultMessage,
    StreamKeys,
    WireError,
    deadletter_fields,
    decode_image,
    encode_image,
    original_fields,
)


def image(h: int = 40, w: int = 60) -> np.ndarray:
    """Smooth colour gradients (JPEG keeps them) with distinct channels (catches BGR/RGB swaps)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)


def frame(enc: str = "png", img: np.ndarray | None = None, **kw) -> FrameMessage:
    img = image() if img is None else img
    c = 1 if img.ndim == 2 else 3
    base = dict(cam="cam1", seq=7, ts_ns=123, enc=enc, w=img.shape[1], h=img.shape[0], c=c)
    return FrameMessage(**{**base, "data": encode_image(img, enc), **kw})


def as_redis(fields: dict) -> dict[bytes, bytes]:
    """What redis-py hands back: bytes keys, bytes values."""
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


@pytest.fixture
def client():
    r = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=10)
    try:
        r.ping()
    except redis.ConnectionError:
        pytest.skip("needs a Redis server at 127.0.0.1:6379")
    prefix = f"test-wire-{uuid.uuid4().hex[:8]}:"
    yield r, StreamKeys(prefix)
    for key in r.scan_iter(match=f"{prefix}*"):
        r.delete(key)
    r.close()


def test_keys_share_the_camera_hash_tag():
    keys = StreamKeys("t1:")
    assert keys.frames("a") == "t1:frames:{a}"
    assert keys.results("a") == "t1:results:{a}"
    assert keys.deadletter("a") == "t1:deadletter:{a}"
    assert keys.camera_alarms("a") == "t1:alarms:{a}"
    assert keys.alarms() == "t1:alarms" and keys.status() == "t1:status"
    assert keys.publisher_state("a") == "t1:publisher:{a}:state"
    assert keys.publisher_lease("a") == "t1:publisher:{a}:lease"
    assert StreamKeys().frames("x") == "frames:{x}"


@pytest.mark.parametrize("enc", ["png", "raw", "jpeg"])
def test_frame_round_trip_through_redis(client, enc):
    r, keys = client
    img = image()
    msg = frame(enc, img)
    entry_id = r.xadd(keys.frames("cam1"), msg.to_fields())
    ((got_id, fields),) = r.xrange(keys.frames("cam1"))
    assert got_id == entry_id
    back = FrameMessage.from_fields(fields)
    assert back == msg and back.v == SCHEMA_VERSION
    decoded = decode_image(back)
    assert decoded.shape == img.shape
    if enc == "jpeg":
        assert np.abs(decoded.astype(int) - img).mean() < 4
    else:
        assert np.array_equal(decoded, img)


def test_grey_frames_expand_to_bgr():
    grey = image()[..., 0]
    for enc in ("raw", "png"):
        out = decode_image(frame(enc, grey))
        assert out.shape == (40, 60, 3) and np.array_equal(out[..., 2], grey)


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({b"w": b"wide"}, "w", "valid integer"),
        ({b"enc": b"gif"}, "enc", "'jpeg', 'png' or 'raw'"),
        ({b"c": b"2"}, "c", "1 (grey) or 3"),
        ({b"v": b"99"}, "v", "unsupported schema version"),
        ({b"cam": b""}, "cam", "at least 1 character"),
        ({b"data": b"\x00" * 5}, "data", "raw frame has 5 bytes"),
    ],
)
def test_bad_frame_fields_are_named(change, field, reason):
    fields = {**as_redis(frame("raw").to_fields()), **change}
    with pytest.raises(WireError) as info:
        FrameMessage.from_fields(fields)
    assert info.value.field == field
    assert reason in str(info.value)


def test_missing_and_empty_entries():
    fields = as_redis(frame().to_fields())
    del fields[b"ts_ns"]
    with pytest.raises(WireError, match="missing") as info:
        FrameMessage.from_fields(fields)
    assert info.value.field == "ts_ns" and info.value.value is None
    with pytest.raises(WireError, match="trimmed or deleted"):
        FrameMessage.from_fields({})


def test_undecodable_and_mis_sized_images():
    with pytest.raises(WireError, match="not a decodable jpeg"):
        decode_image(frame("jpeg").model_copy(update={"data": b"\xff\xd8garbage"}))
    with pytest.raises(WireError, match="declared 61x40"):
        decode_image(frame("png").model_copy(update={"w": 61}))


def test_result_round_trip_keeps_regions_and_blobs(client):
    r, keys = client
    mask = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
    result = ResultMessage(
        cam="cam1",
        frame_id="1700000000000-3",
        seq=4,
        ts_ns=99,
        score=1.25,
        score_norm=0.7,
        anomalous=True,
        threshold=1.0,
        model="m",
        model_version="2",
        model_sha256="ef" * 32,
        map_w=8,
        map_h=8,
        regions=[Region(x=1, y=2, w=3, h=4, area=9, peak=1.25, mean=1.1)],
        mask=mask,
        heatmap=mask,
        worker="w",
    )
    r.xadd(keys.results("cam1"), result.to_fields())
    ((_, fields),) = r.xrange(keys.results("cam1"))
    assert fields[b"anomalous"] == b"1"
    assert ResultMessage.from_fields(fields) == result
    normal = result.model_copy(update={"anomalous": False, "mask": None, "heatmap": None})
    assert b"mask" not in as_redis(normal.to_fields())
    assert ResultMessage.from_fields(as_redis(normal.to_fields())) == normal
    bad = {**fields, b"regions": b"[{not json"}
    with pytest.raises(WireError, match="not JSON") as info:
        ResultMessage.from_fields(bad)
    assert info.value.field == "regions"
    bad = {**fields, b"regions": b'[{"x": -1, "y": 0, "w": 1, "h": 1, "area": 1}]'}
    with pytest.raises(WireError) as info:
        ResultMessage.from_fields(bad)
    assert info.value.field.startswith("regions.0")


def test_alarm_event_round_trip_and_summary():
    event = AlarmEvent(
        type="alarm.ended",
        alarm_id="cam1-1-0",
        cam="cam1",
        ts_ns=5,
        started_ns=1,
        ended_ns=5,
        duration_s=4e-9,
        score=0.2,
        peak_score=3.0,
        threshold=1.0,
        frame_count=3,
        frame_ids=["1-0", "2-0"],
        mask=b"png",
        overlay=b"jpg",
        overlay_status="ok",
    )
    back = AlarmEvent.from_fields(as_redis(event.to_fields()))
    assert back == event
    summary = event.summary()
    assert "mask" not in summary and summary["mask_bytes"] == 3
    assert summary["frame_ids"] == ["1-0", "2-0"]
    with pytest.raises(WireError) as info:
        AlarmEvent.from_fields(as_redis({**event.to_fields(), "type": "alarm.exploded"}))
    assert info.value.field == "type"


def test_dead_letter_keeps_the_original_entry(client):
    r, keys = client
    original = as_redis(frame().to_fields())
    original[b"reason"] = b"clashing field of the producer"
    dead = deadletter_fields(
        original,
        reason="undecodable",
        detail="bad",
        source_key=keys.frames("cam1"),
        source_id="1-0",
        consumer="w1",
        deliveries=2,
    )
    r.xadd(keys.deadletter("cam1"), dead)
    ((_, fields),) = r.xrange(keys.deadletter("cam1"))
    assert fields[b"reason"] == b"undecodable" and fields[b"deliveries"] == b"2"
    restored = original_fields(fields)
    assert restored == {k.decode(): v for k, v in original.items()}
    assert FrameMessage.from_fields(restored) == frame()
