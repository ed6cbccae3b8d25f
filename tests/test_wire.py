"""Wire format: key names, round trips through real Redis, and errors that name the field."""

from __future__ import annotations

import contextlib
import hashlib
import struct
import time
import uuid
import zlib

import cv2
import numpy as np
import pytest
import redis

from pipeline.core.image_codec import (
    ImageTooLargeError,
    check_frame,
    decode_image,
    decode_result_png,
    encode_image,
    image_header,
)
from pipeline.core.wire import (
    DEADLETTER_MAX_VALUE_BYTES,
    SCHEMA_VERSION,
    AlarmEvent,
    FrameMessage,
    Region,
    ResultMessage,
    StreamKeys,
    WireError,
    deadletter_fields,
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


def png_bomb(w: int = 50_000, h: int = 50_000) -> bytes:
    """A valid-looking PNG of a few dozen bytes that declares w x h RGB pixels.

    IHDR carries the size; the IDAT is a short run of zlib-compressed zeros (a real bomb would be
    a long run: zeros compress ~1000:1), so any decoder that trusts the header allocates w*h*3.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_declaring(w: int = 16_000, h: int = 16_000) -> bytes:
    """A small real JPEG whose frame header (SOF0) is patched to declare w x h pixels."""
    data = bytearray(encode_image(image(16, 16), "jpeg"))
    sof = data.index(b"\xff\xc0")
    assert sof < data.index(b"\xff\xda"), "SOF0 must come before the scan"
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


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


# ------------------------------------------------------------------------- hostile images


def no_decoder(monkeypatch) -> list[int]:
    """Make cv2.imdecode fail the test if called; returns the sizes it was called with."""
    calls: list[int] = []

    def refuse(buf, flags):
        calls.append(len(buf))
        raise AssertionError("the full decoder ran on an image the header check should stop")

    monkeypatch.setattr(cv2, "imdecode", refuse)
    return calls


@pytest.mark.parametrize("enc", ["png", "jpeg"])
@pytest.mark.parametrize("grey", [False, True])
def test_image_header_reads_size_and_channels_of_real_images(enc, grey):
    img = image(37, 53)[..., 0] if grey else image(37, 53)
    assert image_header(encode_image(img, enc), enc) == (53, 37, 1 if grey else 3)


def test_header_parsers_follow_the_formats_and_stay_cheap_on_junk():
    jpeg = encode_image(image(37, 53), "jpeg")
    sof = jpeg.index(b"\xff\xc0")
    padded = jpeg[:sof] + b"\xff\xfe\x00\x05hi!" + b"junk\xff\xff\xff" + jpeg[sof + 1 :]
    assert image_header(padded, "jpeg") == (53, 37, 3)  # comment, stray and fill bytes skipped
    endless = b"\xff\xd8" + b"\xff\xfe\x00\x02" * 2_000_000  # 8 MB of empty comments
    started = time.perf_counter()
    with pytest.raises(WireError, match="over 1000 markers"):
        image_header(endless, "jpeg")
    with pytest.raises(WireError, match="no frame header"):
        image_header(b"\xff\xd8\xff" + b"\x00" * 8_000_000, "jpeg")
    # a flipped length byte made OpenCV allocate the declared chunk size (3.6 GB) up front
    png = bytearray(encode_image(image(), "png"))
    png[33:37] = struct.pack(">I", 3_600_000_000)
    with pytest.raises(WireError, match="of 3600000000 bytes"):
        image_header(bytes(png), "png")
    with pytest.raises(WireError, match="no IEND"):
        image_header(encode_image(image(), "png")[:-12], "png")
    assert time.perf_counter() - started < 1.0


def test_png_bomb_is_refused_from_its_header_before_decoding(monkeypatch):
    """Before: cv2.imdecode raised cv2.error, which no caller caught (the worker exited 1)."""
    bomb = png_bomb()
    assert len(bomb) < 300
    msg = FrameMessage(cam="c", seq=0, ts_ns=1, enc="png", w=50_000, h=50_000, c=3, data=bomb)
    calls = no_decoder(monkeypatch)
    with pytest.raises(ImageTooLargeError, match="2500000000 pixels") as info:
        decode_image(msg)
    assert isinstance(info.value, WireError) and info.value.field == "data"
    with pytest.raises(ImageTooLargeError):
        check_frame(msg, max_pixels=40_000_000)
    assert calls == []


def test_decoder_errors_are_wire_errors_even_past_the_pixel_limit():
    """With the limit raised, OpenCV itself refuses (cv2.error): still only a WireError."""
    bomb = png_bomb()
    msg = FrameMessage(cam="c", seq=0, ts_ns=1, enc="png", w=50_000, h=50_000, c=3, data=bomb)
    with pytest.raises(WireError, match="not a decodable png") as info:
        decode_image(msg, max_pixels=10**10)
    assert not isinstance(info.value, ImageTooLargeError)


def test_jpeg_declaring_16000x16000_is_refused_without_allocating(monkeypatch):
    """Before: 629 bytes decoded to a 16000x16000x3 image (768 MB, plus decoder buffers)."""
    data = jpeg_declaring()
    assert len(data) < 1000 and image_header(data, "jpeg") == (16_000, 16_000, 3)
    msg = FrameMessage(cam="c", seq=0, ts_ns=1, enc="jpeg", w=16_000, h=16_000, c=3, data=data)
    calls = no_decoder(monkeypatch)
    with pytest.raises(ImageTooLargeError, match="256000000 pixels"):
        decode_image(msg)
    # a frame that lies about its size is stopped by the header too, whatever the limit
    small = msg.model_copy(update={"w": 16, "h": 16})
    with pytest.raises(WireError, match="header says 16000x16000, declared 16x16"):
        decode_image(small, max_pixels=10**12)
    assert calls == []


@pytest.mark.parametrize(("enc", "other"), [("png", "jpeg"), ("jpeg", "png")])
def test_magic_bytes_must_match_the_declared_encoding(monkeypatch, enc, other):
    msg = frame(enc).model_copy(update={"data": encode_image(image(), other)})
    calls = no_decoder(monkeypatch)
    with pytest.raises(WireError, match=f"data is a {other} image, not {enc}") as info:
        decode_image(msg)
    assert info.value.field == "enc"
    cut_short = {"png": b"\x89PNG\r\n\x1a\n" + bytes(8), "jpeg": b"\xff\xd8\xff\xe0"}
    for junk in (b"GIF89a" + bytes(40), cut_short[enc]):
        with pytest.raises(WireError) as info:
            decode_image(msg.model_copy(update={"data": junk}))
        assert info.value.field == "data"
    assert calls == []


def test_mutated_images_only_ever_raise_wire_errors():
    """Truncations and random byte flips of real images: a WireError or an image, nothing else."""
    rng = np.random.default_rng(8)
    for enc in ("png", "jpeg"):
        good = frame(enc)
        data = good.data
        variants = [data[:n] for n in (3, 8, 20, 33, 60, len(data) // 2, len(data) - 1)]
        for _ in range(150):
            mutated = bytearray(data)
            for pos in rng.integers(0, min(len(data), 200), rng.integers(1, 6)):
                mutated[pos] = int(rng.integers(0, 256))
            variants.append(bytes(mutated))
        for variant in variants:
            msg = good.model_copy(update={"data": variant})
            try:
                out = decode_image(msg)
            except WireError:
                continue
            assert out.shape == (good.h, good.w, 3)
            with contextlib.suppress(WireError):
                decode_result_png(variant, field="heatmap")


def test_result_pngs_decode_bounded_and_checked():
    mask = np.zeros((30, 40), np.uint8)
    mask[5:10, 7:20] = 255
    png = cv2.imencode(".png", mask)[1].tobytes()
    assert np.array_equal(decode_result_png(png, expected=(30, 40)), mask)
    assert np.array_equal(decode_result_png(png), mask)
    with pytest.raises(WireError, match="png is 40x30, expected 41x30") as info:
        decode_result_png(png, expected=(30, 41), field="heatmap")
    assert info.value.field == "heatmap"
    with pytest.raises(ImageTooLargeError):
        decode_result_png(png_bomb())
    with pytest.raises(WireError, match="data is a jpeg image"):
        decode_result_png(encode_image(image(), "jpeg"))
    with pytest.raises(WireError):
        decode_result_png(png_bomb(), max_pixels=10**10)  # cv2.error inside: still a WireError
    with pytest.raises(WireError):
        decode_result_png(b"")


def test_pixel_limit_applies_to_raw_frames_too():
    with pytest.raises(ImageTooLargeError, match="limit max_frame_pixels=100"):
        decode_image(frame("raw"), max_pixels=100)
    assert decode_image(frame("raw"), max_pixels=40 * 60).shape == (40, 60, 3)


# ------------------------------------------------------------------------- dead-letter caps


def test_dead_letters_keep_large_payloads_as_length_and_hash_only(client):
    """Before: every oversize frame was copied whole into deadletter:{cam} (kept 10x longer)."""
    r, keys = client
    big = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    payload = encode_image(big, "raw")
    assert len(payload) > DEADLETTER_MAX_VALUE_BYTES
    original = as_redis(frame("raw", big).to_fields())
    original[b"note"] = "é" * 40_000  # text counts in bytes (80 kB UTF-8)
    dead = deadletter_fields(
        original,
        reason="oversize",
        detail="too big",
        source_key=keys.frames("cam1"),
        source_id="1-0",
        consumer="w1",
    )
    r.xadd(keys.deadletter("cam1"), dead)
    ((_, fields),) = r.xrange(keys.deadletter("cam1"))
    assert b"data" not in fields and b"note" not in fields
    assert int(fields[b"data.dropped_bytes"]) == len(payload) == 120_000
    assert fields[b"data.dropped_sha256"].decode() == hashlib.sha256(payload).hexdigest()
    assert int(fields[b"note.dropped_bytes"]) == 80_000
    assert sum(len(k) + len(v) for k, v in fields.items()) < 2_000
    restored = original_fields(fields)
    assert "data" not in restored and not any("dropped" in k for k in restored)
    assert restored["cam"] == b"cam1" and restored["w"] == b"200"


def test_dead_letters_of_many_mid_sized_fields_stay_bounded():
    junk = {f"f{i}".encode(): bytes(60_000) for i in range(50)}  # each under the per-value cap
    dead = deadletter_fields(
        junk, reason="malformed", detail="", source_key="k", source_id="1-0", consumer="w"
    )
    kept = sum(len(v) for v in dead.values() if isinstance(v, bytes))
    assert kept <= 4 * DEADLETTER_MAX_VALUE_BYTES
    assert sum(k.endswith(".dropped_bytes") for k in dead) == 50 - kept // 60_000


def test_dropped_fields_are_recorded_like_oversize_ones():
    original = as_redis(frame().to_fields())
    dead = deadletter_fields(
        original,
        reason="too_old",
        detail="",
        source_key="k",
        source_id="1-0",
        consumer="w",
        drop=("data",),
    )
    assert "data" not in dead and dead["data.dropped_bytes"] == len(original[b"data"])
    assert original_fields(dead) == {k.decode(): v for k, v in original.items() if k != b"data"}
