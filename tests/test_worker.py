"""Worker against a real Redis with a real (random-weight) EfficientAD engine.

Every frame gets exactly one result, result + ack share one MULTI/EXEC, a restarted worker finishes
its own pending frames, dead peers' frames are claimed, bad frames are dead-lettered with a reason,
and SIGTERM finishes the in-flight batch in a real subprocess.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
import torch
import yaml

from models.checkpoint import save_checkpoint
from models.inference import InferenceEngine, ModelInfo
from models.networks import EfficientAD, neutral_model
from pipeline.core.image_codec import ImageTooLargeError, encode_image
from pipeline.core.stage_settings import WorkerSettings
from pipeline.core.wire import FrameMessage, ResultMessage, original_fields
from tests import pipeline_support
from tests.test_wire import jpeg_declaring, png_bomb
from worker.batching import BatchCollector
from worker.decode import decode_frames
from worker.results import FrameEntry, Outcome, build_result
from worker.service import FrameWorker

client = pipeline_support.client  # fixtures: real Redis, per-test key prefix
keys = pipeline_support.keys

REPO = Path(__file__).resolve().parents[1]
H, W = 48, 64


def random_model() -> EfficientAD:
    return neutral_model("s", seed=0)


def plain_frame() -> np.ndarray:
    return np.full((H, W, 3), 120, np.uint8)


def noisy_frame() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def calibration() -> dict:
    """A threshold between a plain frame (normal) and a noise frame (anomalous) for this model."""
    torch.set_num_threads(1)
    info = ModelInfo("rand", "1", "ab" * 32, (256, 256), 1.0, 0.0, 1.0)
    probe = InferenceEngine.from_model(random_model(), info, device="cpu")
    rgb = [cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in (plain_frame(), noisy_frame())]
    low, high = probe.predict_images(rgb).scores
    assert high > 1.5 * low, "the probe frames must score apart"
    threshold = float(np.sqrt(low * high))
    return {"threshold": threshold, "score_min": float(low), "score_max": float(high)}


@pytest.fixture(scope="module")
def engine(calibration) -> InferenceEngine:
    info = ModelInfo("rand", "1", "ab" * 32, (256, 256), **calibration)
    return InferenceEngine.from_model(random_model(), info, device="cpu")


def settings(**kw) -> WorkerSettings:
    base = {"batch_size": 4, "max_wait_ms": 200, "block_ms": 50, "claim_interval_s": 3600}
    return WorkerSettings(**{**base, **kw})


def add_frame(client, keys, stream_cam, seq, img=None, enc="jpeg", **override) -> str:
    """XADD a frame to ``stream_cam``'s stream; ``override`` replaces wire fields (bad frames)."""
    img = plain_frame() if img is None else img
    msg = FrameMessage(
        cam=stream_cam,
        seq=seq,
        ts_ns=time.time_ns(),
        enc=enc,
        w=W,
        h=H,
        c=3,
        data=encode_image(img, enc),
    )
    fields = {**msg.to_fields(), **override}
    return client.xadd(keys.frames(stream_cam), fields).decode()


def results(client, keys, cam) -> list[ResultMessage]:
    return [ResultMessage.from_fields(f) for _, f in client.xrange(keys.results(cam))]


def deadletters(client, keys, cam) -> list[dict]:
    return [{k.decode(): v for k, v in f.items()} for _, f in client.xrange(keys.deadletter(cam))]


def pending(client, keys, cam, group="workers") -> int:
    try:
        return int(client.xpending(keys.frames(cam), group)["pending"])
    except redis.ResponseError:  # the group does not exist (yet)
        return 0


def small_result(cam: str, frame_id: str, msg: FrameMessage) -> ResultMessage:
    """A normal result for ``frame_id`` as a worker would publish it."""
    return ResultMessage(
        cam=cam,
        frame_id=frame_id,
        seq=msg.seq,
        ts_ns=msg.ts_ns,
        score=0.1,
        score_norm=0.1,
        anomalous=False,
        threshold=1.0,
        model="rand",
        map_w=8,
        map_h=8,
    )


# ------------------------------------------------------------------------------- unit pieces


