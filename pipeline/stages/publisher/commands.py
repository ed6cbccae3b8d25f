"""``efficientad publish``: the results publisher (run two for fail-over; leases decide).

Exit codes as every stage: 0 done (also after SIGTERM/SIGINT), 1 runtime failure, 2 bad
configuration (an unreadable ignore mask, a Redis user without the publisher's permissions).
"""

from __future__ import annotations

import argparse
from typing import Any

from efficientad.cli_support import (
    EXIT_OK,
    add_command,
    add_config_arguments,
    connect_redis,
    fail,
    load_command_config,
    select_cameras,
    serve_stage,
)

__all__ = ["cmd_publish", "register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``publish`` to the ``efficientad`` CLI."""
    pub = add_command(
        sub,
        "publish",
        cmd_publish,
        help="turn results into alarm episodes on the alarms streams",
        description=(
            "Own cameras through leases in Redis (one publisher per camera at a time; start a "
            "second one as a hot standby), order and de-duplicate results, run the alarm state "
            "machine and emit alarm.started / alarm.updated / alarm.ended events."
        ),
    )
    add_config_arguments(pub)
    pub.add_argument("--name", default=None, help="publisher name (default publisher-<host>)")
    pub.add_argument(
        "--camera", action="append", default=[], help="serve only this camera (repeatable)"
    )
    pub.add_argument(
        "--idle-exit", type=float, default=None, help="exit after this many seconds without work"
    )


def cmd_publish(args: argparse.Namespace) -> int:
    from pipeline.stages.publisher import AlarmPublisher

    overrides = {"publisher.consumer": args.name} if args.name else None
    config = load_command_config(args, overrides)
    cameras = select_cameras(config, args.camera)
    client = connect_redis(config, config.publisher.consumer_name())
    try:
        publisher = AlarmPublisher(
            client, config.keys, config.publisher, cameras, worker_group=config.worker.group
        )
    except ValueError as exc:  # e.g. an unreadable ignore mask
        client.close()
        fail(str(exc))
    publisher.install_signal_handlers()
    with serve_stage(config, client):
        publisher.run(idle_exit_s=args.idle_exit)
    return EXIT_OK
