"""Frame decoding for the worker: bytes from the wire -> RGB uint8 tensors on the model's device.

On CUDA, JPEGs are decoded in one batched nvJPEG call (torchvision ``decode_jpeg``) so CPU decode
does not cap GPU throughput; PNG and raw frames, and everything on CPU, go through OpenCV. A frame
that cannot be decoded becomes a per-frame ``WireError``; it never fails its batch-mates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from pipeline.wire import FrameMessage, WireError, decode_image

log = logging.getLogger(__name__)

Decoded = torch.Tensor | WireError


def decode_frames(frames: Sequence[FrameMessage], device: torch.device) -> list[Decoded]:
    """Decode each frame to an RGB uint8 tensor [3, H, W] on ``device`` (or a WireError)."""
    out: list[Decoded | None] = [None] * len(frames)
    gpu_jpeg = [
        i for i, f in enumerate(frames) if device.type == "cuda" and f.enc == "jpeg" and f.c == 3
    ]
    if gpu_jpeg:
        for i, decoded in zip(
            gpu_jpeg, _decode_jpegs_cuda([frames[i] for i in gpu_jpeg], device), strict=True
        ):
            out[i] = decoded
    for i, frame in enumerate(frames):
        if out[i] is None:
            out[i] = _decode_cpu(frame, device)
    return [d for d in out if d is not None]


def _decode_cpu(frame: FrameMessage, device: torch.device) -> Decoded:
    try:
        bgr = decode_image(frame)
    except WireError as exc:
        return exc
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _decode_jpegs_cuda(frames: Sequence[FrameMessage], device: torch.device) -> list[Decoded]:
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [torch.frombuffer(bytearray(f.data), dtype=torch.uint8) for f in frames]
    try:
        images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        # one corrupt JPEG fails nvJPEG's whole batch: find it by decoding one at a time
        log.debug("batched nvJPEG decode failed (%s); decoding frames singly", exc)
        return [_decode_jpeg_cuda_single(f, d, device) for f, d in zip(frames, datas, strict=True)]
    return [_check_size(f, img) for f, img in zip(frames, images, strict=True)]


def _decode_jpeg_cuda_single(
    frame: FrameMessage, data: torch.Tensor, device: torch.device
) -> Decoded:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        image = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return _decode_cpu(frame, device)  # OpenCV tolerates some JPEGs nvJPEG rejects
    return _check_size(frame, image)


def _check_size(frame: FrameMessage, image: torch.Tensor) -> Decoded:
    if image.ndim != 3 or image.shape[1] != frame.h or image.shape[2] != frame.w:
        return WireError(
            "data",
            frame.data,
            f"decoded {tuple(image.shape[1:])} (h, w), declared {frame.h}x{frame.w}",
        )
    return image
