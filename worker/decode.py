"""Frame decoding for the worker: bytes from the wire -> RGB uint8 tensors on the model's device.

On CUDA, JPEGs are decoded in one batched nvJPEG call (torchvision ``decode_jpeg``) so CPU decode
does not cap GPU throughput; PNG and raw frames, and everything on CPU, go through OpenCV. A frame
that cannot be decoded becomes a per-frame ``WireError``; it never fails its batch-mates.

Every frame's header is checked first (magic bytes, declared size, ``max_pixels``), so no decoder
allocates for a size nobody checked. With ``target_size`` each frame is resized to the model's
input size right after decoding, still as uint8: no full-resolution float copy ever exists, and
frames of different sizes end up in one batch.

``decode_frames_keeping`` also returns, per frame, the decoded BGR frame shrunk to a longest side
of ``keep_max_side`` (the worker draws an anomalous frame's overlay from it); frames decoded by
nvJPEG straight into GPU memory keep none.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.heatmap import fit_longest_side
from pipeline.core.image_codec import MAX_FRAME_PIXELS, check_frame, decode_image
from pipeline.core.wire import FrameMessage, WireError

log = logging.getLogger(__name__)

Decoded = torch.Tensor | WireError


def decode_frames(
    frames: Sequence[FrameMessage],
    device: torch.device,
    target_size: tuple[int, int] | None = None,
    max_pixels: int = MAX_FRAME_PIXELS,
) -> list[Decoded]:
    """Decode each frame to an RGB uint8 tensor [3, H, W] on ``device`` (or a WireError).

    ``target_size`` = (h, w): resize to it right after decoding (as training resizes); None keeps
    the frame size. Frames above ``max_pixels`` or whose header disagrees with the declared size
    are WireErrors before any decoder runs.
    """
    return decode_frames_keeping(frames, device, target_size, max_pixels)[0]


def decode_frames_keeping(
    frames: Sequence[FrameMessage],
    device: torch.device,
    target_size: tuple[int, int] | None = None,
    max_pixels: int = MAX_FRAME_PIXELS,
    keep_max_side: int | None = None,
) -> tuple[list[Decoded], list[np.ndarray | None]]:
    """``decode_frames`` plus, with ``keep_max_side``, each CPU-decoded frame as BGR uint8 with
    its longest side at most ``keep_max_side`` (None for nvJPEG-decoded and failed frames)."""
    kept: list[np.ndarray | None] = [None] * len(frames)
    out: list[Decoded | None] = [None] * len(frames)
    for i, frame in enumerate(frames):
        try:
            check_frame(frame, max_pixels=max_pixels)
        except WireError as exc:
            out[i] = exc
    gpu_jpeg = [
        i
        for i, f in enumerate(frames)
        if out[i] is None and device.type == "cuda" and f.enc == "jpeg" and f.c == 3
    ]
    if gpu_jpeg:
        todo = [frames[i] for i in gpu_jpeg]
        decoded = _decode_jpegs_cuda(todo, device, target_size, max_pixels)
        for i, image in zip(gpu_jpeg, decoded, strict=True):
            out[i] = image if isinstance(image, WireError) else _resize(image, target_size)
    for i, frame in enumerate(frames):
        if out[i] is None:
            out[i], kept[i] = _decode_cpu(frame, device, target_size, max_pixels, keep_max_side)
    return [d for d in out if d is not None], kept


def _resize(image: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h, w] with the resampling training uses.

    Training resizes with bilinear, ``antialias=True`` (models/data.py ``to_tensor``, as
    torchvision's Resize). torch runs that same filter directly on uint8 on the CPU, so this
    matches training to within 1/255 per pixel (measured: anomaly maps within 0.3% of their
    maximum, scores within 0.15%); cv2.INTER_AREA differs by up to 30/255 on fine texture when
    shrinking and acts like nearest-neighbour when enlarging (scores off by up to 30%), so it is
    not used. CUDA has no uint8 antialias kernel: there one frame at a time goes through float.
    """
    if size is None or tuple(image.shape[-2:]) == tuple(size):
        return image
    batch = image.unsqueeze(0)
    if batch.device.type != "cpu":
        batch = batch.float()
    resized = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
    if resized.dtype != torch.uint8:
        resized = resized.round_().clamp_(0, 255).to(torch.uint8)
    return resized[0]


def _decode_cpu(
    frame: FrameMessage,
    device: torch.device,
    target_size: tuple[int, int] | None = None,
    max_pixels: int = MAX_FRAME_PIXELS,
    keep_max_side: int | None = None,
) -> tuple[Decoded, np.ndarray | None]:
    try:
        bgr = decode_image(frame, max_pixels=max_pixels)
    except WireError as exc:
        return exc, None
    kept = fit_longest_side(bgr, keep_max_side) if keep_max_side else None
    # HxWxC viewed as [C, H, W] (channels-last memory, the layout torch's uint8 resize wants);
    # BGR -> RGB after the resize, on the small image
    tensor = _resize(torch.from_numpy(bgr).permute(2, 0, 1), target_size)
    tensor = tensor.flip(0).contiguous()
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True), kept
    return tensor.to(device), kept


def _decode_jpegs_cuda(
    frames: Sequence[FrameMessage],
    device: torch.device,
    target_size: tuple[int, int] | None,
    max_pixels: int,
) -> list[Decoded]:
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [torch.frombuffer(bytearray(f.data), dtype=torch.uint8) for f in frames]
    try:
        images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        # one corrupt JPEG fails nvJPEG's whole batch: find it by decoding one at a time
        log.debug("batched nvJPEG decode failed (%s); decoding frames singly", exc)
        return [
            _decode_jpeg_cuda_single(f, d, device, target_size, max_pixels)
            for f, d in zip(frames, datas, strict=True)
        ]
    return [_check_size(f, img) for f, img in zip(frames, images, strict=True)]


def _decode_jpeg_cuda_single(
    frame: FrameMessage,
    data: torch.Tensor,
    device: torch.device,
    target_size: tuple[int, int] | None,
    max_pixels: int,
) -> Decoded:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        image = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # OpenCV is more tolerant
        return _decode_cpu(frame, device, target_size, max_pixels)[0]
    return _check_size(frame, image)


def _check_size(frame: FrameMessage, image: torch.Tensor) -> Decoded:
    if image.ndim != 3 or image.shape[1] != frame.h or image.shape[2] != frame.w:
        return WireError(
            "data",
            frame.data,
            f"decoded {tuple(image.shape[1:])} (h, w), declared {frame.h}x{frame.w}",
        )
    return image
