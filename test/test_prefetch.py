"""runtime.prefetch: the items in order, read ahead on another thread, errors where they happened,
an early close that stops the reader and runs the iterator's clean-up."""
from __future__ import annotations

import threading

import pytest

from bevfusion_ros.runtime.prefetch import prefetch

WAIT_S = 10.0      # a bound for waits that succeed at once unless the code under test is broken


class Recorder:
    """An iterator of 0..count-1 that records which thread produced each item and whether its
    clean-up ran; ``produced[i]`` is set once item i has been produced."""

    def __init__(self, count: int, fail_at: int | None = None) -> None:
        self.count, self.fail_at = count, fail_at
        self.threads: list[str] = []
        self.produced = [threading.Event() for _ in range(count)]
        self.closed = threading.Event()

    def __iter__(self):
        try:
            for index in range(self.count):
                if index == self.fail_at:
                    raise RuntimeError(f"bad item {index}")
                self.threads.append(threading.current_thread().name)
                self.produced[index].set()
                yield index
        finally:
            self.closed.set()


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_items_in_order_with_their_read_times(depth):
    got = list(prefetch(Recorder(20), depth))
    assert [item for item, _ in got] == list(range(20))
    assert all(ms >= 0.0 for _, ms in got)


def test_depth_zero_reads_on_the_callers_thread():
    source = Recorder(3)
    list(prefetch(source, 0))
    assert set(source.threads) == {threading.current_thread().name}


def test_the_next_items_are_read_while_the_caller_holds_one():
    """While the caller still works on item 0, the reader produces items 1 and 2 (depth 2) on
    another thread, and no more than that until the caller takes one."""
    source = Recorder(6)
    items = prefetch(source, 2)
    first, _ = next(items)
    assert first == 0
    assert source.produced[1].wait(WAIT_S) and source.produced[2].wait(WAIT_S)
    assert not source.produced[4].is_set()          # at most depth items waiting + one being put
    assert source.threads[1] == "prefetch"
    assert [item for item, _ in items] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("depth", [0, 2])
def test_an_error_arrives_after_the_items_before_it(depth):
    seen = []
    with pytest.raises(RuntimeError, match="bad item 3"):
        for item, _ in prefetch(Recorder(6, fail_at=3), depth):
            seen.append(item)
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("depth", [0, 2])
def test_closing_early_stops_the_reader_and_cleans_up(depth):
    source = Recorder(1000)
    items = prefetch(source, depth)
    assert next(items)[0] == 0
    items.close()
    assert source.closed.wait(WAIT_S)
    assert len(source.threads) < 1000
    assert not any(thread.name == "prefetch" for thread in threading.enumerate())


def test_negative_depth_is_refused():
    with pytest.raises(ValueError, match=">= 0"):
        next(prefetch([1], -1))
