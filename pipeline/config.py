"""The one line configuration: YAML file, then environment variables, then CLI overrides.

Every section is a pydantic model with ``extra="forbid"`` so a typo is an error naming the key.
Environment variables override the YAML with the ``EFFICIENTAD__`` prefix and ``__`` between
nesting levels (``EFFICIENTAD__WORKER__BATCH_SIZE=16``, ``EFFICIENTAD__CAMERAS='[{"id": ...}]'``);
``EFFICIENTAD_REDIS_URL`` is accepted as a short form of ``EFFICIENTAD__REDIS__URL``.
All errors, from whichever source, come back as one ``ConfigError`` listing
``field.path: value -> reason`` lines.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import EnvSettingsSource

from pipeline.stage_settings import AlarmSettings, PublisherSettings, WorkerSettings
from pipeline.wire import StreamKeys

__all__ = [
    "ENV_NESTED_DELIMITER",
    "ENV_PREFIX",
    "REDIS_URL_ENV",
    "AlarmSettings",
    "CameraSettings",
    "ConfigError",
    "LineConfig",
    "LoggingSettings",
    "MetricsSettings",
    "PublisherSettings",
    "RedisSettings",
    "RunSettings",
    "WorkerSettings",
    "add_config_arguments",
    "config_from_args",
    "load_config",
]

ENV_PREFIX = "EFFICIENTAD__"
ENV_NESTED_DELIMITER = "__"
REDIS_URL_ENV = "EFFICIENTAD_REDIS_URL"

# Camera ids end up inside key names and hash tags (``frames:{cam}``): no braces, colons, spaces.
_CAMERA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_USB_SOURCE = re.compile(r"^(?:usb:)?(\d+)$")
_URL_SOURCE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class ConfigError(ValueError):
    """Invalid configuration; the message lists every bad field with its value and the reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RedisSettings(_Section):
    """Where Redis is. ``url: null`` makes ``efficientad run`` start an embedded redis-server."""

    url: str | None = Field(
        default=None,
        description="redis://host:port/db, rediss:// (TLS), unix:///path.sock; null = embedded",
    )
    username: str | None = Field(default=None, description="ACL user (overrides the URL's)")
    password: SecretStr | None = Field(default=None, description="password (overrides the URL's)")
    password_file: Path | None = Field(
        default=None, description="file holding the password (Docker/Kubernetes secrets)"
    )
    ssl_ca_certs: Path | None = Field(default=None, description="CA bundle for rediss://")
    ssl_certfile: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    ssl_keyfile: Path | None = Field(default=None, description="client key (mutual TLS)")
    ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    ssl_check_hostname: bool = True
    key_prefix: str = Field(default="", description="prefix of every key (tenants, tests)")
    socket_timeout_s: float = Field(
        default=10.0, gt=0, description="per-command timeout; must exceed every XREAD BLOCK"
    )
    socket_connect_timeout_s: float = Field(default=5.0, gt=0)
    health_check_interval_s: int = Field(
        default=15, ge=0, description="PING idle connections before use after this many seconds"
    )
    retries: int = Field(
        default=3, ge=0, description="retries of a command on connection errors (with backoff)"
    )
    retry_backoff_base_s: float = Field(default=0.05, gt=0)
    retry_backoff_cap_s: float = Field(default=2.0, gt=0)
    embedded_dir: Path | None = Field(
        default=None,
        description="data dir of the embedded Redis (append-only file); null = no persistence",
    )
    embedded_port: int = Field(
        default=0, ge=0, le=65535, description="port of the embedded Redis; 0 = a free port"
    )

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^(redis|rediss|unix)://", url):
            raise ValueError("must start with redis://, rediss:// or unix:// (or be null)")
        return url

    def keys(self) -> StreamKeys:
        return StreamKeys(self.key_prefix)

    def resolved_password(self) -> str | None:
        """Password from ``password`` or ``password_file`` (stripped of the trailing newline)."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            try:
                return self.password_file.read_text().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(
                    f"redis.password_file: {str(self.password_file)!r} -> {exc.strerror}"
                ) from None
        return None


SourceKind = Literal["file", "folder", "url", "usb"]


class CameraSettings(_Section):
    """One camera (or file/folder replay) and how its frames are captured and sent."""

    id: str = Field(description="camera id, used in key names")
    source: str = Field(
        min_length=1,
        description="video file, image folder, rtsp://|http(s):// URL, or usb:N / N (device)",
    )
    fps: float = Field(
        default=0.0, ge=0, description="frame rate cap; 0 = as fast as the source delivers"
    )
    roi: tuple[int, int, int, int] | None = Field(
        default=None, description="crop [x, y, w, h] in source pixels before encoding"
    )
    encoding: Literal["jpeg", "png", "raw"] = "jpeg"
    quality: int = Field(default=90, ge=1, le=100, description="JPEG quality")
    maxlen: int = Field(default=1000, ge=1, description="approximate MAXLEN of frames:{cam}")
    loop: bool = Field(default=False, description="replay a file/folder forever")
    model: str = Field(default="default", min_length=1, description="key into models:")
    realtime: bool | None = Field(
        default=None,
        description=(
            "live behaviour (freshest frame, drop when Redis lags) instead of replay (every frame,"
            " wait for Redis); null = live for URL/USB sources, replay for files/folders"
        ),
    )
    buffer_frames: int = Field(
        default=64, ge=1, description="encoded frames held while Redis is slow or down"
    )
    reconnect_initial_s: float = Field(default=0.5, gt=0, description="first reconnect delay")
    reconnect_max_s: float = Field(default=30.0, gt=0, description="reconnect delay cap")
    offline_after_s: float = Field(
        default=10.0, gt=0, description="no frame for this long -> camera.offline (+ reconnect)"
    )
    frozen_after_s: float | None = Field(
        default=30.0, gt=0, description="identical frames for this long -> camera.frozen; null=off"
    )
    status_interval_s: float = Field(
        default=10.0, gt=0, description="period of capture.stats events on the status stream"
    )

    @model_validator(mode="before")
    @classmethod
    def _source_as_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("source"), int):
            return {**data, "source": f"usb:{data['source']}"}
        return data

    @field_validator("id")
    @classmethod
    def _id_fits_key_names(cls, value: str) -> str:
        if not _CAMERA_ID.match(value):
            raise ValueError(
                "must be 1-64 letters, digits, '_', '.', '-' (it becomes part of Redis key names)"
            )
        return value

    @field_validator("roi")
    @classmethod
    def _check_roi(cls, roi: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if roi is not None:
            x, y, w, h = roi
            if x < 0 or y < 0 or w <= 0 or h <= 0:
                raise ValueError("needs [x, y, w, h] with x, y >= 0 and w, h > 0")
        return roi

    @property
    def source_kind(self) -> SourceKind:
        if _USB_SOURCE.match(self.source):
            return "usb"
        if _URL_SOURCE.match(self.source):
            return "url"
        return "folder" if Path(self.source).is_dir() else "file"

    @property
    def usb_index(self) -> int:
        match = _USB_SOURCE.match(self.source)
        if match is None:
            raise ValueError(f"camera {self.id}: source {self.source!r} is not a USB device")
        return int(match.group(1))

    @property
    def is_realtime(self) -> bool:
        if self.realtime is not None:
            return self.realtime
        return self.source_kind in ("url", "usb")


class MetricsSettings(_Section):
    """Prometheus /metrics plus /healthz and /readyz, one HTTP port per process."""

    enabled: bool = True
    host: str = Field(
        default="127.0.0.1",
        description="bind address; 0.0.0.0 only inside a container or on a management network",
    )
    port: int = Field(
        default=9400,
        ge=0,
        le=65535,
        description="0 = any free port; `efficientad run` gives its children port, port+1, ...",
    )


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_logs: bool = Field(default=False, description="JSON lines instead of plain text")


class RunSettings(_Section):
    """How ``efficientad run`` supervises its child processes."""

    workers: int = Field(default=2, ge=1, le=256, description="worker processes")
    publisher: bool = Field(default=True, description="also run the publisher")
    restart_initial_s: float = Field(default=1.0, gt=0, description="first restart delay")
    restart_max_s: float = Field(default=30.0, gt=0, description="restart delay cap")
    stable_after_s: float = Field(
        default=60.0, gt=0, description="a child up this long resets its restart delay"
    )
    stop_timeout_s: float = Field(
        default=30.0, gt=0, description="grace period after SIGTERM before SIGKILL"
    )
    drain_timeout_s: float = Field(
        default=600.0, gt=0, description="--until-drained: give up waiting for workers after this"
    )


class LineConfig(_Section):
    """Root of the YAML file."""

    redis: RedisSettings = Field(default_factory=RedisSettings)
    cameras: list[CameraSettings] = Field(default_factory=list)
    models: dict[str, Path] = Field(
        default_factory=dict, description="model name -> checkpoint directory"
    )
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    publisher: PublisherSettings = Field(default_factory=PublisherSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    run: RunSettings = Field(default_factory=RunSettings)

    @model_validator(mode="after")
    def _consistent(self) -> LineConfig:
        seen: set[str] = set()
        for cam in self.cameras:
            if cam.id in seen:
                raise ValueError(f"camera id {cam.id!r} is used twice")
            seen.add(cam.id)
        if self.models:
            for cam in self.cameras:
                if cam.model not in self.models:
                    raise ValueError(
                        f"camera {cam.id!r} uses model {cam.model!r}, but models: only has "
                        f"{sorted(self.models)}"
                    )
        unknown = sorted(set(self.publisher.per_camera) - seen) if self.cameras else []
        if unknown:
            raise ValueError(f"publisher.per_camera names unknown cameras {unknown}")
        return self

    @property
    def keys(self) -> StreamKeys:
        return self.redis.keys()

    def camera(self, cam_id: str) -> CameraSettings:
        for cam in self.cameras:
            if cam.id == cam_id:
                return cam
        raise ConfigError(f"cameras: no camera with id {cam_id!r} (have {self.camera_ids()})")

    def camera_ids(self) -> list[str]:
        return [cam.id for cam in self.cameras]


# ------------------------------------------------------------------------------------------------
# loading


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> LineConfig:
    """Read ``path`` (YAML, optional), apply env vars, then ``overrides``; validate once.

    ``overrides`` is a nested dict, or flat with dotted keys (``{"worker.batch_size": 16}``).
    ``environ`` defaults to ``os.environ`` (tests pass their own).
    """
    env = os.environ if environ is None else environ
    file_data = _read_yaml(Path(path)) if path is not None else {}
    env_data, env_origin = _env_layer(env)
    cli_data = _expand_dotted(dict(overrides or {}))
    merged = _deep_merge(_deep_merge(file_data, env_data), cli_data)
    try:
        return LineConfig.model_validate(merged)
    except ValidationError as exc:
        where = f"{path}" if path is not None else "configuration"
        raise ConfigError(_format_errors(where, exc, merged, env_origin)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {str(path)!r}:{at}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r}: top level must be a mapping, got {type(data).__name__}"
        )
    return data


def _env_layer(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Nested dict from ``EFFICIENTAD__...`` variables, and which variable set which section."""
    source = EnvSettingsSource(
        LineConfig,  # type: ignore[arg-type]  # only its fields are read
        case_sensitive=False,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        env_ignore_empty=False,
        env_parse_none_str="null",
    )
    source.env_vars = {k.lower(): v for k, v in env.items()}
    try:
        data: dict[str, Any] = source()
    except Exception as exc:  # pydantic-settings raises SettingsError on bad JSON values
        raise ConfigError(f"environment: {exc}") from None
    origin = {
        name[len(ENV_PREFIX) :].lower().replace(ENV_NESTED_DELIMITER, "."): name
        for name in env
        if name.upper().startswith(ENV_PREFIX)
    }
    short_url = env.get(REDIS_URL_ENV)
    if short_url and "url" not in data.get("redis", {}):
        data = _deep_merge(data, {"redis": {"url": short_url}})
        origin["redis.url"] = REDIS_URL_ENV
    return data, origin