def test_batch_collector_releases_on_size_or_deadline():
    now = [0.0]
    c = BatchCollector[int](3, 0.5, clock=lambda: now[0])
    assert c.time_left() is None and not c.ready()
    c.add(1)
    now[0] = 0.2
    c.extend([2])
    assert not c.ready() and c.time_left() == pytest.approx(0.3) and c.room == 1
    now[0] = 0.5
    assert c.ready() and c.take() == [1, 2] and len(c) == 0
    c.extend([1, 2, 3, 4])
    assert c.ready() and c.take() == [1, 2, 3] and c.take() == [4]


def test_decode_isolates_bad_frames():
    good = FrameMessage(
        cam="a", seq=0, ts_ns=1, enc="png", w=W, h=H, c=3, data=encode_image(noisy_frame(), "png")
    )
    bad = good.model_copy(update={"enc": "jpeg", "data": b"\xff\xd8 definitely not a jpeg"})
    wrong_size = good.model_copy(update={"w": W + 1})
    out = decode_frames([good, bad, wrong_size], torch.device("cpu"))
    assert isinstance(out[0], torch.Tensor) and out[0].shape == (3, H, W)
    rgb = cv2.cvtColor(noisy_frame(), cv2.COLOR_BGR2RGB)
    assert np.array_equal(out[0].permute(1, 2, 0).numpy(), rgb)
    assert "not a decodable jpeg" in str(out[1])
    assert "declared" in str(out[2])


def test_decode_checks_headers_before_decoding(monkeypatch):
    good = FrameMessage(
        cam="a", seq=0, ts_ns=1, enc="png", w=W, h=H, c=3, data=encode_image(noisy_frame(), "png")
    )
    bomb = good.model_copy(update={"w": 50_000, "h": 50_000, "data": png_bomb()})
    jpeg = good.model_copy(update={"enc": "jpeg", "w": 16_000, "h": 16_000})
    jpeg = jpeg.model_copy(update={"data": jpeg_declaring()})
    seen = spy_decoder(monkeypatch)
    out = decode_frames([bomb, good, jpeg], torch.device("cpu"), (256, 256), max_pixels=10**6)
    assert isinstance(out[0], ImageTooLargeError) and isinstance(out[2], ImageTooLargeError)
    assert isinstance(out[1], torch.Tensor) and out[1].shape == (3, 256, 256)
    assert seen == [len(good.data)]  # the decoder only ever saw the good frame


def test_decode_time_resize_scores_like_prepare_time_resize(engine):
    """Resizing uint8 right after decode (no full-size float copy) matches training's resize.

    The old path handed the full frame to ``prepare`` (float, bilinear + antialias, as in
    training); torch's uint8 antialias kernel is the same filter, rounded to uint8.
    """
    rgb_part = np.random.default_rng(2).integers(60, 200, (600, 800, 3), dtype=np.uint8)
    rgb_part = cv2.GaussianBlur(rgb_part, (0, 0), 3)  # texture at several scales
    frames = [
        FrameMessage(cam="a", seq=i, ts_ns=1, enc="png", w=w, h=h, c=3, data=encode_image(f, "png"))
        for i, f in enumerate([noisy_frame(), plain_frame(), rgb_part])
        for h, w in [f.shape[:2]]
    ]
    size = engine.info.image_size
    for frame in frames:
        (full,) = decode_frames([frame], torch.device("cpu"))
        (small,) = decode_frames([frame], torch.device("cpu"), size)
        assert small.dtype == torch.uint8 and tuple(small.shape) == (3, *size)
        a, b = engine.predict(full.unsqueeze(0)), engine.predict(small.unsqueeze(0))
        map_diff = np.abs(a.maps - b.maps).max() / np.abs(a.maps).max()
        score_diff = abs(a.scores[0] - b.scores[0]) / abs(a.scores[0])
        assert map_diff < 0.01 and score_diff < 0.005, (frame.w, map_diff, score_diff)


def spy_decoder(monkeypatch) -> list[int]:
    """Record the size of every buffer cv2.imdecode is given (it still decodes)."""
    seen: list[int] = []
    real = cv2.imdecode

    def spy(buf, flags):
        seen.append(len(buf))
        return real(buf, flags)

    monkeypatch.setattr(cv2, "imdecode", spy)
    return seen


