"""``efficientad alarms``: follow alarm events in a terminal (lines or JSON), optionally save them.

Exit codes: 0 done (count reached, idle timeout, Ctrl-C, closed pipe), 1 Redis unreachable,
2 bad configuration or a Redis user without the subscriber's permissions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from efficientad.cli_support import (
    EXIT_OK,
    acl_denials,
    add_command,
    add_config_arguments,
    connect_redis,
    load_command_config,
)

__all__ = ["cmd_alarms", "register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``alarms`` to the ``efficientad`` CLI."""
    al = add_command(
        sub,
        "alarms",
        cmd_alarms,
        help="follow alarm events (human-readable or JSON lines)",
        description="Print alarm events as they arrive; optionally save masks and overlays.",
    )
    add_config_arguments(al)
    al.add_argument("--camera", default=None, help="follow one camera only")
    al.add_argument(
        "--from",
        dest="start",
        default="$",
        metavar="ID",
        help="'$' = new events only (default), '0' = all retained, or an entry id to resume after",
    )
    al.add_argument("--json", action="store_true", help="one JSON object per line")
    al.add_argument("--save-dir", type=Path, default=None, help="write masks/overlays/JSON here")
    al.add_argument("--count", type=int, default=None, help="exit after this many events")
    al.add_argument(
        "--timeout", type=float, default=None, help="exit after this many seconds without events"
    )


def cmd_alarms(args: argparse.Namespace) -> int:
    from pipeline.stages.subscribe import print_alarms

    config = load_command_config(args, metrics=False)  # a terminal tool: no HTTP port
    client = connect_redis(config, "alarms-cli")
    try:
        with acl_denials():
            print_alarms(
                client,
                config.keys,
                cam=args.camera,
                start=args.start,
                as_json=args.json,
                save_dir=args.save_dir,
                count=args.count,
                idle_timeout_s=args.timeout,
            )
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `efficientad alarms | head`
        sys.stderr.close()
    finally:
        client.close()
    return EXIT_OK
