"""Line configuration: YAML, env overrides, CLI overrides, and errors that name field and value."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from efficientad.cli_support import add_config_arguments, config_from_args
from pipeline.core.config import CameraSettings, ConfigError, LineConfig
from pipeline.core.config_loader import load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "line.yaml"
    path.write_text(text)
    return path


def test_example_configs_are_valid() -> None:
    for name in ("line.yaml", "demo.yaml"):
        path = REPO / "configs" / name
        if not path.exists():
            continue
        config = load_config(path, environ={})
        assert isinstance(config, LineConfig)
    line = load_config(REPO / "configs" / "line.yaml", environ={})
    assert [c.id for c in line.cameras] == ["press-1", "belt-usb", "replay", "folder-loop"]
    assert line.cameras[0].roi == (320, 0, 1280, 1080)
    assert line.publisher.alarm_for("press-1").k == 2
    assert line.publisher.alarm_for("press-1").n == 5  # merged from the default alarm
    # every documented key is real: the example sets all of them explicitly
    assert line.worker.batch_size == 8 and line.redis.url is None


def test_defaults_without_file() -> None:
    config = load_config(None, environ={})
    assert config.redis.url is None
    assert config.cameras == []
    assert config.worker.batch_size == 8
    assert config.metrics.port == 9400
    assert config.keys.frames("a") == "frames:{a}"


def test_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
redis: {url: "redis://yaml:6379/0", key_prefix: "t:"}
worker: {batch_size: 4, max_wait_ms: 10}
cameras:
  - {id: cam1, source: /data/a.mp4, fps: 5}
""",
    )
    env = {
        "EFFICIENTAD__WORKER__BATCH_SIZE": "16",
        "efficientad__publisher__alarm__k": "2",  # case-insensitive
        "EFFICIENTAD_REDIS_URL": "redis://short-env:6379/0",
        "UNRELATED": "x",
    }
    config = load_config(path, environ=env)
    assert config.worker.batch_size == 16  # env beats YAML
    assert config.worker.max_wait_ms == 10  # untouched YAML key stays
    assert config.publisher.alarm.k == 2
    assert config.redis.url == "redis://short-env:6379/0"
    assert config.redis.key_prefix == "t:"
    assert config.keys.frames("cam1") == "t:frames:{cam1}"

    env["EFFICIENTAD__REDIS__URL"] = "redis://nested-env:6379/0"  # nested form wins
    assert load_config(path, environ=env).redis.url == "redis://nested-env:6379/0"

    config = load_config(path, {"worker.batch_size": 32, "redis": {"url": None}}, environ=env)
    assert config.worker.batch_size == 32  # overrides beat env
    assert config.redis.url is None


def test_env_json_for_lists(tmp_path: Path) -> None:
    env = {"EFFICIENTAD__CAMERAS": '[{"id": "c1", "source": 2, "roi": [1, 2, 3, 4]}]'}
    config = load_config(None, environ=env)
    cam = config.cameras[0]
    assert cam.source == "usb:2" and cam.source_kind == "usb" and cam.usb_index == 2
    assert cam.roi == (1, 2, 3, 4)


def test_real_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EFFICIENTAD__METRICS__PORT", "9555")
    assert load_config().metrics.port == 9555


def test_errors_name_field_and_value(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
worker: {batch_size: 0, batchsize: 3}
cameras:
  - {id: good, source: a.mp4}
  - {id: "bad cam", source: b.mp4, fps: -2, roi: [0, 0, 0, 10], encoding: gif}
redis: {url: "http://nope"}
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    text = str(info.value)
    assert str(path) in text
    assert "worker.batch_size: 0 -> Input should be greater than or equal to 1" in text
    assert "worker.batchsize: 3 -> unknown key" in text
    assert "cameras[1](id=bad cam).id: 'bad cam'" in text
    assert "cameras[1](id=bad cam).fps: -2" in text
    assert "cameras[1](id=bad cam).roi: [0, 0, 0, 10]" in text
    assert "cameras[1](id=bad cam).encoding: 'gif'" in text
    assert "redis.url: 'http://nope' -> must start with redis://" in text


def test_env_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"EFFICIENTAD__WORKER__BATCH_SIZE": "lots"})
    text = str(info.value)
    assert "worker.batch_size: 'lots'" in text
    assert "(from EFFICIENTAD__WORKER__BATCH_SIZE)" in text