# ------------------------------------------------------------------------------- integration


def test_every_frame_gets_exactly_one_result_in_one_transaction(client, keys, engine):
    cams = ["camA", "camB"]
    ids = {
        cam: [
            add_frame(client, keys, cam, 0, plain_frame()),
            add_frame(client, keys, cam, 1, noisy_frame(), enc="png"),
        ]
        for cam in cams
    }
    commands: list[tuple[str, str]] = []
    ready = threading.Event()

    def monitor() -> None:
        with redis.Redis(host="127.0.0.1", port=6379, socket_timeout=120).monitor() as mon:
            ready.set()
            for cmd in mon.listen():
                commands.append((cmd["client_type"], cmd["command"]))
                if f"{keys.prefix}STOP" in cmd["command"]:
                    return

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    ready.wait(5)
    time.sleep(0.1)
    worker = FrameWorker(client, keys, settings(), dict.fromkeys(cams, engine), consumer="w-test")
    stats = worker.run(max_results=4)
    client.get(f"{keys.prefix}STOP")
    watcher.join(10)

    assert stats.results == 4 and stats.batches == 1  # one batch across both cameras
    for cam in cams:
        got = results(client, keys, cam)
        assert [r.frame_id for r in got] == ids[cam]
        assert pending(client, keys, cam) == 0
        normal, anomalous = got
        assert (normal.anomalous, anomalous.anomalous) == (False, True)
        assert normal.mask is None and normal.heatmap is None
        assert anomalous.mask and anomalous.heatmap and anomalous.regions
        mask = cv2.imdecode(np.frombuffer(anomalous.mask, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (256, 256) and (anomalous.map_h, anomalous.map_w) == (256, 256)
        assert int((mask > 0).sum()) == sum(r.area for r in anomalous.regions)
        assert anomalous.score > anomalous.threshold > normal.score
        assert anomalous.score_norm > 0.5 > normal.score_norm
        assert anomalous.model_sha256 == "ab" * 32 and anomalous.batch == 4
        assert anomalous.worker == "w-test" and anomalous.frame_w == W
        assert anomalous.t_infer_ms > 0 and anomalous.t_total_ms >= anomalous.t_queue_ms

    # each XACK runs in the same atomic script call as the XADD of that frame's result, and
    # no frame is acked outside one
    blocks: list[list[str]] = []
    block: list[str] | None = None
    for client_type, cmd in commands:
        if client_type == "lua":
            block = [] if block is None else block
            block.append(cmd)
        elif block is not None:
            blocks.append(block)
            block = None
        assert client_type == "lua" or not cmd.startswith("XACK"), cmd
    for cam in cams:
        for frame_id in ids[cam]:
            acks = [
                b
                for b in blocks
                if any(c.startswith(f"XACK {keys.frames(cam)}") and frame_id in c for c in b)
            ]
            assert len(acks) == 1, f"{frame_id} acked {len(acks)} times"
            assert any(
                c.startswith(f"XADD {keys.results(cam)}") and f"frame_id {frame_id}" in c
                for c in acks[0]
            )


def test_frame_resolution_maps_give_boxes_in_frame_pixels(client, keys, engine):
    add_frame(client, keys, "cam1", 0, noisy_frame())
    worker = FrameWorker(
        client, keys, settings(map_resolution="frame", max_wait_ms=0), {"cam1": engine}
    )
    worker.run(max_results=1)
    (res,) = results(client, keys, "cam1")
    assert (res.map_h, res.map_w) == (H, W)
    assert all(r.x + r.w <= W and r.y + r.h <= H for r in res.regions)


def test_an_anomalous_frame_carries_its_overlay_a_normal_one_none(client, keys, engine):
    """The worker draws the overlay from the frame it decoded, shrunk to overlay_max_side."""
    big = cv2.resize(noisy_frame(), (640, 480), interpolation=cv2.INTER_NEAREST)
    add_frame(client, keys, "cam1", 0, plain_frame())
    add_frame(client, keys, "cam1", 1, big, w=640, h=480)
    add_frame(client, keys, "cam1", 2, big, enc="png", w=640, h=480)
    worker = FrameWorker(
        client, keys, settings(max_wait_ms=0, overlay_max_side=320), {"cam1": engine}
    )
    worker.run(max_results=3)
    normal, jpeg, png = sorted(results(client, keys, "cam1"), key=lambda r: r.seq)
    assert not normal.anomalous and normal.overlay is None
    for res in (jpeg, png):
        assert res.anomalous and res.heatmap is not None
        overlay = cv2.imdecode(np.frombuffer(res.overlay, np.uint8), cv2.IMREAD_COLOR)
        assert overlay.shape == (240, 320, 3)  # 640x480 shrunk to a longest side of 320
    off = FrameWorker(
        client, keys, settings(max_wait_ms=0, overlays=False), {"cam2": engine}, consumer="w2"
    )
    add_frame(client, keys, "cam2", 0, noisy_frame())
    off.run(max_results=1)
    (res,) = results(client, keys, "cam2")
    assert res.anomalous and res.overlay is None and res.mask is not None


def test_without_a_kept_frame_the_overlay_is_decoded_again(engine):
    """The CUDA path keeps no host copy (nvJPEG decodes into GPU memory): an anomalous frame is
    decoded once more on the CPU for its overlay, a normal one never."""
    big = cv2.resize(noisy_frame(), (640, 480), interpolation=cv2.INTER_NEAREST)
    frame = FrameMessage(
        cam="c", seq=0, ts_ns=1, enc="jpeg", w=640, h=480, c=3, data=encode_image(big, "jpeg")
    )
    rgb = cv2.cvtColor(big, cv2.COLOR_BGR2RGB)
    pred = engine.predict_images([rgb, cv2.cvtColor(plain_frame(), cv2.COLOR_BGR2RGB)])
    assert pred.anomalous.tolist() == [True, False]
    cfg = settings(overlay_max_side=400)
    for index, expect in ((0, (300, 400, 3)), (1, None)):
        entry = FrameEntry("c", "1-0", {}, time.time_ns(), frame=frame)  # preview: None
        result = build_result(
            entry, engine.info, pred, index, cfg, "w", batch=2, decode_s=0.0, infer_s=0.0
        )
        if expect is None:
            assert result.overlay is None
        else:
            overlay = cv2.imdecode(np.frombuffer(result.overlay, np.uint8), cv2.IMREAD_COLOR)
            assert overlay.shape == expect


def test_restarted_worker_finishes_its_own_pending_frames(client, keys, engine):
    cam = "cam1"
    worker = FrameWorker(client, keys, settings(max_wait_ms=0), {cam: engine}, consumer="w1")
    worker.ensure_groups()
    ids = [add_frame(client, keys, cam, i) for i in range(2)]
    # the first life of w1 read both frames and died before publishing
    client.xreadgroup("workers", "w1", {keys.frames(cam): ">"}, count=10)
    assert pending(client, keys, cam) == 2
    stats = FrameWorker(client, keys, settings(), {cam: engine}, consumer="w1").run(max_results=2)
    assert stats.recovered == 2
    assert [r.frame_id for r in results(client, keys, cam)] == ids
    assert all(r.batch == 1 for r in results(client, keys, cam))  # re-read frames run alone
    assert pending(client, keys, cam) == 0


def test_frames_of_a_dead_consumer_are_claimed(client, keys, engine):
    cam = "cam1"
    cfg = settings(claim_min_idle_ms=200, claim_interval_s=0.1)
    worker = FrameWorker(client, keys, cfg, {cam: engine}, consumer="alive")
    worker.ensure_groups()
    frame_id = add_frame(client, keys, cam, 0)
    client.xreadgroup("workers", "dead", {keys.frames(cam): ">"}, count=10)
    time.sleep(0.3)
    stats = worker.run(max_results=1, idle_exit_s=10)
    assert stats.claimed == 1
    (res,) = results(client, keys, cam)
    assert res.frame_id == frame_id and res.worker == "alive"
    assert pending(client, keys, cam) == 0


def test_frames_of_a_lost_read_reply_are_found_and_finished(client, keys, engine):
    """Redis froze, the client retried a read, the server ran both: the first read's frames are
    pending to this worker but were never seen. They must not wait for a 30 s claim."""
    cam = "cam1"
    cfg = settings(claim_min_idle_ms=60_000, claim_interval_s=0.2)
    worker = FrameWorker(client, keys, cfg, {cam: engine}, consumer="w1")
    worker.ensure_groups()
    ids = [add_frame(client, keys, cam, i) for i in range(3)]
    # the read whose reply was lost: delivered to w1, never seen by this worker...
    client.xreadgroup("workers", "w1", {keys.frames(cam): ">"}, count=2)
    # ...and not the start-up recovery either, so only the periodic check can find them
    worker.recover_own_pending = lambda: 0  # type: ignore[method-assign]
    t0 = time.monotonic()
    worker.run(max_results=3, idle_exit_s=10)
    assert time.monotonic() - t0 < 8.0
    assert sorted(r.frame_id for r in results(client, keys, cam)) == ids
    assert pending(client, keys, cam) == 0 and worker.stats.recovered == 2


def test_a_dead_workers_frames_come_back_at_once_a_live_ones_stay(client, keys, engine):
    """Issue #8.1: no 30 s wait for a killed worker; a live but slow one keeps its frames."""
    cam = "cam1"
    cfg = settings(claim_min_idle_ms=60_000, claim_interval_s=0.1, dead_claim_min_idle_ms=100)
    worker = FrameWorker(client, keys, cfg, {cam: engine}, consumer="alive")
    worker.ensure_groups()
    dead_frame = add_frame(client, keys, cam, 0)
    busy_frame = add_frame(client, keys, cam, 1)
    client.xreadgroup("workers", "dead", {keys.frames(cam): ">"}, count=1)  # no heartbeat
    client.xreadgroup("workers", "busy", {keys.frames(cam): ">"}, count=1)
    client.set(keys.worker_alive("busy"), 1, px=60_000)  # alive, just slow
    t0 = time.monotonic()
    stats = worker.run(max_results=1, idle_exit_s=10)
    assert time.monotonic() - t0 < 5.0
    assert stats.claimed == 1
    (res,) = results(client, keys, cam)
    assert res.frame_id == dead_frame and res.worker == "alive"
    (still,) = client.xpending_range(keys.frames(cam), "workers", "-", "+", 10)
    assert still["message_id"].decode() == busy_frame and still["consumer"] == b"busy"
    # a clean stop removes the worker's own heartbeat, which it kept while running
    assert not client.exists(keys.worker_alive("alive"))


def test_poison_frames_are_dead_lettered_after_max_deliveries(client, keys, engine):
    cam = "cam1"
    worker = FrameWorker(client, keys, settings(max_deliveries=2), {cam: engine}, consumer="w1")
    worker.ensure_groups()
    frame_id = add_frame(client, keys, cam, 0)
    for _ in range(2):  # two lives that crashed on this frame (each re-read bumps the count)
        client.xreadgroup("workers", "w1", {keys.frames(cam): "0" if _ else ">"}, count=1)
    assert worker.recover_own_pending() == 1
    (dead,) = deadletters(client, keys, cam)
    assert dead["reason"] == b"poison" and dead["deliveries"] == b"3"
    assert dead["source_id"].decode() == frame_id
    assert original_fields(dead)["data"] == client.xrange(keys.frames(cam))[0][1][b"data"]
    assert results(client, keys, cam) == [] and pending(client, keys, cam) == 0


def test_bad_frames_go_to_the_dead_letter_stream_with_a_reason(client, keys, engine):
    cam = "cam1"
    cfg = settings(max_frame_bytes=50_000, max_age_s=60, max_wait_ms=0)
    worker = FrameWorker(client, keys, cfg, {cam: engine})
    worker.ensure_groups()
    big = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    add_frame(client, keys, cam, 0, data=b"\xff\xd8 corrupt jpeg")
    add_frame(client, keys, cam, 1, data=encode_image(big, "raw"))
    add_frame(client, keys, cam, 2, w="wide")
    add_frame(client, keys, cam, 3, ts_ns=time.time_ns() - 3600 * 10**9)
    add_frame(client, keys, cam, 4, cam="someone-else")
    stats = worker.run(idle_exit_s=0.5)
    reasons = [d["reason"].decode() for d in deadletters(client, keys, cam)]
    assert sorted(reasons) == ["malformed", "malformed", "oversize", "too_old", "undecodable"]
    assert stats.results == 0 and pending(client, keys, cam) == 0
    by_reason = {d["reason"].decode(): d for d in deadletters(client, keys, cam)}
    assert b"not a decodable jpeg" in by_reason["undecodable"]["detail"]
    assert any(d["detail"].startswith(b"field 'w'") for d in deadletters(client, keys, cam))
    assert "data" not in by_reason["too_old"]  # the backlog is not copied
    jpeg_bytes = len(encode_image(plain_frame(), "jpeg"))
    assert int(by_reason["too_old"]["data.dropped_bytes"]) == jpeg_bytes
    # a 120 kB payload is not kept for ten times a frame's life, only its length and hash
    oversize = by_reason["oversize"]
    assert "data" not in oversize and int(oversize["data.dropped_bytes"]) == 200 * 200 * 3
    expected = hashlib.sha256(encode_image(big, "raw")).hexdigest()
    assert oversize["data.dropped_sha256"].decode() == expected


def test_hostile_images_are_dead_lettered_and_the_frames_around_them_scored(
    client, keys, engine, monkeypatch
):
    """Before: the PNG bomb's cv2.error ended the worker (exit 1) on every delivery, and the JPEG
    declaring 16000x16000 was decoded to a 768 MB array."""
    cam = "cam1"
    worker = FrameWorker(client, keys, settings(max_wait_ms=0), {cam: engine})
    worker.ensure_groups()
    jpeg = encode_image(plain_frame(), "jpeg")
    good = [add_frame(client, keys, cam, 0)]
    add_frame(client, keys, cam, 1, enc="png", w=50_000, h=50_000, data=png_bomb())
    add_frame(client, keys, cam, 2, w=16_000, h=16_000, data=jpeg_declaring())
    add_frame(client, keys, cam, 3, data=jpeg_declaring())  # declares 64x48, header 16000x16000
    add_frame(client, keys, cam, 4, enc="png", data=jpeg)  # enc says png, bytes are a JPEG
    good.append(add_frame(client, keys, cam, 5))
    seen = spy_decoder(monkeypatch)
    stats = worker.run(max_results=2, idle_exit_s=10)  # a CPU batch can outlast a short idle
    assert sorted(r.frame_id for r in results(client, keys, cam)) == good
    by_seq = {int(d["seq"]): d for d in deadletters(client, keys, cam)}
    assert {seq: d["reason"] for seq, d in by_seq.items()} == {
        1: b"oversize",
        2: b"oversize",
        3: b"undecodable",
        4: b"malformed",
    }
    assert b"2500000000 pixels" in by_seq[1]["detail"]
    assert b"max_frame_pixels=40000000" in by_seq[2]["detail"]
    assert b"header says 16000x16000, declared 64x48" in by_seq[3]["detail"]
    assert b"data is a jpeg image, not png" in by_seq[4]["detail"]
    assert seen == [len(jpeg), len(jpeg)]  # the decoder only ever ran on the two good frames
    assert stats.results == 2 and pending(client, keys, cam) == 0


def test_a_decoder_error_is_a_dead_letter_not_a_crash(client, keys, engine):
    """With the pixel limit out of the way, OpenCV itself raises cv2.error on the PNG bomb."""
    cam = "cam1"
    cfg = settings(max_wait_ms=0, max_frame_pixels=10**10)
    worker = FrameWorker(client, keys, cfg, {cam: engine})
    worker.ensure_groups()
    good = add_frame(client, keys, cam, 0)
    add_frame(client, keys, cam, 1, enc="png", w=50_000, h=50_000, data=png_bomb())
    stats = worker.run(max_results=1, idle_exit_s=10)
    assert [r.frame_id for r in results(client, keys, cam)] == [good]
    (dead,) = deadletters(client, keys, cam)
    assert dead["reason"] == b"undecodable" and b"not a decodable png" in dead["detail"]
    assert stats.results == 1 and pending(client, keys, cam) == 0


def test_max_frame_pixels_is_a_worker_setting(client, keys, engine):
    cam = "cam1"
    worker = FrameWorker(client, keys, settings(max_frame_pixels=W * H - 1), {cam: engine})
    worker.ensure_groups()
    add_frame(client, keys, cam, 0)
    worker.run(idle_exit_s=0.3)
    (dead,) = deadletters(client, keys, cam)
    assert dead["reason"] == b"oversize" and dead["data"]  # a small frame stays replayable
    assert FrameMessage.from_fields(original_fields(dead)).w == W


def test_a_result_for_a_frame_acked_elsewhere_is_removed(client, keys, engine):
    """A slow worker whose frame was claimed and finished by a peer must not add a second result."""
    cam = "cam1"
    worker = FrameWorker(client, keys, settings(), {cam: engine}, consumer="slow")
    worker.ensure_groups()
    frame_id = add_frame(client, keys, cam, 0)
    client.xreadgroup("workers", "slow", {keys.frames(cam): ">"})
    client.xack(keys.frames(cam), "workers", frame_id)  # the peer already published and acked
    client.xadd(keys.results(cam), {"peer": "result"})
    msg = FrameMessage.from_fields(client.xrange(keys.frames(cam))[0][1])
    late = small_result(cam, frame_id, msg)
    entry = FrameEntry(cam, frame_id, {}, time.time_ns(), frame=msg)
    worker._writer._publish_camera(cam, [Outcome(entry, result=late)])
    assert client.xlen(keys.results(cam)) == 1 and worker.stats.duplicates == 1
    # not even briefly: a reader between an add and a later delete would have seen two results
    assert client.xinfo_stream(keys.results(cam))["entries-added"] == 1
    assert worker.stats.results == 0


def test_sigterm_finishes_the_in_flight_batch_and_exits_cleanly(client, keys, engine, tmp_path):
    cam = "cam1"
    model_dir = save_checkpoint(
        engine.model.float().cpu(),
        {
            "name": "rand",
            "version": "1",
            "image_size": [256, 256],
            "threshold": engine.info.threshold,
            "score_min": engine.info.score_min,
            "score_max": engine.info.score_max,
        },
        tmp_path / "model",
    )
    config = {
        "redis": {"url": "redis://127.0.0.1:6379/0", "key_prefix": keys.prefix},
        "cameras": [{"id": cam, "source": "usb:0"}],
        "models": {"default": str(model_dir)},
        "worker": {"batch_size": 2, "max_wait_ms": 5000, "block_ms": 100, "device": "cpu"},
        "metrics": {"enabled": False},
    }
    config_path = tmp_path / "line.yaml"
    config_path.write_text(yaml.safe_dump(config))
    ids = [add_frame(client, keys, cam, i) for i in range(5)]
    code = (
        "import sys\n"
        "from efficientad.cli import build_parser\n"
        "a = build_parser().parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "worker", "--config", str(config_path), "--index", "0"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while pending(client, keys, cam) == 0:  # wait until it holds frames in flight
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "worker never read a frame"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()
    got = [r.frame_id for r in results(client, keys, cam)]
    assert 1 <= len(got) < len(ids) and got == ids[: len(got)]
    assert pending(client, keys, cam) == 0  # what it read, it finished; the rest stays unread
    consumers = client.xinfo_consumers(keys.frames(cam), "workers")
    assert [c["name"] for c in consumers] == [f"worker-{os.uname().nodename}-0".encode()]
    statuses = [f[b"event"] for _, f in client.xrange(keys.status())]
    assert statuses == [b"process.started", b"process.stopped"]


def test_a_result_that_cannot_be_written_is_kept_as_a_dead_letter(client, keys, engine):
    """MULTI/EXEC applies the XACK even when the XADD fails: the frame must not vanish."""
    cam = "cam1"
    worker = FrameWorker(client, keys, settings(), {cam: engine}, consumer="w1")
    worker.ensure_groups()
    frame_id = add_frame(client, keys, cam, 0)
    ((_, items),) = client.xreadgroup("workers", "w1", {keys.frames(cam): ">"})
    client.set(keys.results(cam), "not a stream")  # misconfiguration: WRONGTYPE at EXEC
    msg = FrameMessage.from_fields(items[0][1])
    result = small_result(cam, frame_id, msg)
    entry = FrameEntry(cam, frame_id, items[0][1], time.time_ns(), frame=msg)
    worker._writer._publish_camera(cam, [Outcome(entry, result=result)])
    (dead,) = deadletters(client, keys, cam)
    assert dead["reason"] == b"publish_failed" and b"WRONGTYPE" in dead["detail"]
    assert dead["data"] == items[0][1][b"data"] and pending(client, keys, cam) == 0


def test_a_frame_is_never_acked_without_a_result_or_dead_letter(client, keys, engine):
    """When neither the result nor the dead letter can be written, the frame stays pending."""
    cam = "cam1"
    worker = FrameWorker(client, keys, settings(), {cam: engine}, consumer="w1")
    worker.ensure_groups()
    frame_id = add_frame(client, keys, cam, 0)
    ((_, items),) = client.xreadgroup("workers", "w1", {keys.frames(cam): ">"})
    client.set(keys.results(cam), "not a stream")
    client.set(keys.deadletter(cam), "not a stream either")
    msg = FrameMessage.from_fields(items[0][1])
    entry = FrameEntry(cam, frame_id, items[0][1], time.time_ns(), frame=msg)
    worker._writer._publish_camera(cam, [Outcome(entry, result=small_result(cam, frame_id, msg))])
    assert pending(client, keys, cam) == 1  # kept for a retry, not acked into nothing
    assert worker.stats.results == 0 and not worker.stats.dead_letters


def test_a_junk_entry_with_thousands_of_fields_is_dead_lettered(client, keys, engine):
    cam = "cam1"
    worker = FrameWorker(client, keys, settings(max_wait_ms=0), {cam: engine})
    worker.ensure_groups()
    client.xadd(keys.frames(cam), {f"f{i}": i for i in range(10_000)})
    stats = worker.run(idle_exit_s=0.5)
    (dead,) = deadletters(client, keys, cam)
    assert dead["reason"] == b"malformed" and stats.dead_letters["malformed"] == 1
    assert pending(client, keys, cam) == 0


class FlakyEngine:
    """The real engine, except that it raises on frames whose pixels are all ``bad_value``."""

    def __init__(self, engine: InferenceEngine, bad_value: int | None) -> None:
        self.engine, self.bad_value = engine, bad_value
        self.info, self.device = engine.info, engine.device
        self.calls = 0

    def predict(self, batch: torch.Tensor):
        self.calls += 1
        if self.bad_value is None or any(bool((img == self.bad_value).all()) for img in batch):
            raise RuntimeError("simulated model failure")
        return self.engine.predict(batch)


def test_a_frame_that_breaks_the_model_ends_as_poison_without_a_crash(
    client, keys, engine, monkeypatch
):
    monkeypatch.setattr("worker.service.MODEL_RETRY_DELAY_S", 0.05)
    cam = "cam1"
    flaky = FlakyEngine(engine, bad_value=7)
    cfg = settings(max_deliveries=2, max_wait_ms=100, batch_size=3)
    worker = FrameWorker(client, keys, cfg, {cam: flaky}, consumer="w1")
    worker.ensure_groups()
    good = [add_frame(client, keys, cam, 0), add_frame(client, keys, cam, 2)]
    bad = add_frame(client, keys, cam, 1, img=np.full((H, W, 3), 7, np.uint8), enc="png")
    stats = worker.run(idle_exit_s=0.3)  # before the fix: RuntimeError out of run
    assert sorted(r.frame_id for r in results(client, keys, cam)) == good
    (dead,) = deadletters(client, keys, cam)
    assert dead["reason"] == b"poison" and dead["source_id"].decode() == bad
    assert stats.results == 2 and pending(client, keys, cam) == 0
    # the batch, then the bad frame alone on its first and second delivery
    assert flaky.calls == 1 + 3 + 1


def test_a_broken_engine_stops_the_worker_and_leaves_frames_pending(client, keys, engine):
    cam = "cam1"
    worker = FrameWorker(client, keys, settings(max_wait_ms=0), {cam: FlakyEngine(engine, None)})
    worker.ensure_groups()
    for i in range(4):
        add_frame(client, keys, cam, i)
    with pytest.raises(RuntimeError, match="different frames in a row"):
        worker.run(idle_exit_s=5)
    assert pending(client, keys, cam) == 4 and deadletters(client, keys, cam) == []
