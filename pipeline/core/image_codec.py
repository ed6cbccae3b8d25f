"""Bounded image codecs for the wire: frames and result PNGs, header checked before decoding.

Frames and result images come from a Redis anyone with write access can fill, so no decoder may
allocate for a size nobody checked: ``image_header`` reads the PNG IHDR / JPEG SOF (a few dozen
bytes), ``check_frame`` compares it with the declared size and a pixel limit, and every decoder
failure (cv2.error, MemoryError) comes back as a ``WireError`` the caller can dead-letter.
"""

from __future__ import annotations

import re
import struct
import zlib

import cv2
import numpy as np

from pipeline.core.wire import FRAME_ENCODINGS, FrameMessage, WireError

#: default pixel limit of a frame (or result PNG): the header is checked before any decoder runs
MAX_FRAME_PIXELS = 40_000_000
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_MAX_CHUNKS = 100_000  # OpenCV/libpng write 8 kB IDATs: 800 MB; junk chunks cost CPU


class ImageTooLargeError(WireError):
    """An image whose header declares more pixels than allowed (dead-lettered as ``oversize``)."""


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
