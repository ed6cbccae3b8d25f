"""Alarm episodes from per-frame results: the pure state machine the publisher runs per camera.

Per-frame thresholding spams operators; an alarm is an episode instead. It starts when ``k`` of
the last ``n`` frames are anomalous, ends after ``clear_after`` consecutive normal frames, and a
new one may not start until ``cooldown_s`` of capture time has passed since the last end.
``alarm.updated`` goes out only when the episode's peak got worse, at most once per
``update_interval_s``. All times are capture times, so a replay of the same results gives the same
events and the same alarm ids. No Redis here: the state goes to and from a JSON-able dict.

The window is ordered by arrival (the publisher feeds capture order), never by ``seq``: a camera
that restarts its numbering or a stray entry with an old ``seq`` must not break the rules.
``checkpoint``/``restore`` let the caller undo a frame whose processing failed half way, so a
failure can never leave a half-updated state behind to be persisted.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.core.image_codec import decode_result_png
from pipeline.core.stage_settings import AlarmSettings
from pipeline.core.wire import AlarmEvent, Region, ResultMessage, WireError

STATE_FORMAT = 2  # 1: window without arrival indices (still readable)


class IgnoreMask:
    """Image areas whose anomalies never count (a moving part, a label printer, a reflection).

    Non-zero pixels are ignored. The mask is drawn at any resolution and scaled (nearest) to the
    resolution of each result's anomaly map.
    """

    def __init__(self, mask: np.ndarray) -> None:
        if mask.ndim == 3:
            mask = mask.max(axis=2)
        if mask.ndim != 2 or mask.size == 0:
            raise ValueError(f"ignore mask must be a 2-D image, got shape {mask.shape}")
        self._mask = (mask > 0).astype(np.uint8)
        self._scaled: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def load(cls, path: str | Path) -> IgnoreMask:
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ValueError(f"ignore_mask {str(path)!r}: not a readable image file")
        return cls(img)

    def at(self, height: int, width: int) -> np.ndarray:
        """Boolean mask (True = ignored) at the given resolution."""
        key = (height, width)
        if key not in self._scaled:
            scaled = cv2.resize(self._mask, (width, height), interpolation=cv2.INTER_NEAREST)
            self._scaled[key] = scaled.astype(bool)
        return self._scaled[key]

    def filter(self, result: ResultMessage) -> tuple[bool, list[Region]]:
        """(anomalous, counted regions) after dropping anomalies that lie fully in ignored areas."""
        if not result.anomalous:
            return False, list(result.regions)
        ignored = self.at(result.map_h, result.map_w)
        if result.mask:
            try:
                pixels = decode_result_png(result.mask, ignored.shape, field="mask")
            except WireError:
                pixels = None  # an unreadable mask: judge by the region boxes instead
            if pixels is not None:
                return self._filter_by_pixels(result, pixels > 0, ignored)
        if result.regions:
            kept = [
                r for r in result.regions if not ignored[r.y : r.y + r.h, r.x : r.x + r.w].all()
            ]
            return bool(kept), kept
        return True, []  # anomalous but nothing to locate it by: cannot prove it is ignorable

    @staticmethod
    def _filter_by_pixels(
        result: ResultMessage, anomalous_px: np.ndarray, ignored: np.ndarray
    ) -> tuple[bool, list[Region]]:
        counted_px = anomalous_px & ~ignored
        kept = [r for r in result.regions if counted_px[r.y : r.y + r.h, r.x : r.x + r.w].any()]
        return bool(counted_px.any()), kept


@dataclass(frozen=True)
class AlarmTransition:
    """An event to emit plus the peak frame's result (its mask and overlay go into the event)."""

    event: AlarmEvent
    peak: ResultMessage


@dataclass(frozen=True)
class _Observed:
    """What the k-of-n window remembers of one frame; ``index`` counts frames in arrival order."""

    index: int
    anomalous: bool
    seq: int
    ts_ns: int
    frame_id: str


@dataclass(frozen=True)
class _Checkpoint:
    observed: int
    window: tuple[_Observed, ...]
    window_hits: tuple[tuple[int, ResultMessage], ...]
    cooldown_until_ns: int
    alarm: str | None  # JSON: a deep copy that cannot alias the live dict
    peak: ResultMessage | None
    peak_regions: tuple[Region, ...]


