"""Process lifecycle shared by every command: exit codes, graceful stop, children that die with us.

The exit codes are defined once, here at the bottom of the pipeline, because the supervisor (a
stage) must read them from its children as well as the CLI writing them: a child that exits with
``EXIT_USAGE`` has a configuration no restart can fix, so ``efficientad run`` does not restart it.
``efficientad.cli_support`` re-exports them for the commands.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "GracefulStop",
    "die_with_parent",
]

EXIT_OK = 0  # done, also after SIGTERM/SIGINT of a long-running stage
EXIT_FAILURE = 1  # runtime failure (Redis down, a run that failed its own check): may be retried
EXIT_USAGE = 2  # bad input or configuration (argparse uses 2 too): a restart cannot fix it
EXIT_INTERRUPTED = 130  # Ctrl-C of a foreground tool (128 + SIGINT)


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


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this child when its parent dies (no orphaned servers or stages).

    Meant as ``subprocess.Popen(preexec_fn=...)``; a no-op where prctl is unavailable.
    """
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
