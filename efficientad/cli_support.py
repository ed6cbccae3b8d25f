"""The one helper module of the CLI layer: exit codes, errors, argument types, config, Redis.

Every command module has ``register(sub)`` and handlers that return an exit code. A handler that
cannot go on raises ``CommandError`` (or calls ``fail``): ``add_command`` wraps every handler so
the message is printed as ``efficientad <command>: <message>`` and its code returned, whether the
command runs from ``efficientad.cli.main`` or is called directly by a test.

Exit codes (defined in ``pipeline.core.lifecycle``, where the supervisor reads them too): 0 done,
1 runtime failure (Redis unreachable, a run that failed its own check), 2 bad input or
configuration (also a Redis user without a permission of its role: a restart cannot fix it, so
``efficientad run`` does not restart such a child), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import yaml

from models.model_card import DEFAULT_IMAGE_SIZE, check_image_size
from pipeline.core.config import ConfigError, LineConfig
from pipeline.core.config_loader import REDIS_URL_ENV, deep_merge, expand_dotted, load_config
from pipeline.core.health import HEARTBEAT, Heartbeat, redis_ready_check, start_metrics_server
from pipeline.core.lifecycle import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from pipeline.core.logs import setup_logging
from pipeline.core.redis_conn import (
    RedisPermissionError,
    RedisUnavailableError,
    RedisVersionError,
    connect,
    is_permission_error,
    stall_limit_s,
)

if TYPE_CHECKING:
    import redis

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "Handler",
    "acl_denials",
    "add_bench_command",
    "add_command",
    "add_config_arguments",
    "basic_logging",
    "command_group",
    "config_from_args",
    "connect_redis",
    "fail",
    "image_size",
    "load_command_config",
    "model_image_size",
    "non_negative_int",
    "notice",
    "octal_mode",
    "positive_float",
    "positive_int",
    "roi",
    "run_bench",
    "select_cameras",
    "serve_stage",
    "settings_from_args",
    "stage_heartbeat",
    "stop_on_signals",
    "write_json",
]

Handler = Callable[[argparse.Namespace], int]
S = TypeVar("S")
Subparsers = argparse._SubParsersAction  # the type argparse gives ``add_subparsers``

log = logging.getLogger("efficientad")


# ------------------------------------------------------------------------------- errors


class CommandError(Exception):
    """Why a command stops, and the exit code it stops with (bad input by default)."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Stop the running command: ``efficientad <command>: message`` on stderr, exit ``code``."""
    raise CommandError(message, code)


