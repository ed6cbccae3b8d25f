"""Supervised child processes: start, watch, restart with backoff, stop in role order.

Children are separate ``python -m efficientad.cli <stage>`` processes rather than multiprocessing
workers: each one is exactly what an operator would start by hand on another host (one code path to
test), a crash in native code (FFmpeg, CUDA) takes down only that child, signals and exit codes work
per process, and nothing (models, sockets, CUDA contexts) is pickled or inherited across a fork.

A child that exits is restarted with exponential backoff (reset after ``stable_after_s`` of
uptime); exit code 0 of a finite child (a replay capture) means "done" and exit code 2
(``EXIT_USAGE``) means "bad configuration", which stops the line instead of looping.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pipeline.core.config import RunSettings
from pipeline.core.lifecycle import EXIT_OK, EXIT_USAGE, die_with_parent
from pipeline.core.logs import PROCESS_NAME_ENV
from pipeline.core.metrics import PROCESS_RESTARTS
from pipeline.core.status import StatusEvent

__all__ = ["ChildSpec", "Role", "Supervisor", "child_command"]

log = logging.getLogger(__name__)

Role = Literal["capture", "worker", "publisher", "other"]
_STOP_ORDER: tuple[Role, ...] = ("capture", "worker", "publisher", "other")


def child_command(*args: str) -> list[str]:
    """The argv of a CLI subcommand run with this interpreter (venvs and containers alike)."""
    return [sys.executable, "-m", "efficientad.cli", *args]


@dataclass
class ChildSpec:
    """One supervised process."""

    name: str
    argv: list[str]
    role: Role = "other"
    env: dict[str, str] = field(default_factory=dict)
    finite: bool = False  # exit code 0 means "done" (replay capture), not "restart me"
    env_unset: tuple[str, ...] = ()  # inherited variables to drop (case-insensitive)


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    delay: float = 0.0
    next_start: float = 0.0
    restarts: int = 0
    done: bool = False  # finished for good (finite and exit 0, or given up)
    last_code: int | None = None


class Supervisor:
    """Starts, watches and restarts child processes; stops them in role order."""

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        settings: RunSettings,
        *,
        on_event: Callable[[StatusEvent], None] | None = None,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self.settings = settings
        self.children = [_Child(spec) for spec in specs]
        self.on_event = on_event
        self.fatal: str | None = None  # set when a child reported a configuration error

    # ---------------------------------------------------------------- lifecycle of one child
    def _spawn(self, child: _Child) -> None:
        env = {**os.environ, PROCESS_NAME_ENV: child.spec.name, "PYTHONUNBUFFERED": "1"}
        unset = {name.upper() for name in child.spec.env_unset}
        env = {k: v for k, v in env.items() if k.upper() not in unset}
        env.update(child.spec.env)
        child.proc = subprocess.Popen(
            child.spec.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        child.started_at = time.monotonic()
        log.info("started", extra={"child": child.spec.name, "pid": child.proc.pid})
        self._event("process.started", child, "")

    def _event(self, kind: str, child: _Child, reason: str) -> None:
        if self.on_event is None:
            return
        with contextlib.suppress(Exception):
            self.on_event(
                StatusEvent(
                    event=kind,  # type: ignore[arg-type]
                    source="run",
                    reason=reason,
                    detail={
                        "child": child.spec.name,
                        "role": child.spec.role,
                        "pid": child.proc.pid if child.proc else None,
                        "restarts": child.restarts,
                        "exit_code": child.last_code,
                    },
                )
            )

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def poll(self, stopping: bool = False) -> None:
        """Reap exited children and (unless ``stopping``) restart them when their delay is up."""
        now = time.monotonic()
        for child in self.children:
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                child.last_code = proc.returncode
                child.proc = None
                uptime = now - child.started_at
                if child.spec.finite and proc.returncode == EXIT_OK:
                    child.done = True
                    log.info("finished", extra={"child": child.spec.name})
                    self._event("process.exited", child, "finished")
                    continue
                if stopping:
                    continue
                if proc.returncode == EXIT_USAGE:
                    child.done = True
                    self.fatal = (
                        f"{child.spec.name} exited with code {EXIT_USAGE} "
                        "(configuration error, see its log); not restarting"
                    )
                    log.error(self.fatal)
                    self._event("process.exited", child, "configuration error")
                    continue
                if uptime >= self.settings.stable_after_s:
                    child.delay = 0.0
                child.delay = min(
                    max(child.delay * 2, self.settings.restart_initial_s),
                    self.settings.restart_max_s,
                )
                child.next_start = now + child.delay
                log.warning(
                    "exited, restarting",
                    extra={
                        "child": child.spec.name,
                        "exit_code": proc.returncode,
                        "uptime_s": round(uptime, 1),
                        "restart_in_s": round(child.delay, 2),
                    },
                )
                self._event("process.restarting", child, f"exit code {proc.returncode}")
            if (
                not stopping
                and self.fatal is None
                and child.proc is None
                and not child.done
                and now >= child.next_start
            ):
                child.restarts += 1
                PROCESS_RESTARTS.labels(child.spec.name).inc()
                self._spawn(child)

    def finished(self, role: Role) -> bool:
        """Every child of ``role`` exited for good (replay captures that reached their end)."""
        return all(c.done for c in self.children if c.spec.role == role)

    def running(self) -> list[str]:
        return [c.spec.name for c in self.children if c.proc is not None]

    def stop(self, roles: Sequence[Role] = _STOP_ORDER, timeout_s: float | None = None) -> None:
        """SIGTERM the children of each role in turn; SIGKILL what outlives the grace period."""
        grace = self.settings.stop_timeout_s if timeout_s is None else timeout_s
        for role in roles:
            group = [c for c in self.children if c.spec.role == role and c.proc is not None]
            for child in group:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            deadline = time.monotonic() + grace
            for child in group:
                proc = child.proc
                if proc is None:
                    continue
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("did not stop in time, killing", extra={"child": child.spec.name})
                    proc.kill()
                    proc.wait()
                child.last_code = proc.returncode
                child.proc = None
                child.done = True
                self._event("process.stopped", child, f"exit code {proc.returncode}")

    def kill_all(self) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.kill()
