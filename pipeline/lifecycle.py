"""Graceful stop shared by the long-running loops (worker, publisher)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class GracefulStop:
    """SIGTERM/SIGINT set a flag; the loop finishes what it holds, then returns."""

    _stop: threading.Event

    def _init_stop(self) -> None:
        self._stop = threading.Event()

    def request_stop(self, *_: Any) -> None:
        """Signal-handler safe: only sets the flag the loop checks."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
