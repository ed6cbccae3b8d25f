"""Loading the line configuration: YAML file, then environment variables, then overrides.

Environment variables override the YAML with the ``EFFICIENTAD__`` prefix and ``__`` between
nesting levels (``EFFICIENTAD__WORKER__BATCH_SIZE=16``, ``EFFICIENTAD__CAMERAS='[{"id": ...}]'``);
``EFFICIENTAD_REDIS_URL`` is accepted as a short form of ``EFFICIENTAD__REDIS__URL``.
All errors, from whichever source, come back as one ``ConfigError`` listing
``field.path: value -> reason`` lines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr, ValidationError
from pydantic_settings import EnvSettingsSource

from pipeline.core.config import ConfigError, LineConfig

__all__ = [
    "ENV_NESTED_DELIMITER",
    "ENV_PREFIX",
    "REDIS_URL_ENV",
    "deep_merge",
    "expand_dotted",
    "load_config",
]

ENV_PREFIX = "EFFICIENTAD__"
ENV_NESTED_DELIMITER = "__"
REDIS_URL_ENV = "EFFICIENTAD_REDIS_URL"

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
    cli_data = expand_dotted(dict(overrides or {}))
    merged = deep_merge(deep_merge(file_data, env_data), cli_data)
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
        data = deep_merge(data, {"redis": {"url": short_url}})
        origin["redis.url"] = REDIS_URL_ENV
    return data, origin


def expand_dotted(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        parts = key.split(".") if isinstance(key, str) else [key]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = (
            expand_dotted(value) if isinstance(value, dict) and len(parts) == 1 else value
        )
    return out


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
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
