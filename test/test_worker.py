"""FrameWorker and LatestQueue: the node's hand-over from callbacks to the pipeline thread."""
from __future__ import annotations

import threading

import pytest

from bevfusion_ros.streaming.latest_queue import LatestQueue
from bevfusion_ros.streaming.worker import FrameWorker


def test_latest_queue_drops_the_oldest_when_full():
    queue = LatestQueue(2)
    assert [queue.put(item) for item in "abcd"] == [True, True, False, False]
    assert (queue.dropped, queue.put_count, len(queue)) == (2, 4, 2)
    assert [queue.get(0), queue.get(0), queue.get(0.01)] == ["c", "d", None]
    queue.close()
    assert queue.get() is None
    with pytest.raises(RuntimeError):
        queue.put("e")
    with pytest.raises(ValueError):
        LatestQueue(0)


def test_worker_runs_the_newest_frames_and_survives_errors():
    """While the worker is blocked on item 0, items 1..5 arrive: with a queue of one, only the
    newest waiting item survives; a failing item is reported and the next one still runs."""
    release = threading.Event()
    done, errors = [], []

    def process(item):
        if item == 0:
            release.wait(5)
        if item == "bad":
            raise ValueError("bad frame")
        done.append(item)

    worker = FrameWorker(process, lambda item, error: errors.append((item, str(error))), capacity=1)
    worker.submit(0)
    while worker.submitted != 1 or len(worker._queue):      # item 0 taken by the thread
        pass
    for item in range(1, 6):
        worker.submit(item)
    release.set()
    assert worker.wait_idle(5)
    assert done == [0, 5] and worker.dropped == 4 and worker.processed == 2
    worker.submit("bad")
    assert worker.wait_idle(5)
    worker.submit(6)
    assert worker.wait_idle(5)
    assert errors == [("bad", "bad frame")] and done[-1] == 6 and worker.failed == 1
    assert worker.processed + worker.failed + worker.dropped == worker.submitted == 8
    worker.close()
