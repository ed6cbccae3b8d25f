"""The CLI layer's one helper: errors become one line and an exit code, shared types and groups."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from efficientad.cli import COMMAND_MODULES, build_parser, main
from efficientad.cli_support import (
    EXIT_FAILURE,
    EXIT_USAGE,
    add_command,
    command_group,
    connect_redis,
    fail,
    model_image_size,
    settings_from_args,
)
from pipeline.core.config import LineConfig, RedisSettings


def test_a_failing_command_prints_one_line_and_returns_its_code(capsys) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()

    def handler(args: argparse.Namespace) -> int:
        fail("it cannot work", EXIT_FAILURE if args.soft else EXIT_USAGE)

    add_command(sub, "thing", handler, help="a thing").add_argument("--soft", action="store_true")
    args = parser.parse_args(["thing"])
    assert args.func(args) == EXIT_USAGE
    assert capsys.readouterr().err == "efficientad thing: it cannot work\n"
    args = parser.parse_args(["thing", "--soft"])
    assert args.func(args) == EXIT_FAILURE


def test_every_subcommand_has_help_and_the_bench_group_is_shared(capsys) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    names = set(sub.choices)
    assert {"train", "accuracy", "worker", "publish", "alarms", "run", "demo", "bench"} <= names
    assert "benchmark" not in names  # renamed: accuracy (quality) vs bench (speed)
    bench = command_group(sub, "bench", help="", description="")
    assert set(bench.choices) == {"model", "pipeline"}  # one group, filled from two layers
    assert len(COMMAND_MODULES) == len(set(COMMAND_MODULES))
    for name in sorted(names):
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0, name
    assert main(["bench"]) == EXIT_USAGE
    capsys.readouterr()


def test_model_image_size_follows_the_model_card() -> None:
    assert model_image_size("256x320") == (256, 320)
    assert model_image_size("512") == (512, 512)
    with pytest.raises(argparse.ArgumentTypeError, match="too small"):
        model_image_size("128")


@dataclass
class _Settings:
    frames: int = 1
    size: int = 2
    label: str = "x"


def test_settings_come_from_the_options_named_like_their_fields() -> None:
    args = argparse.Namespace(frames=5, size=7, json=True, func=print)
    assert settings_from_args(_Settings, args, label="y") == _Settings(5, 7, "y")
    with pytest.raises(TypeError, match="no fields"):
        settings_from_args(_Settings, args, nope=1)


def test_redis_errors_map_to_exit_codes() -> None:
    from efficientad.cli_support import CommandError

    with pytest.raises(CommandError) as missing:  # nothing configured: a config error
        connect_redis(LineConfig(), "t")
    assert missing.value.code == EXIT_USAGE and "no Redis URL" in str(missing.value)
    down = LineConfig(
        redis=RedisSettings(url="redis://127.0.0.1:1/0", retries=0, socket_connect_timeout_s=0.5)
    )
    with pytest.raises(CommandError) as unreachable:  # may come back: a runtime failure
        connect_redis(down, "t")
    assert unreachable.value.code == EXIT_FAILURE
