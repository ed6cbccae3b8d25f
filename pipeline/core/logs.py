"""Structured logs: one root handler per process, JSON lines or readable text with extras.

``efficientad run`` names each child (``EFFICIENTAD_PROCESS_NAME``) so interleaved child logs stay
attributable.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Any

_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)
PROCESS_NAME_ENV = "EFFICIENTAD_PROCESS_NAME"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, proc, then every ``extra=`` field."""

    def __init__(self, process_name: str | None = None) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.process_name:
            out["proc"] = self.process_name
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    """Readable lines that still show the ``extra=`` fields as key=value."""

    def __init__(self, process_name: str | None) -> None:
        prefix = f"[{process_name}] " if process_name else ""
        super().__init__(f"%(asctime)s %(levelname)-7s {prefix}%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = [
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _RECORD_ATTRS and not k.startswith("_")
        ]
        if not extras:
            return text
        head, sep, tail = text.partition("\n")
        return f"{head} {' '.join(extras)}{sep}{tail}"


def setup_logging(
    level: str = "INFO", json_logs: bool = False, process_name: str | None = None
) -> None:
    """Configure the root logger once per process (stderr; JSON lines when ``json_logs``).

    ``process_name`` (default: ``$EFFICIENTAD_PROCESS_NAME``, set by ``efficientad run``) is added
    to every record so interleaved child logs stay attributable.
    """
    name = process_name or os.environ.get(PROCESS_NAME_ENV)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(name) if json_logs else _TextFormatter(name))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
