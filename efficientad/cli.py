"""The one ``efficientad`` command: a list of command modules, each adding its subcommands.

Each command's entry lives beside its stage or tool (a ``commands`` module); this list is the
only place that knows them all. Help lists them in this order: models, stages, tools.
"""

from __future__ import annotations

import argparse
import sys

from efficientad.cli_support import EXIT_INTERRUPTED, EXIT_USAGE, basic_logging
from models.commands import anomalib as anomalib_commands
from models.commands import evaluate as evaluate_commands
from models.commands import speed as speed_commands
from models.commands import train as train_commands
from models.version import __version__
from pipeline.stages.capture import commands as capture_commands
from pipeline.stages.publisher import commands as publisher_commands
from pipeline.stages.subscribe import commands as subscribe_commands
from pipeline.stages.supervisor import commands as supervisor_commands
from pipeline.tools import commands as tool_commands
from pipeline.tools.demo import commands as demo_commands
from worker import commands as worker_commands

COMMAND_MODULES = (
    train_commands,  # train, distill, probe-teacher
    anomalib_commands,  # import-anomalib
    evaluate_commands,  # eval, predict, accuracy
    capture_commands,  # capture
    worker_commands,  # worker
    publisher_commands,  # publish
    subscribe_commands,  # alarms
    supervisor_commands,  # run, redis, redis-acl
    demo_commands,  # demo, synth
    speed_commands,  # bench model
    tool_commands,  # bench pipeline
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efficientad",
        description="EfficientAD anomaly detection for production lines: train, evaluate, and "
        "serve as a streaming pipeline over Redis Streams.",
    )
    parser.add_argument("--version", action="version", version=f"efficientad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    basic_logging()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
