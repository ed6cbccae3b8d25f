"""The one ``efficientad`` command: each area registers its own subcommands."""

from __future__ import annotations

import argparse
import logging
import sys

from efficientad import __version__


def build_parser() -> argparse.ArgumentParser:
    from models import anomalib_cli, train_cli
    from models import cli as model_cli
    from pipeline import cli as pipeline_cli
    from pipeline import demo_cli
    from worker import cli as worker_cli

    parser = argparse.ArgumentParser(
        prog="efficientad",
        description="EfficientAD anomaly detection for production lines: train, evaluate, and "
        "serve as a streaming pipeline over Redis Streams.",
    )
    parser.add_argument("--version", action="version", version=f"efficientad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (train_cli, anomalib_cli, model_cli, pipeline_cli, worker_cli, demo_cli):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