class AlarmStateMachine:
    """Per-camera alarm logic; feed results in capture order with ``observe``."""

    def __init__(
        self, cam: str, settings: AlarmSettings, ignore_mask: IgnoreMask | None = None
    ) -> None:
        self.cam = cam
        self.settings = settings
        self.ignore_mask = ignore_mask
        if ignore_mask is None and settings.ignore_mask is not None:
            self.ignore_mask = IgnoreMask.load(settings.ignore_mask)
        self._window: deque[_Observed] = deque(maxlen=settings.n)
        self._observed = 0  # frames seen so far: the arrival index of the next one
        # (arrival index, result) of anomalous frames still inside the window, so a start can
        # report its true peak
        self._window_hits: list[tuple[int, ResultMessage]] = []
        self._cooldown_until_ns = 0
        self._alarm: dict[str, Any] | None = None
        self._peak: ResultMessage | None = None
        self._peak_regions: list[Region] = []

    # ----------------------------------------------------------------------------------- API

    @property
    def active(self) -> bool:
        return self._alarm is not None

    @property
    def alarm_id(self) -> str | None:
        return self._alarm["alarm_id"] if self._alarm else None

    def counts(self, result: ResultMessage) -> tuple[bool, list[Region]]:
        """Whether a result counts as anomalous here, and its counted regions."""
        if self.ignore_mask is None:
            return result.anomalous, list(result.regions)
        return self.ignore_mask.filter(result)

    def observe(self, result: ResultMessage) -> list[AlarmTransition]:
        """Advance by one frame; returns the events this frame causes (zero or one)."""
        if result.cam != self.cam:
            raise ValueError(f"result for camera {result.cam!r} fed to machine of {self.cam!r}")
        anomalous, regions = self.counts(result)
        index = self._observed
        self._observed += 1
        self._window.append(_Observed(index, anomalous, result.seq, result.ts_ns, result.frame_id))
        oldest = self._window[0].index
        self._window_hits = [(i, r) for i, r in self._window_hits if i >= oldest]
        if anomalous:
            self._window_hits.append((index, result))
        if self._alarm is None:
            return self._maybe_start(result)
        return self._advance(result, anomalous, regions)

    def checkpoint(self) -> _Checkpoint:
        """A cheap snapshot that ``restore`` returns to (results are immutable, so no copies)."""
        return _Checkpoint(
            observed=self._observed,
            window=tuple(self._window),
            window_hits=tuple(self._window_hits),
            cooldown_until_ns=self._cooldown_until_ns,
            alarm=json.dumps(self._alarm) if self._alarm is not None else None,
            peak=self._peak,
            peak_regions=tuple(self._peak_regions),
        )

    def restore(self, point: _Checkpoint) -> None:
        self._observed = point.observed
        self._window = deque(point.window, maxlen=self.settings.n)
        self._window_hits = list(point.window_hits)
        self._cooldown_until_ns = point.cooldown_until_ns
        self._alarm = json.loads(point.alarm) if point.alarm is not None else None
        self._peak = point.peak
        self._peak_regions = list(point.peak_regions)

    # ------------------------------------------------------------------------------ internals

    def _maybe_start(self, result: ResultMessage) -> list[AlarmTransition]:
        hits = [o for o in self._window if o.anomalous]
        if len(hits) < self.settings.k or result.ts_ns < self._cooldown_until_ns:
            return []
        first = hits[0]
        in_episode = [o for o in self._window if o.index >= first.index]
        frame_ids = [o.frame_id for o in hits]
        # the window's hits are in _window_hits (same indices); a state restored from an old
        # format may lack some, and then the frame at hand stands in rather than failing
        peak = max([r for _, r in self._window_hits] or [result], key=lambda r: r.score)
        self._alarm = {
            "alarm_id": f"{self.cam}-{first.frame_id}",
            "started_ns": first.ts_ns,
            "frame_count": len(in_episode),
            "anomalous_count": len(hits),
            "frame_ids": frame_ids[: self.settings.max_frame_ids],
            "frame_ids_truncated": len(frame_ids) > self.settings.max_frame_ids,
            "normal_streak": 0,
            "last_event_ns": result.ts_ns,
            "peak_dirty": False,
        }
        self._set_peak(peak, self.counts(peak)[1])
        self._window_hits = []
        return [self._transition("alarm.started", result)]

    def _advance(
        self, result: ResultMessage, anomalous: bool, regions: list[Region]
    ) -> list[AlarmTransition]:
        alarm = self._alarm
        assert alarm is not None
        alarm["frame_count"] += 1
        if anomalous:
            alarm["normal_streak"] = 0
            alarm["anomalous_count"] += 1
            if len(alarm["frame_ids"]) < self.settings.max_frame_ids:
                alarm["frame_ids"].append(result.frame_id)
            else:
                alarm["frame_ids_truncated"] = True
            assert self._peak is not None
            if result.score > self._peak.score:
                self._set_peak(result, regions)
                alarm["peak_dirty"] = True
        else:
            alarm["normal_streak"] += 1
        if alarm["normal_streak"] >= self.settings.clear_after:
            transition = self._transition("alarm.ended", result)
            self._end(result)
            return [transition]
        interval_ns = int(self.settings.update_interval_s * 1e9)
        if alarm["peak_dirty"] and result.ts_ns - alarm["last_event_ns"] >= interval_ns:
            alarm["peak_dirty"] = False
            alarm["last_event_ns"] = result.ts_ns
            return [self._transition("alarm.updated", result)]
        return []

    def _end(self, result: ResultMessage) -> None:
        self._alarm = None
        self._peak = None
        self._peak_regions = []
        self._window.clear()  # a new episode needs k fresh hits, not leftovers of this one
        self._window_hits = []
        self._cooldown_until_ns = result.ts_ns + int(self.settings.cooldown_s * 1e9)

    def _set_peak(self, result: ResultMessage, regions: list[Region]) -> None:
        self._peak = result
        self._peak_regions = regions

    def _transition(self, kind: str, result: ResultMessage) -> AlarmTransition:
        alarm, peak = self._alarm, self._peak
        assert alarm is not None and peak is not None
        ended = kind == "alarm.ended"
        event = AlarmEvent(
            type=kind,
            alarm_id=alarm["alarm_id"],
            cam=self.cam,
            ts_ns=result.ts_ns,
            started_ns=alarm["started_ns"],
            ended_ns=result.ts_ns if ended else None,
            duration_s=max(0.0, (result.ts_ns - alarm["started_ns"]) / 1e9),
            frame_id=result.frame_id,
            seq=result.seq,
            score=result.score,
            score_norm=result.score_norm,
            peak_score=peak.score,
            peak_score_norm=peak.score_norm,
            peak_frame_id=peak.frame_id,
            peak_seq=peak.seq,
            threshold=peak.threshold,
            frame_count=alarm["frame_count"],
            anomalous_count=alarm["anomalous_count"],
            frame_ids=list(alarm["frame_ids"]),
            frame_ids_truncated=alarm["frame_ids_truncated"],
            model=peak.model,
            model_version=peak.model_version,
            model_sha256=peak.model_sha256,
            regions=self._peak_regions,
            frame_w=peak.frame_w,
            frame_h=peak.frame_h,
            map_w=peak.map_w,
            map_h=peak.map_h,
            mask=peak.mask,
        )
        return AlarmTransition(event=event, peak=peak)

    # -------------------------------------------------------------------------- persistence

    def to_dict(self) -> dict[str, Any]:
        """JSON-able snapshot; ``from_dict`` with the same settings continues exactly here."""
        return {
            "format": STATE_FORMAT,
            "cam": self.cam,
            "observed": self._observed,
            "window": [[o.index, o.anomalous, o.seq, o.ts_ns, o.frame_id] for o in self._window],
            "window_hits": [[i, r.model_dump_json()] for i, r in self._window_hits],
            "cooldown_until_ns": self._cooldown_until_ns,
            "alarm": json.loads(json.dumps(self._alarm)) if self._alarm else None,
            "peak": self._peak.model_dump_json() if self._peak else None,
            "peak_regions": [r.model_dump() for r in self._peak_regions],
        }

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        settings: AlarmSettings,
        ignore_mask: IgnoreMask | None = None,
    ) -> AlarmStateMachine:
        version = data.get("format")
        if version not in (1, STATE_FORMAT):
            raise ValueError(f"alarm state format {version!r} is not 1..{STATE_FORMAT}")
        machine = cls(str(data["cam"]), settings, ignore_mask)
        if version == 1:  # no arrival indices: number the window, match hits by frame id
            rows = data.get("window", [])
            window = [[i, *row] for i, row in enumerate(rows)]
            index_of = {str(row[4]): row[0] for row in window}
            hits = [ResultMessage.model_validate_json(r) for r in data.get("window_hits", [])]
            machine._window_hits = [
                (index_of[r.frame_id], r) for r in hits if r.frame_id in index_of
            ]
            machine._observed = len(window)
        else:
            window = data.get("window", [])
            machine._window_hits = [
                (int(i), ResultMessage.model_validate_json(r))
                for i, r in data.get("window_hits", [])
            ]
            machine._observed = int(data.get("observed", 0))
        for index, anomalous, seq, ts_ns, frame_id in window:
            machine._window.append(
                _Observed(int(index), bool(anomalous), int(seq), int(ts_ns), str(frame_id))
            )
        machine._cooldown_until_ns = int(data.get("cooldown_until_ns", 0))
        machine._alarm = data.get("alarm")
        if data.get("peak"):
            machine._peak = ResultMessage.model_validate_json(data["peak"])
            machine._peak_regions = [Region.model_validate(r) for r in data["peak_regions"]]
        if (machine._alarm is None) != (machine._peak is None):
            raise ValueError("alarm state is inconsistent: an open alarm needs a peak frame")
        return machine
