"""Capture: cameras, video files and image folders -> ``frames:{cam}`` in Redis.

``sources`` reads frames, ``writer`` moves encoded frames to Redis idempotently, ``camera`` runs
both for one camera (``run_capture``); ``commands`` is the ``efficientad capture`` command.
"""

from pipeline.stages.capture.camera import run_capture
from pipeline.stages.capture.sources import (
    IMAGE_SUFFIXES,
    FolderSource,
    LiveSource,
    RoiError,
    SourceError,
    VideoFileSource,
    crop_roi,
    open_source,
)
from pipeline.stages.capture.writer import CaptureStats

__all__ = [
    "IMAGE_SUFFIXES",
    "CaptureStats",
    "FolderSource",
    "LiveSource",
    "RoiError",
    "SourceError",
    "VideoFileSource",
    "crop_roi",
    "open_source",
    "run_capture",
]
