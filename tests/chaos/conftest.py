"""Fixtures of the chaos suite, the per-scenario figure lines, and which scenarios run by default.

- ``chaos_frameset`` (session): the scored frame pool and a model copy whose threshold makes
  alarms happen (see ``frameset``); built once from ``tiny_model_dir``.
- ``chaos``: builds ``ChaosLine``s for one scenario and finishes them (drain, SIGTERM, verify,
  one line of figures); whatever still runs is killed at teardown.
- Slow scenarios (``@pytest.mark.slow``) are skipped unless ``-m`` names ``chaos`` (``make chaos``)
  or ``EFFICIENTAD_CHAOS=1``; the fast ones also run in ``make test``.
- Figures: one line per scenario in the terminal summary, and JSON lines appended to
  ``$EFFICIENTAD_CHAOS_REPORT`` (default ``<pytest basetemp>/chaos-report.jsonl``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.frameset import FrameSet, build_frameset
from tests.chaos.harness import ChaosLine, redis_server_binary
from tests.chaos.verify import Verdict, verify

CHAOS_DIR = Path(__file__).resolve().parent
RECORDS = pytest.StashKey[list[Verdict]]()
REPORT_PATH = pytest.StashKey[Path]()


def _run_slow(config: pytest.Config) -> bool:
    marks = config.getoption("markexpr", default="") or ""
    return "chaos" in marks or os.environ.get("EFFICIENTAD_CHAOS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _run_slow(config):
        return
    skip = pytest.mark.skip(
        reason="slow chaos scenario: run `make chaos` (pytest -m chaos) or set EFFICIENTAD_CHAOS=1"
    )
    for item in items:
        if CHAOS_DIR in Path(item.path).parents and item.get_closest_marker("slow"):
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RECORDS] = []


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    records = config.stash.get(RECORDS, [])
    if not records:
        return
    terminalreporter.section("chaos figures")
    for verdict in records:
        terminalreporter.write_line(verdict.line())
    path = config.stash.get(REPORT_PATH, None)
    if path is not None:
        terminalreporter.write_line(f"(JSON lines: {path})")


def _report_path(config: pytest.Config, factory: pytest.TempPathFactory) -> Path:
    if REPORT_PATH not in config.stash:
        env = os.environ.get("EFFICIENTAD_CHAOS_REPORT")
        config.stash[REPORT_PATH] = (
            Path(env) if env else factory.getbasetemp() / "chaos-report.jsonl"
        )
    return config.stash[REPORT_PATH]


@pytest.fixture(scope="session")
def chaos_frameset(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FrameSet:
    return build_frameset(tiny_model_dir, tmp_path_factory.mktemp("chaos_frames"))


class ChaosRun:
    """One scenario: its lines, its finish (drain, stop, verify, report, assert)."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path, frames: FrameSet) -> None:
        self.request = request
        self.tmp_path = tmp_path
        self.frames = frames
        self.scenario = request.node.name.removeprefix("test_")
        self.lines: list[ChaosLine] = []
        self.t0 = time.monotonic()

    def line(self, cameras: dict[str, Path] | None = None, **kwargs: Any) -> ChaosLine:
        cameras = cameras or {"cam-a": self.frames.folder(24)}
        line = ChaosLine(
            self.tmp_path / f"line{len(self.lines) or ''}",
            self.scenario,
            self.frames.model_dir,
            cameras,
            **kwargs,
        )
        self.lines.append(line)
        return line

    def finish(self, line: ChaosLine, drain_timeout_s: float = 90.0) -> Verdict:
        """Wait for the drain, SIGTERM everything, verify from Redis, report; fails the test
        with every failed check (and the processes' last log lines)."""
        drained = line.wait_drained(drain_timeout_s)
        line.stop_all()
        verdict = verify(line, drained=drained, wall_s=time.monotonic() - self.t0)
        config = self.request.config
        config.stash[RECORDS].append(verdict)
        path = _report_path(config, self.request.getfixturevalue("tmp_path_factory"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:
            out.write(json.dumps(verdict.record(), default=str) + "\n")
        print(verdict.line())
        assert verdict.ok, verdict.message()
        return verdict

    def close(self) -> None:
        for line in self.lines:
            line.close()


@pytest.fixture
def chaos(
    request: pytest.FixtureRequest, tmp_path: Path, chaos_frameset: FrameSet
) -> Iterator[ChaosRun]:
    try:
        redis_server_binary()
    except FileNotFoundError as exc:
        pytest.skip(f"chaos suite needs a redis-server binary: {exc}")
    run = ChaosRun(request, tmp_path, chaos_frameset)
    try:
        yield run
    finally:
        run.close()
