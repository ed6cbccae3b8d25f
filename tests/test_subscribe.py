"""``efficientad alarms --save-dir``: event files stay inside the save directory, whatever the ids.

Camera and alarm ids come from a Redis stream anyone with write access can add to; before the fix
a ``cam`` or ``alarm_id`` with ``/`` or ``..`` wrote files outside the directory.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from pipeline.core.wire import AlarmEvent
from pipeline.stages.subscribe import AlarmRecord, print_alarms, safe_file_name, save_event_files
from pipeline.stages.subscribe.follow import MAX_FILE_NAME_CHARS
from tests import pipeline_support

client = pipeline_support.client  # fixtures: real Redis, per-test key prefix
keys = pipeline_support.keys


def event(cam: str = "cam1", alarm_id: str = "cam1-1-0", **kw) -> AlarmEvent:
    base = dict(
        type="alarm.started",
        alarm_id=alarm_id,
        cam=cam,
        ts_ns=5,
        started_ns=1,
        duration_s=0.0,
        score=2.0,
        peak_score=2.0,
        threshold=1.0,
        frame_count=3,
        mask=b"png",
        overlay=b"jpg",
    )
    return AlarmEvent(**{**base, **kw})


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


def test_plain_ids_keep_their_names(tmp_path):
    record = AlarmRecord(**event().model_dump(), stream_id="17-0")
    written = save_event_files(record, tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "cam1/cam1-1-0/17-0-started-mask.png",
        "cam1/cam1-1-0/17-0-started-overlay.jpg",
        "cam1/cam1-1-0/17-0-started.json",
    ]
    assert json.loads(written[-1].read_text())["alarm_id"] == "cam1-1-0"


@pytest.mark.parametrize(
    ("cam", "alarm_id"),
    [
        ("../../outside", "a"),
        ("cam1", "../../../outside"),
        ("/tmp", "abs"),
        ("..", ".."),
        (".", "x/../../y"),
        ("cam\\..\\..\\win", "a\x00b"),
        ("cam1", "x" * 5000),
    ],
)
def test_hostile_ids_cannot_leave_the_save_directory(tmp_path, cam, alarm_id):
    save_dir = tmp_path / "alarms"
    outside_before = files_under(tmp_path)
    record = AlarmRecord(**event(cam, alarm_id).model_dump(), stream_id="../../1-0")
    written = save_event_files(record, save_dir)
    assert len(written) == 3
    for path in written:
        resolved = path.resolve()
        assert resolved.is_relative_to(save_dir.resolve())
        assert len(resolved.relative_to(save_dir.resolve()).parts) == 3  # cam/alarm_id/file
        assert all(not part.startswith(".") for part in path.relative_to(save_dir).parts)
    assert files_under(tmp_path) - files_under(save_dir) == outside_before


def test_safe_names_are_bounded_and_keep_distinct_ids_apart():
    assert safe_file_name("cam_1.a-b") == "cam_1.a-b"
    names = {safe_file_name(t) for t in ("a/b", "a_b", "a\\b", "a..b", ".a.b", "..", ".")}
    assert len(names) == 7  # "a_b" stays as it is; every rewritten name carries a hash
    for text in ("..", ".", "../x", "/", "x" * 1000, "é" * 50):
        name = safe_file_name(text)
        assert name and not name.startswith(".") and ".." not in name and "/" not in name
        assert len(name) <= MAX_FILE_NAME_CHARS + 11


def test_a_symlink_planted_in_the_save_directory_is_refused(tmp_path):
    save_dir, elsewhere = tmp_path / "alarms", tmp_path / "elsewhere"
    save_dir.mkdir()
    elsewhere.mkdir()
    (save_dir / "cam1").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        save_event_files(AlarmRecord(**event().model_dump()), save_dir)
    assert files_under(elsewhere) == set()


def test_alarms_command_saves_hostile_events_inside_the_directory(client, keys, tmp_path):
    """The CLI path end to end: an event with a traversal cam read back from real Redis."""
    hostile = event("../../../escaped", "../../x")
    client.xadd(keys.alarms(), hostile.to_fields())
    out = io.StringIO()
    save_dir = tmp_path / "saved"
    shown = print_alarms(
        client, keys, start="0", as_json=True, save_dir=save_dir, count=1, idle_timeout_s=2, out=out
    )
    assert shown == 1
    saved = [Path(p) for p in json.loads(out.getvalue())["saved"]]
    assert len(saved) == 3 and all(p.resolve().is_relative_to(save_dir.resolve()) for p in saved)
    assert files_under(tmp_path) == files_under(save_dir)
