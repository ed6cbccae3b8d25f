"""The chaos checks themselves: a skipped result or a repeated start must be reported precisely."""

from __future__ import annotations

import pytest

from pipeline.core.stage_settings import AlarmSettings
from pipeline.core.wire import ResultMessage
from pipeline.stages.alarms import AlarmStateMachine
from tests.chaos.verify import _collapse, _first_difference

pytestmark = pytest.mark.chaos

SETTINGS = AlarmSettings(k=2, n=3, clear_after=3, cooldown_s=0.0, update_interval_s=0.0)


def _results(flags: list[bool]) -> list[ResultMessage]:
    return [
        ResultMessage(
            cam="c",
            frame_id=f"{1000 + i}-0",
            seq=i,
            ts_ns=i * 100_000_000,
            score=0.9 + i * 0.001 if hit else 0.1,
            score_norm=0.9 if hit else 0.1,
            anomalous=hit,
            threshold=0.5,
            model="m",
            map_w=8,
            map_h=8,
        )
        for i, hit in enumerate(flags)
    ]


def _events(results: list[ResultMessage]):
    machine = AlarmStateMachine("c", SETTINGS)
    return [t.event for r in results for t in machine.observe(r)]


def test_identical_streams_have_no_difference() -> None:
    results = _results([False, True, True, True, False, False, False])
    assert _first_difference(_events(results), _events(results)) is None


def test_a_skipped_result_is_named() -> None:
    results = _results([False, True, True, True, True, False, False, False])
    published = _events(results[:3] + results[4:])  # the publisher skipped seq 3 (a late result)
    text = _first_difference(published, _events(results))
    assert text is not None
    assert "frame_count" in text and "anomalous_count" in text and "1003-0" in text


def test_extra_and_missing_events_are_named() -> None:
    results = _results([False, True, True, False, False, False])
    events = _events(results)
    assert "first extra published event #3" in _first_difference(events + events[:1], events)
    assert "first missing event #2" in _first_difference(events[:1], events)


def test_injected_frames_collapse_in_the_figure_line() -> None:
    faults = ["inject normal seq=1 @1.0s", "inject png-bomb seq=2 @1.0s", "SIGKILL worker-0 @2.0s"]
    assert _collapse(faults) == ["XADD 2 frames (normal, png-bomb) @1.0s", "SIGKILL worker-0 @2.0s"]
