"""A bounded hand-over queue that never blocks the producer: when full, the oldest item is
dropped (and counted) to make room for the newest. The ROS node's callbacks put synchronized
frames in it; its worker thread takes them (a perception node wants the newest data, not a
growing backlog)."""
from __future__ import annotations

import collections
import threading
from typing import Any


class LatestQueue:
    """Thread-safe FIFO of at most ``capacity`` items; :meth:`put` drops the oldest when full."""

    def __init__(self, capacity: int = 1) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._items: collections.deque = collections.deque()
        self._capacity = capacity
        self._ready = threading.Condition()
        self._closed = False
        self.dropped = 0                   # items discarded to make room
        self.put_count = 0

    def put(self, item: Any) -> bool:
        """Append ``item``; returns False when an older item had to be dropped for it."""
        with self._ready:
            if self._closed:
                raise RuntimeError("queue is closed")
            dropped = len(self._items) >= self._capacity
            if dropped:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self.put_count += 1
            self._ready.notify()
            return not dropped

    def get(self, timeout: float | None = None) -> Any:
        """The oldest item; None after ``timeout`` seconds or once closed and empty."""
        with self._ready:
            self._ready.wait_for(lambda: self._items or self._closed, timeout)
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        """Wake every waiting :meth:`get`; later puts raise."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def __len__(self) -> int:
        with self._ready:
            return len(self._items)
