"""The worker thread that owns the pipeline (ROS-free): callbacks hand it items without waiting,
it runs them one at a time, newest first when it falls behind.

The ROS node submits synchronized frames from its subscription callbacks; the GPU tests submit
frames directly (rclpy does not run there). A full queue drops its oldest item and counts it
(:attr:`dropped`); an exception from ``process`` goes to ``on_error`` and the worker carries on
with the next item.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from bevfusion_ros.streaming.latest_queue import LatestQueue


class FrameWorker:
    """``process(item)`` for each submitted item on one daemon thread named ``name``."""

    def __init__(self, process: Callable[[Any], None], on_error: Callable[[Any, BaseException], None],
                 capacity: int = 1, name: str = "bevfusion-worker") -> None:
        self._process, self._on_error = process, on_error
        self._queue = LatestQueue(capacity)
        self._finished = threading.Condition()
        self.processed = 0                  # items whose process() returned
        self.failed = 0                     # items whose process() raised
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Items discarded unprocessed because newer ones arrived while the worker was busy."""
        return self._queue.dropped

    @property
    def submitted(self) -> int:
        return self._queue.put_count

    def submit(self, item: Any) -> bool:
        """Queue ``item`` (never blocks); False when an older waiting item was dropped for it."""
        return self._queue.put(item)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted item is processed, failed or dropped; False on timeout."""
        with self._finished:
            return self._finished.wait_for(
                lambda: self.processed + self.failed + self.dropped >= self.submitted, timeout)

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop after the item in progress (waiting items are discarded)."""
        self._queue.close()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            failed = False
            try:
                self._process(item)
            except Exception as error:  # noqa: BLE001 - the worker must outlive any bad item
                failed = True
                self._on_error(item, error)
            with self._finished:
                if failed:
                    self.failed += 1
                else:
                    self.processed += 1
                self._finished.notify_all()
