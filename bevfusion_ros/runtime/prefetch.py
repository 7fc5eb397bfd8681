"""Read ahead: items of an iterator produced on a background thread while the caller works on
the previous ones (the bag's messages decoded and assembled while the pipeline runs a frame).

NumPy, zstandard and the GPU waits release the GIL, so reading and running overlap even in one
process. The items come in the iterator's order; an exception the iterator raises reaches the
caller at the same place in the sequence; closing the generator early stops the thread.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")

_END = object()


class _Raised:
    """The exception the iterator raised, carried through the queue."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[Item], depth: int) -> Iterator[tuple[Item, float]]:
    """(item, ms the iterator took to produce it) for each item of ``items``, read up to
    ``depth`` items ahead on a daemon thread; ``depth`` 0: read on the caller's thread."""
    if depth < 0:
        raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    if depth == 0:
        yield from _timed(items)
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(items, ready, stop), name="prefetch", daemon=True)
    thread.start()
    try:
        while (entry := ready.get()) is not _END:
            if isinstance(entry, _Raised):
                raise entry.error
            yield entry
    finally:
        stop.set()
        while thread.is_alive():          # unblock a producer waiting for room, then let it end
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def _timed(items: Iterable[Item]) -> Iterator[tuple[Item, float]]:
    """(item, ms to produce it); closing this closes the iterator of ``items`` too (its own
    clean-up runs: BagFrames closes its assembler)."""
    iterator = iter(items)
    try:
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            yield item, (time.perf_counter() - start) * 1e3
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def _produce(items: Iterable[Item], ready: queue.Queue, stop: threading.Event) -> None:
    timed = _timed(items)
    try:
        for entry in timed:
            if stop.is_set():
                return
            ready.put(entry)
        ready.put(_END)
    except BaseException as error:        # handed to the consumer, raised there
        ready.put(_Raised(error))
    finally:
        timed.close()