def _expand_dotted(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        parts = key.split(".") if isinstance(key, str) else [key]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = (
            _expand_dotted(value) if isinstance(value, dict) and len(parts) == 1 else value
        )
    return out


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_errors(
    where: str, exc: ValidationError, data: Mapping[str, Any], env_origin: Mapping[str, str]
) -> str:
    lines = [f"invalid configuration in {where}:"]
    for err in exc.errors():
        loc = [p for p in err.get("loc", ()) if not _is_union_tag(p)]
        path = _readable_path(loc, data)
        reason = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "missing":
            shown = "(missing)"
        elif err.get("type") == "extra_forbidden":
            shown = _short(err.get("input"))
            reason = "unknown key (check spelling)"
        else:
            shown = _short(err.get("input"))
        dotted = ".".join(str(p) for p in loc)
        via = next(
            (f" (from {var})" for key, var in env_origin.items() if dotted.startswith(key)), ""
        )
        lines.append(f"  {path}: {shown} -> {reason}{via}" if path else f"  {reason}{via}")
    return "\n".join(lines)


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the union member (e.g. "tuple[int, int, int, int]") to the location
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})


def _readable_path(loc: list[Any], data: Mapping[str, Any]) -> str:
    out: list[str] = []
    node: Any = data
    for part in loc:
        if isinstance(part, int):
            label = f"[{part}]"
            item = node[part] if isinstance(node, list) and part < len(node) else None
            if not out or out[-1] != "cameras" or not isinstance(item, dict) or "id" not in item:
                out.append(label)
            else:
                out.append(f"[{part}](id={item['id']})")
            node = item
        else:
            out.append(("." if out else "") + str(part))
            node = node.get(part) if isinstance(node, Mapping) else None
    return "".join(out)


def _short(value: Any, limit: int = 80) -> str:
    if isinstance(value, SecretStr):
        return "'**********'"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# CLI glue shared by every subcommand


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--redis-url``, ``--key-prefix``, logging and metrics flags."""
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
    merged = _deep_merge(_expand_dotted(flat), _expand_dotted(dict(overrides or {})))
    return load_config(getattr(args, "config", None), merged)


def load_command_config(
    args: argparse.Namespace, overrides: Mapping[str, Any] | None = None
) -> LineConfig | None:
    """``config_from_args`` for a CLI command: prints a bad config's error and returns None;
    otherwise sets up logging as configured."""
    import sys

    from pipeline.observability import setup_logging

    try:
        config = config_from_args(args, overrides)
    except ConfigError as exc:
        print(f"efficientad: {exc}", file=sys.stderr)
        return None
    setup_logging(config.logging.level, config.logging.json_logs)
    return config