def test_secrets_are_not_echoed() -> None:
    config = load_config(None, {"redis.password": "hunter2"}, environ={})
    assert "hunter2" not in repr(config)
    assert config.redis.resolved_password() == "hunter2"


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    config = load_config(None, {"redis.password_file": str(secret)}, environ={})
    assert config.redis.resolved_password() == "s3cret"
    missing = load_config(None, {"redis.password_file": str(tmp_path / "nope")}, environ={})
    with pytest.raises(ConfigError, match=r"redis\.password_file"):
        missing.redis.resolved_password()


def test_cross_checks() -> None:
    with pytest.raises(ConfigError, match="camera id 'a' is used twice"):
        load_config(
            None, {"cameras": [{"id": "a", "source": "x"}, {"id": "a", "source": "y"}]}, environ={}
        )
    with pytest.raises(ConfigError, match="uses model 'default', but models: only has"):
        load_config(
            None, {"models": {"m": "/x"}, "cameras": [{"id": "a", "source": "x"}]}, environ={}
        )
    with pytest.raises(ConfigError, match="per_camera names unknown cameras"):
        load_config(
            None,
            {"cameras": [{"id": "a", "source": "x"}], "publisher.per_camera": {"b": {"k": 1}}},
            environ={},
        )
    with pytest.raises(ConfigError, match="k=9 must not exceed n=5"):
        load_config(None, {"publisher": {"alarm": {"k": 9}}}, environ={})


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = write(tmp_path, "worker:\n  batch_size: [1,\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+: invalid YAML"):
        load_config(bad, environ={})
    scalar = write(tmp_path, "- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar, environ={})
    empty = write(tmp_path, "")
    assert load_config(empty, environ={}).cameras == []


def test_source_kinds(tmp_path: Path) -> None:
    def kind(source: object) -> str:
        return CameraSettings(id="c", source=source).source_kind  # type: ignore[arg-type]

    assert kind(0) == "usb"
    assert kind("usb:3") == "usb"
    assert kind("rtsp://user:pw@cam/stream") == "url"
    assert kind("https://cam.local/mjpeg") == "url"
    assert kind(str(tmp_path)) == "folder"
    assert kind(str(tmp_path / "video.mp4")) == "file"
    assert CameraSettings(id="c", source="rtsp://x").is_realtime
    assert not CameraSettings(id="c", source="a.mp4").is_realtime
    assert CameraSettings(id="c", source="a.mp4", realtime=True).is_realtime


def test_cli_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EFFICIENTAD_REDIS_URL", raising=False)
    path = write(tmp_path, "worker: {batch_size: 4}\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(
        [
            "--config",
            str(path),
            "--set",
            "worker.batch_size=12",
            "--set",
            "publisher.alarm={k: 1, n: 2}",
            "--redis-url",
            "redis://cli:1/0",
            "--key-prefix",
            "p:",
            "--json-logs",
            "--log-level",
            "debug",
            "--metrics-port",
            "0",
        ]
    )
    config = config_from_args(args)
    assert config.worker.batch_size == 12
    assert (config.publisher.alarm.k, config.publisher.alarm.n) == (1, 2)
    assert config.redis.url == "redis://cli:1/0"
    assert config.redis.key_prefix == "p:"
    assert config.logging.json_logs and config.logging.level == "DEBUG"
    assert config.metrics.port == 0
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config_from_args(parser.parse_args(["--set", "nonsense"]))
