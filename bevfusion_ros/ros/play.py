"""``bevfusion-play``: publish an MCAP bag with rclpy, where ``ros2 bag play`` is not installed.

    bevfusion-play BAG [--rate R] [--loop] [--clock] [--start-delay S] [--topics T ...]
                       [--qos reliable|sensor_data] [--wait-for-subscribers S]

One publisher per topic, of the recorded type; messages go out in log-time order, paced in real
time divided by ``--rate`` without drift; ``/tf_static`` is latched and holds every static
transform seen so far. Pacing, QoS, ``--clock``, ``--loop``, the start delay, progress output and
exit status: docs/tools.md, "bevfusion-play".

Library use (tests, the demo): :func:`play` with a node of an initialised context.
"""
from __future__ import annotations

import itertools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

from bevfusion_ros.ros.bag import BagMessage, bag_summary, message_class, read_bag

TF_STATIC_TOPIC = "/tf_static"
CLOCK_TOPIC = "/clock"
#: /clock publication rate while waiting for the next message, in Hz.
CLOCK_RATE_HZ = 100.0
QOS_CHOICES = ("reliable", "sensor_data")
#: QoS of every topic but /tf_static with ``qos="reliable"``.
RELIABLE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                          reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
#: QoS of /tf_static: latched, like tf2's static broadcaster, with room for a long history.
TF_STATIC_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                           reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.TRANSIENT_LOCAL)
#: Seconds that the end of :func:`play` waits at most for subscribers to acknowledge the last messages.
ACK_TIMEOUT_S = 2.0
CLOCK_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)


@dataclass
class PlayResult:
    """What :func:`play` did (also passed, in progress, to its ``progress`` callback)."""

    published: int = 0        #: messages published (``/clock`` not counted)
    passes: int = 0           #: passes over the bag completed
    elapsed_s: float = 0.0    #: seconds since the end of the start delay
    stopped: bool = False     #: stopped by ``stop`` (or the context shutting down) before the end


def clock_message(ns: int) -> Any:
    """rosgraph_msgs/Clock of ``ns`` nanoseconds."""
    from builtin_interfaces.msg import Time
    from rosgraph_msgs.msg import Clock

    sec, nanosec = divmod(int(ns), 1_000_000_000)
    return Clock(clock=Time(sec=sec, nanosec=nanosec))


