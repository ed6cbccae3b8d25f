"""Dynamic batching: a batch leaves when it is full OR when its oldest item has waited long enough.

The same rule as Triton's ``max_queue_delay`` and DeepStream's ``batched-push-timeout``: a full
batch never waits, a lone frame waits at most ``max_wait_s``. One collector per model, so frames
of several cameras that share a model ride in one batch. ``Background`` runs the finished
batches' post-processing behind the model, a bounded number of batches deep.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class BatchCollector(Generic[T]):
    """FIFO of items with a size-or-deadline release rule."""

    def __init__(
        self,
        max_size: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._items: deque[tuple[float, T]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        self._items.append((self._clock(), item))

    def extend(self, items: Iterable[T]) -> None:
        now = self._clock()
        self._items.extend((now, item) for item in items)

    @property
    def room(self) -> int:
        """How many more items complete the current batch."""
        return max(0, self.max_size - len(self._items))

    def time_left(self) -> float | None:
        """Seconds until the oldest item's deadline (0 when due); None when empty."""
        if not self._items:
            return None
        return max(0.0, self._items[0][0] + self.max_wait_s - self._clock())

    def ready(self) -> bool:
        if len(self._items) >= self.max_size:
            return True
        left = self.time_left()
        return left is not None and left <= 0.0

    def items(self) -> list[T]:
        """What the collector holds, oldest first (without taking it)."""
        return [item for _, item in self._items]

    def take(self) -> list[T]:
        """The next batch: up to ``max_size`` items, oldest first (may be empty)."""
        count = min(self.max_size, len(self._items))
        return [self._items.popleft()[1] for _ in range(count)]


class Background:
    """One thread that runs submitted jobs in order; a bounded queue keeps it at most
    ``depth`` batches behind, and its first error is raised in the submitting thread.

    The worker hands each scored batch's post-processing and publishing to it, so that CPU and
    Redis work overlaps the next model call.
    """

    def __init__(self, depth: int = 2) -> None:
        self.closed = False
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="worker-publish", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self.raise_error()
        self._queue.put(job)

    def drain(self) -> None:
        """Wait until every submitted job ran; re-raise the first failure."""
        self._queue.join()
        self.raise_error()

    def raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.put(None)
            self._thread.join()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure, skip: the frames stay pending
                    job()
            except BaseException as exc:
                self._error = exc
            finally:
                self._queue.task_done()
