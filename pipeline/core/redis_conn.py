"""Connecting to Redis the same way in every process.

``connect`` builds one ``redis.Redis`` from ``RedisSettings`` (redis://, rediss:// with CA and
client certificates, unix sockets, ACL user/password), with socket timeouts above every blocking
read, health checks on idle connections and retries with exponential backoff on connection
errors, and refuses servers older than 6.2 (XAUTOCLAIM, XPENDING IDLE, MINID/LIMIT needed).

A missing ACL permission (``NOPERM``) is a configuration error, not an outage: ``connect`` raises
``RedisPermissionError`` and the CLI commands exit with code 2 (``efficientad run`` does not restart
such a child); ``is_permission_error`` recognises it at runtime too (also inside Lua scripts).

The embedded redis-server for single-box runs is ``pipeline.core.embedded_redis``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from pipeline.core.config import RedisSettings

__all__ = [
    "MIN_REDIS_VERSION",
    "RedisPermissionError",
    "RedisUnavailableError",
    "RedisVersionError",
    "check_server_version",
    "connect",
    "ensure_group",
    "is_cluster",
    "is_permission_error",
    "redact_url",
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
        "pipeline/core/acl.py) or use the right redis.username"
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
