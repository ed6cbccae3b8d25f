"""The one line configuration schema: every YAML section as a pydantic model.

Every section has ``extra="forbid"`` so a typo is an error naming the key. Reading the file, the
environment overrides and the error formatting live in ``pipeline.core.config_loader``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from pipeline.core.stage_settings import AlarmSettings, PublisherSettings, WorkerSettings
from pipeline.core.wire import StreamKeys

__all__ = [
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
]

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