def install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGINT and SIGTERM set ``stop`` (from a short thread: Event.set in a signal handler could
    deadlock on the event's lock held by the interrupted main thread). Returns a function that
    puts the previous handlers back. Main thread only."""
    def handler(signum: int, frame: Any) -> None:
        threading.Thread(target=stop.set, daemon=True).start()

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)

    return restore


def _publisher_qos(topic: str, qos: str) -> QoSProfile:
    if topic == TF_STATIC_TOPIC:
        return TF_STATIC_QOS
    return RELIABLE_QOS if qos == "reliable" else qos_profile_sensor_data


class _Pacer:
    """Sleeps until due times on the monotonic clock, publishing /clock meanwhile."""

    def __init__(self, stop: threading.Event, is_ok: Callable[[], bool], clock_pub: Any, rate: float):
        self.stop, self.is_ok, self.clock_pub, self.rate = stop, is_ok, clock_pub, rate
        self.next_tick = time.monotonic()
        self.period = 1.0 / CLOCK_RATE_HZ

    def publish_clock(self, ns: int) -> None:
        if self.clock_pub is not None:
            self.clock_pub.publish(clock_message(ns))

    def wait_until(self, due: float, pass_start: float, first_ns: int, low_ns: int, high_ns: int) -> bool:
        """Waits until monotonic time ``due``; returns False if stopped first. With /clock, the
        bag time ``first_ns + (now - pass_start) * rate``, kept in ``[low_ns, high_ns]``, goes
        out at CLOCK_RATE_HZ."""
        while True:
            if self.stop.is_set() or not self.is_ok():
                return False
            now = time.monotonic()
            if now >= due:
                return True
            wake = due
            if self.clock_pub is not None:
                if now >= self.next_tick:
                    bag_ns = first_ns + int((now - pass_start) * self.rate * 1e9)
                    self.publish_clock(min(max(bag_ns, low_ns), high_ns))
                    self.next_tick += self.period
                    if self.next_tick <= now:        # late (a slow publish): no burst of ticks
                        self.next_tick = now + self.period
                wake = min(due, self.next_tick)
            self.stop.wait(max(0.0, wake - time.monotonic()))


def _wait_for_acks(node: Node, publishers: list[Any], timeout_s: float) -> None:
    """Waits (``timeout_s`` in all) until the reliable subscribers have acknowledged every
    message: destroying a publisher drops what is still unacknowledged (the end of the bag)."""
    deadline = time.monotonic() + timeout_s
    for publisher in publishers:
        left = deadline - time.monotonic()
        if left <= 0 or not node.context.ok():
            return
        publisher.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9)))


def _wait_for_start(node: Node, pacer: _Pacer, publishers: dict[str, Any], start_delay: float, first_ns: int,
                    subscribers_end: float | None) -> bool:
    """When ``subscribers_end`` is given, waits until every publisher has a subscription or
    until ``subscribers_end``; then ``start_delay`` seconds. /clock holds ``first_ns``
    meanwhile. False if stopped first."""
    def unmatched() -> list[str]:
        return [topic for topic, publisher in publishers.items() if publisher.get_subscription_count() == 0]

    if subscribers_end is not None:
        while unmatched() and time.monotonic() < subscribers_end:
            step_end = min(time.monotonic() + 0.02, subscribers_end)
            if not pacer.wait_until(step_end, step_end, first_ns, first_ns, first_ns):
                return False
        missing = unmatched()
        if missing:
            node.get_logger().warning(f"playing without a subscriber on {', '.join(missing)}")
    delay_end = time.monotonic() + start_delay
    return pacer.wait_until(delay_end, delay_end, first_ns, first_ns, first_ns)


def check_play_options(rate: float, start_delay: float, qos: str = "reliable",
                       wait_for_subscribers: float | None = None) -> None:
    """ValueError naming the first unusable option of :func:`play` (bevfusion-play reports it
    as a usage error before starting ROS)."""
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number > 0, got {rate}")
    if not (math.isfinite(start_delay) and start_delay >= 0):
        raise ValueError(f"start delay must be >= 0 seconds, got {start_delay}")
    if qos not in QOS_CHOICES:
        raise ValueError(f"qos must be one of {QOS_CHOICES}, got {qos!r}")
    if wait_for_subscribers is not None and not (math.isfinite(wait_for_subscribers) and wait_for_subscribers >= 0):
        raise ValueError(f"wait for subscribers must be >= 0 seconds, got {wait_for_subscribers}")


def _topic_classes(path: str, topics: Iterable[str] | None) -> dict[str, type]:
    """Message class per played topic, in play order (all of the bag's, sorted, by default)."""
    summary = bag_summary(path)
    if topics is None:
        selected = sorted(summary)
    else:
        selected = list(dict.fromkeys(topics))
        missing = [t for t in selected if t not in summary]
        if missing:
            raise ValueError(f"topics not in {path}: {', '.join(missing)} (it has: {', '.join(sorted(summary))})")
    return {topic: message_class(summary[topic][0]) for topic in selected}


class _Playback:
    """The publishing side of one :func:`play` call: the schedule of a pass, the merged
    /tf_static and the result with its progress reports."""

    def __init__(self, publishers: dict[str, Any], pacer: _Pacer, rate: float,
                 on_message: Callable[[BagMessage], None] | None,
                 progress: Callable[[PlayResult], None] | None, progress_period: float):
        self.publishers, self.pacer, self.rate = publishers, pacer, rate
        self.on_message, self.progress, self.progress_period = on_message, progress, progress_period
        self.result = PlayResult()
        self.static_transforms: dict[str, Any] = {}
        self.play_start = self.next_progress = 0.0

    def start(self) -> float:
        """Marks the end of the start delay (elapsed time and progress count from there)."""
        self.play_start = time.monotonic()
        self.next_progress = self.play_start + self.progress_period
        return self.play_start

    def play_pass(self, messages: Iterable[BagMessage], pass_start: float, first_ns: int) -> float:
        """Publishes ``messages`` at their due times counted from ``pass_start``; returns the due
        time of the last one published (``pass_start`` if none). A stop sets ``result.stopped``."""
        last_due, previous_ns = pass_start, first_ns
        for message in messages:
            due = pass_start + (message.log_time_ns - first_ns) / 1e9 / self.rate
            if not self.pacer.wait_until(due, pass_start, first_ns, previous_ns, message.log_time_ns):
                self.result.stopped = True
                break
            last_due, previous_ns = due, message.log_time_ns
            self._publish(message)
        self.result.elapsed_s = time.monotonic() - self.play_start
        return last_due

    def _publish(self, message: BagMessage) -> None:
        """/clock at the message's log time, then the message (on /tf_static: every static
        transform so far), then the callbacks."""
        self.pacer.publish_clock(message.log_time_ns)
        outgoing = message.message
        if message.topic == TF_STATIC_TOPIC and hasattr(outgoing, "transforms"):
            for transform in outgoing.transforms:
                self.static_transforms[transform.child_frame_id] = transform
            outgoing = type(outgoing)(transforms=list(self.static_transforms.values()))
        self.publishers[message.topic].publish(outgoing)
        self.result.published += 1
        if self.on_message is not None:
            self.on_message(message)
        now = time.monotonic()
        self.result.elapsed_s = now - self.play_start
        if self.progress is not None and now >= self.next_progress:
            self.progress(self.result)
            self.next_progress = now + self.progress_period


def _play_passes(path: str, topics: list[str], node: Node, playback: _Playback, loop: bool,
                 start_delay: float, waited: dict[str, Any], subscribers_end: float | None) -> PlayResult:
    """Waits for the start (:func:`_wait_for_start`), then plays the bag once, or again and
    again with ``loop``, until it ends or a stop."""
    result = playback.result
    bag_messages = read_bag(path, topics=topics)
    try:
        first = next(bag_messages, None)
        if first is None:
            return result
        first_ns = first.log_time_ns
        if not _wait_for_start(node, playback.pacer, waited, start_delay, first_ns, subscribers_end):
            result.stopped = True
            return result
        pass_start = playback.start()
        messages: Iterator[BagMessage] = itertools.chain([first], bag_messages)
        while True:
            last_due = playback.play_pass(messages, pass_start, first_ns)
            if result.stopped:
                break
            result.passes += 1
            if not loop:
                break
            pass_start = last_due                   # no drift across passes either
            bag_messages.close()
            messages = bag_messages = read_bag(path, topics=topics)
        return result
    finally:
        bag_messages.close()                         # the bag file of an unfinished pass


def play(path: str, node: Node, rate: float = 1.0, loop: bool = False, clock: bool = False,
         topics: Iterable[str] | None = None, on_message: Callable[[BagMessage], None] | None = None,
         *, qos: str = "reliable", start_delay: float = 1.0, stop: threading.Event | None = None,
         progress: Callable[[PlayResult], None] | None = None, progress_period: float = 1.0,
         wait_for_subscribers: float | None = None) -> PlayResult:
    """Publishes the bag at ``path`` from ``node`` (see docs/tools.md); returns when the
    bag ends (never with ``loop``), when ``stop`` is set or when the node's context shuts down.

    ``topics``: the topics to play (default all; ValueError for one not in the bag).
    ``on_message(bag_message)`` is called right after each message is published (with the
    bag's message: on /tf_static the published one holds the merged transforms).
    ``progress(result)`` is called about every ``progress_period`` seconds during playback.
    The first message goes out ``start_delay`` seconds after the publishers were created. With
    ``wait_for_subscribers`` (seconds), the start delay begins only when every played topic (and
    /clock) has a matched subscription, or that many seconds after the publishers were created
    (a warning then names the topics without one): the delay then lets the subscriptions'
    side of the match complete too.
    The publishers are created here and destroyed before returning. Raises ValueError for an
    unusable option (:func:`check_play_options`), BagError when the bag cannot be read or a
    message type is not installed.
    """
    check_play_options(rate, start_delay, qos, wait_for_subscribers)
    stop = stop if stop is not None else threading.Event()
    classes = _topic_classes(path, topics)
    publishers: dict[str, Any] = {topic: node.create_publisher(cls, topic, _publisher_qos(topic, qos))
                                  for topic, cls in classes.items()}
    created = time.monotonic()
    clock_pub = None
    if clock:
        from rosgraph_msgs.msg import Clock
        clock_pub = node.create_publisher(Clock, CLOCK_TOPIC, CLOCK_QOS)
    all_publishers = [*publishers.values(), *([clock_pub] if clock_pub is not None else [])]
    pacer = _Pacer(stop, node.context.ok, clock_pub, rate)
    playback = _Playback(publishers, pacer, rate, on_message, progress, progress_period)
    waited = {**publishers, **({CLOCK_TOPIC: clock_pub} if clock_pub is not None else {})}
    subscribers_end = None if wait_for_subscribers is None else created + wait_for_subscribers
    try:
        return _play_passes(path, list(classes), node, playback, loop, start_delay, waited, subscribers_end)
    finally:
        _wait_for_acks(node, all_publishers, ACK_TIMEOUT_S)
        for publisher in all_publishers:
            node.destroy_publisher(publisher)