def notice(command: str, message: str) -> None:
    """A line for the person at the terminal that is not an error (stderr, like errors)."""
    print(f"efficientad {command}: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------- commands


def add_command(
    sub: Subparsers[Any],
    name: str,
    handler: Handler,
    *,
    help: str,
    description: str | None = None,
    prog_name: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand whose handler's ``CommandError`` becomes a message and an exit code.

    ``prog_name`` is how messages name the command (``bench pipeline``); default ``name``.
    """
    parser = sub.add_parser(name, help=help, description=description or help)
    shown = prog_name or name

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args) or EXIT_OK)
        except CommandError as exc:
            notice(shown, str(exc))
            return exc.code

    parser.set_defaults(func=run)
    return parser


def command_group(
    sub: Subparsers[Any], name: str, *, help: str, description: str
) -> Subparsers[Any]:
    """The subcommands of ``efficientad <name>`` (``bench model``, ``bench pipeline``).

    Modules in different layers add to one group: the first call creates it, later calls get
    the same one. The group alone prints its help and exits 2.
    """
    existing = sub.choices.get(name)
    if existing is not None:
        return existing._efficientad_group  # type: ignore[attr-defined,no-any-return]
    parser = sub.add_parser(name, help=help, description=description)
    group = parser.add_subparsers(dest=f"{name}_command", metavar="WHAT")
    parser.set_defaults(func=lambda _args: parser.print_help() or EXIT_USAGE)
    parser._efficientad_group = group  # type: ignore[attr-defined]
    return group


def add_bench_command(
    sub: Subparsers[Any], name: str, handler: Handler, *, help: str, description: str
) -> argparse.ArgumentParser:
    """``efficientad bench <name>``: the speed benches share one group (accuracy is
    ``efficientad accuracy``) and the options ``--json`` (no progress lines) and ``--out``."""
    group = command_group(
        sub,
        "bench",
        help="throughput/latency benchmarks: the streaming pipeline and the bare model",
        description="Speed benchmarks that print JSON: `bench pipeline` and `bench model` "
        "(accuracy: `efficientad accuracy`).",
    )
    parser = add_command(
        group, name, handler, help=help, description=description, prog_name=f"bench {name}"
    )
    parser.add_argument("--json", action="store_true", help="JSON only (no progress lines)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    return parser


def run_bench(
    bench: Callable[..., dict[str, Any]],
    settings_cls: type[Any],
    args: argparse.Namespace,
    **overrides: Any,
) -> int:
    """A bench command's body: its settings from the options (``settings_from_args``), progress
    on stderr unless --json, the report as JSON on stdout (and in --out); bad settings exit 2,
    a run that failed its own check (``ok`` false) exits 1."""
    from models.speed_bench import BenchError

    basic_logging(logging.WARNING)
    settings = settings_from_args(settings_cls, args, **overrides)
    try:
        report = bench(settings, progress=None if args.json else sys.stderr)
    except BenchError as exc:
        fail(str(exc))
    print(json.dumps(report, indent=2), flush=True)
    if args.out is not None:
        write_json(args.out, report)
    return EXIT_OK if report["ok"] else EXIT_FAILURE


def basic_logging(level: int = logging.INFO) -> None:
    """Plain log lines on stderr unless a command (or ``main``) configured logging already."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ------------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def image_size(text: str) -> tuple[int, int]:
    """``256`` or ``256x320`` (height x width), any positive size (synthetic images)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}")
    return parts[0], parts[1]


def model_image_size(text: str) -> tuple[int, int]:
    """``image_size`` that a model can run at (the model card's rule: each side 256-4096)."""
    height, width = image_size(text)
    try:
        return check_image_size(height, width)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def roi(text: str) -> tuple[int, int, int, int]:
    """``x,y,w,h`` in source pixels."""
    try:
        x, y, w, h = (int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected x,y,w,h integers") from None
    return x, y, w, h


def octal_mode(text: str) -> int:
    """A file mode such as ``600`` or ``0644``."""
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an octal mode, e.g. 600") from None


# ------------------------------------------------------------------------------- configuration


def settings_from_args(cls: type[S], args: argparse.Namespace, **overrides: Any) -> S:
    """A settings dataclass from the options named like its fields, plus ``overrides`` for the
    ones that are not a plain copy: a command's options are its settings, mapped once here."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {unknown}")
    values = {name: value for name, value in vars(args).items() if name in names}
    return cls(**{**values, **overrides})


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--redis-url``, ``--key-prefix``, ``--set``, logging and metrics flags."""
    group = parser.add_argument_group("configuration")
    group.add_argument(
        "--config", "-c", type=Path, default=None, help="line config YAML (see configs/line.yaml)"
    )
    group.add_argument(
        "--redis-url", default=None, help=f"Redis URL (overrides config and ${REDIS_URL_ENV})"
    )
    group.add_argument("--key-prefix", default=None, help="prefix of every Redis key")
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set worker.batch_size=16 (YAML value syntax)",
    )
    group.add_argument(
        "--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper
    )
    group.add_argument("--json-logs", action="store_true", default=None, help="JSON-line logs")
    group.add_argument(
        "--metrics-port", type=int, default=None, help="Prometheus/health port (0 = any free)"
    )
    group.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")


def config_from_args(
    args: argparse.Namespace, overrides: Mapping[str, Any] | None = None
) -> LineConfig:
    """Load the config named by ``args`` and apply the flags of ``add_config_arguments``."""
    flat: dict[str, Any] = {}
    for item in getattr(args, "overrides", None) or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. worker.batch_size=16")
        try:
            flat[key.strip()] = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
    if getattr(args, "redis_url", None):
        flat["redis.url"] = args.redis_url
    if getattr(args, "key_prefix", None) is not None:
        flat["redis.key_prefix"] = args.key_prefix
    if getattr(args, "log_level", None):
        flat["logging.level"] = args.log_level
    if getattr(args, "json_logs", None):
        flat["logging.json_logs"] = True
    if getattr(args, "metrics_port", None) is not None:
        flat["metrics.port"] = args.metrics_port
    if getattr(args, "no_metrics", False):
        flat["metrics.enabled"] = False
    merged = deep_merge(expand_dotted(flat), expand_dotted(dict(overrides or {})))
    return load_config(getattr(args, "config", None), merged)


def load_command_config(
    args: argparse.Namespace,
    overrides: Mapping[str, Any] | None = None,
    *,
    metrics: bool = True,
) -> LineConfig:
    """``config_from_args`` for a command; sets up logging as configured.

    A bad config is a ``CommandError`` (exit 2). ``metrics=False``: a terminal tool or file
    generator that never serves the metrics port.
    """
    if not metrics:
        args.no_metrics = True
    try:
        config = config_from_args(args, overrides)
    except ConfigError as exc:
        fail(str(exc))
    setup_logging(config.logging.level, config.logging.json_logs)
    return config


def select_cameras(config: LineConfig, wanted: Sequence[str]) -> list[str]:
    """The cameras a stage serves: ``wanted`` (``--camera``), or every configured one."""
    known = config.camera_ids()
    if not known:
        fail("the config has no cameras")
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        fail(f"unknown --camera {unknown} (have {known})")
    return list(wanted) or known


# ------------------------------------------------------------------------------- Redis


def connect_redis(config: LineConfig, client_name: str, *, check: bool = True) -> redis.Redis:
    """``connect`` for a command: bad configuration exits 2, an unreachable server exits 1.

    A missing URL, a refused ACL permission (NOPERM) or an unreadable password file cannot be
    fixed by a restart (2); a server that is down or too old might be fixed meanwhile (1).
    """
    try:
        return connect(config.redis, check=check, client_name=client_name)
    except (RedisPermissionError, ConfigError) as exc:
        fail(str(exc))
    except (RedisUnavailableError, RedisVersionError) as exc:
        fail(str(exc), EXIT_USAGE if not config.redis.url else EXIT_FAILURE)


def stage_heartbeat(config: LineConfig) -> Heartbeat:
    """The process heartbeat for /healthz, its limit above the longest legitimate Redis stall."""
    HEARTBEAT.min_limit_s = max(HEARTBEAT.min_limit_s, stall_limit_s(config.redis))
    return HEARTBEAT


@contextlib.contextmanager
def acl_denials() -> Iterator[None]:
    """A command Redis denies inside (NOPERM, also from a Lua script) ends the command with
    exit 2 and the role to fix: a missing permission is configuration, never a crash loop."""
    try:
        yield
    except Exception as exc:
        if is_permission_error(exc):
            fail(
                f"the Redis user lacks a permission ({exc}); give it the role's ACL "
                "(`efficientad redis-acl`, pipeline/core/acl.py)"
            )
        raise


@contextlib.contextmanager
def serve_stage(config: LineConfig, client: redis.Redis) -> Iterator[None]:
    """Run a long-lived stage: /metrics, /healthz, /readyz served, ACL denials as exit 2, the
    client closed after."""
    try:
        server = start_metrics_server(
            config.metrics, redis_ready_check(client), heartbeat=stage_heartbeat(config)
        )
    except OSError as exc:  # the port is taken
        client.close()
        fail(str(exc))
    try:
        with acl_denials():
            yield
    finally:
        if server is not None:
            server.close()
        client.close()


def stop_on_signals(stop: threading.Event) -> None:
    """SIGINT/SIGTERM set ``stop``: the command finishes what it holds and exits 0."""

    def handler(signum: int, _frame: object) -> None:
        log.info("signal received, stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# ------------------------------------------------------------------------------- output


def write_json(path: Path, payload: Any) -> None:
    """``payload`` as indented JSON (parent folders created), for ``--json FILE`` options."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
