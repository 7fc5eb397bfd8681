"""bevfusion-play and bevfusion-record over real Fast DDS.

Play: this test writes a small bag (Images, PointClouds, /tf_static, Detection3DArrays at known
log times) with BagWriter, runs ``python -m bevfusion_ros.tools.play`` as a child process and
subscribes here: every message arrives, equal to the bag's, in order, on the bag's schedule
(divided by --rate), /tf_static latched (merged transforms, received by a late subscriber too),
/clock following the bag time, two passes with --loop.

Record: this test publishes Detection3DArray and DiagnosticArray messages, a
``python -m bevfusion_ros.tools.record`` child records them (--count, --json), and the bag and the
JSON files are compared with what was published.
"""
from __future__ import annotations

import json
import math
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, Pose, Quaternion, Transform, TransformStamped, Vector3
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, PointCloud2, PointField
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage
from vision_msgs.msg import BoundingBox3D, Detection3D, Detection3DArray, ObjectHypothesis, ObjectHypothesisWithPose

from bevfusion_ros.ros import play as play_module
from bevfusion_ros.ros import record as record_module
from bevfusion_ros.ros.bag import BagWriter, bag_summary, read_bag
from bevfusion_ros.ros.record import Recorder
from bevfusion_ros.tools import play as play_tool

BASE_NS = 1_700_000_000_000_000_000
MS = 1_000_000
#: Arrival times must follow the schedule (relative to the first arrival) within this, seconds.
TIMING_TOLERANCE_S = 0.08
DISCOVERY_TIMEOUT_S = 15.0
PLAY_TIMEOUT_S = 25.0
#: Discovery between two processes usually takes milliseconds, but up to ~3 s when the first
#: participant announcements are missed (Fast DDS repeats them every 3 s; seen on loaded machines):
#: the player holds its first message until this test's subscriptions have matched.
WAIT = ("--wait-for-subscribers", "10")
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
IMAGE, POINTS, DETECTIONS, TF_STATIC = "/cam/image", "/lidar/points", "/bevfusion/detections", "/tf_static"
TYPES = {IMAGE: Image, POINTS: PointCloud2, DETECTIONS: Detection3DArray, TF_STATIC: TFMessage}


# ------------------------------------------------------------------------------------------------
# Messages
# ------------------------------------------------------------------------------------------------

def header(ns: int, frame_id: str) -> Header:
    return Header(stamp=Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000), frame_id=frame_id)


def image(ns: int, seed: int) -> Image:
    return Image(header=header(ns, "cam_front"), height=2, width=3, encoding="rgb8", is_bigendian=0,
                 step=9, data=bytes((seed * 7 + i) % 256 for i in range(18)))


def cloud(ns: int, seed: int) -> PointCloud2:
    fields = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
              for i, n in enumerate("xyz")]
    data = b"".join(struct.pack("<3f", seed + i * 0.5, -i * 0.25, 1.5) for i in range(4))
    return PointCloud2(header=header(ns, "lidar_top"), height=1, width=4, fields=fields, is_bigendian=False,
                       point_step=12, row_step=48, data=data, is_dense=True)


def static_tf(ns: int, child: str, x: float) -> TFMessage:
    return TFMessage(transforms=[TransformStamped(
        header=header(ns, "base_link"), child_frame_id=child,
        transform=Transform(translation=Vector3(x=x, y=0.25, z=1.75),
                            rotation=Quaternion(x=0.0, y=0.0, z=0.0, w=1.0)))])


#: (class_id, score, center, yaw, size) of the boxes of detections(ns, seed), seed shifting x.
BOXES = (("car", 0.875, (10.5, -2.25, 0.75), 0.5, (4.5, 1.875, 1.5)),
         ("pedestrian", 0.3125, (-3.0, 6.125, 1.0), -2.0, (0.75, 0.625, 1.75)))


def detections(ns: int, seed: int) -> Detection3DArray:
    hdr = header(ns, "lidar_top")
    out = Detection3DArray(header=hdr)
    for index, (class_id, score, (x, y, z), yaw, (length, width, height)) in enumerate(BOXES):
        pose = Pose(position=Point(x=x + seed, y=y, z=z),
                    orientation=Quaternion(x=0.0, y=0.0, z=math.sin(yaw / 2), w=math.cos(yaw / 2)))
        hypothesis = ObjectHypothesisWithPose(hypothesis=ObjectHypothesis(class_id=class_id, score=score))
        hypothesis.pose.pose = pose
        out.detections.append(Detection3D(header=hdr, results=[hypothesis], id=str(index),
                                          bbox=BoundingBox3D(center=pose, size=Vector3(x=length, y=width, z=height))))
    return out


def schedule() -> list[tuple[int, str, object]]:
    """(log time ns, topic, message) of the test bag, in log-time order; 1.3 s long."""
    rows = [(0, TF_STATIC, static_tf, "lidar_top", 0.5), (100, IMAGE, image, 0),
            (200, TF_STATIC, static_tf, "cam_front", 1.25),
            (300, POINTS, cloud, 0), (500, IMAGE, image, 1), (700, DETECTIONS, detections, 0),
            (900, IMAGE, image, 2), (1100, POINTS, cloud, 1), (1300, DETECTIONS, detections, 1)]
    return [(BASE_NS + ms * MS, topic, make(BASE_NS + ms * MS, *args)) for ms, topic, make, *args in rows]


def expected_published(rows) -> list[tuple[str, object]]:
    """What the player publishes for ``rows``: /tf_static merged as tf2 does."""
    merged: dict[str, TransformStamped] = {}
    out = []
    for _, topic, msg in rows:
        if topic == TF_STATIC:
            merged.update((t.child_frame_id, t) for t in msg.transforms)
            msg = TFMessage(transforms=list(merged.values()))
        out.append((topic, msg))
    return out


@pytest.fixture
def bag(tmp_path: Path) -> Path:
    path = tmp_path / "test.mcap"
    with BagWriter(str(path)) as writer:
        for log_ns, topic, msg in schedule():
            writer.write(topic, msg, log_ns)
    return path


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def spin_until(executor: SingleThreadedExecutor, done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.005)
    return done()


def spin_while_playing(executor: SingleThreadedExecutor, inbox: "Inbox", child: subprocess.Popen,
                       done: Callable[[], bool]) -> str:
    """Spins until ``done()``, PLAY_TIMEOUT_S or 1 s after the child exited; a description of
    what happened (for failure messages)."""
    started = time.monotonic()
    matched_after = None
    deadline = started + PLAY_TIMEOUT_S
    while not done() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.005)
        if matched_after is None and all(s.get_publisher_count() > 0 for s in inbox.subscriptions):
            matched_after = time.monotonic() - started
        if child.poll() is not None:
            deadline = min(deadline, time.monotonic() + 1.0)
    topics = [top for top, _, _ in inbox.received]
    return (f"publishers matched {matched_after} s after the child started; received {len(topics)}: "
            f"{topics}; child exit {child.poll()}")


def start_child(ros_env, module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], env=ros_env.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish_child(process: subprocess.Popen, timeout: float = 15.0, terminate: bool = False) -> str:
    """Waits for the child (after SIGTERM with ``terminate``), kills it if it lingers; its output."""
    if terminate and process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output.decode(errors="replace")


class Inbox:
    """Subscriptions of a test node recording (topic, monotonic arrival, message)."""

    def __init__(self, node, topics: dict[str, tuple[type, QoSProfile]]):
        self.node = node
        self.received: list[tuple[str, float, object]] = []
        self.subscriptions = [node.create_subscription(cls, topic, self._callback(topic), qos)
                              for topic, (cls, qos) in topics.items()]

    def _callback(self, topic: str):
        return lambda msg: self.received.append((topic, time.monotonic(), msg))

    def of(self, topic: str) -> list[tuple[float, object]]:
        return [(t, m) for top, t, m in self.received if top == topic]

    def data(self, exclude: tuple[str, ...] = ("/clock",)) -> list[tuple[str, float, object]]:
        return [r for r in self.received if r[0] not in exclude]


@pytest.fixture
def test_node(rclpy_context):
    node = rclpy.create_node("play_record_test", context=rclpy_context)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    yield node, executor
    executor.shutdown()
    node.destroy_node()


def assert_schedule(arrivals: list[float], log_times_ns: list[int], rate: float) -> None:
    """Arrival i - arrival 0 == (log i - log 0) / rate within TIMING_TOLERANCE_S, for every i."""
    errors = [(a - arrivals[0]) - (t - log_times_ns[0]) / 1e9 / rate for a, t in zip(arrivals, log_times_ns)]
    assert max(abs(e) for e in errors) <= TIMING_TOLERANCE_S, f"timing errors (s): {[round(e, 3) for e in errors]}"


def all_topics_qos() -> dict[str, tuple[type, QoSProfile]]:
    return {topic: (cls, LATCHED if topic == TF_STATIC else RELIABLE) for topic, cls in TYPES.items()}


# ------------------------------------------------------------------------------------------------
# bevfusion-play
# ------------------------------------------------------------------------------------------------

def test_play_content_order_timing_and_late_tf_static(ros_env, test_node, bag):
    node, executor = test_node
    inbox = Inbox(node, all_topics_qos())
    late: list[Inbox] = []
    rows = schedule()
    expected = expected_published(rows)
    child = start_child(ros_env, "bevfusion_ros.tools.play", bag, "--start-delay", "1", *WAIT)

    def done() -> bool:
        if not late and inbox.of(POINTS):       # /tf_static was published 100 ms before: join late
            late.append(Inbox(node, {TF_STATIC: (TFMessage, LATCHED)}))
        return len(inbox.received) >= len(expected) and bool(late) and len(late[0].received) >= 2

    try:
        what = spin_while_playing(executor, inbox, child, done)
    finally:
        output = finish_child(child)
    assert child.returncode == 0, output
    assert done(), f"{what}\n{output}"
    assert "published 9 messages" in output, output
    assert [(topic, msg) for topic, _, msg in inbox.received] == expected
    assert_schedule([t for _, t, _ in inbox.received], [ns for ns, _, _ in rows], rate=1.0)
    # The late subscriber got the latched history: the last one holds both static transforms.
    late_msgs = [msg for _, msg in late[0].of(TF_STATIC)]
    assert late_msgs == [msg for topic, msg in expected if topic == TF_STATIC]
    assert [t.child_frame_id for t in late_msgs[-1].transforms] == ["lidar_top", "cam_front"]


def test_play_rate_and_clock(ros_env, test_node, bag):
    node, executor = test_node
    topics = all_topics_qos()
    topics["/clock"] = (Clock, QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE))
    inbox = Inbox(node, topics)
    rows = schedule()
    rate = 2.0
    child = start_child(ros_env, "bevfusion_ros.tools.play", bag, "--start-delay", "1", *WAIT, "--rate", rate,
                        "--clock")
    try:
        what = spin_while_playing(executor, inbox, child, lambda: len(inbox.data()) >= len(rows))
        last_ns = rows[-1][0]     # its /clock went out before the message, may be taken after it
        spin_until(executor, lambda: any(m.clock.sec * 1_000_000_000 + m.clock.nanosec == last_ns
                                         for _, m in inbox.of("/clock")), 2.0)
    finally:
        output = finish_child(child)
    assert child.returncode == 0, output
    assert len(inbox.data()) >= len(rows), f"{what}\n{output}"
    data = inbox.data()
    assert [(topic, msg) for topic, _, msg in data] == expected_published(rows)
    assert_schedule([t for _, t, _ in data], [ns for ns, _, _ in rows], rate=rate)

    clocks = [(t, m.clock.sec * 1_000_000_000 + m.clock.nanosec) for t, m in inbox.of("/clock")]
    values = [v for _, v in clocks]
    first_ns, last_ns = rows[0][0], rows[-1][0]
    assert values == sorted(values), "the bag time went backwards without --loop"
    assert min(values) == first_ns and max(values) == last_ns
    assert {ns for ns, _, _ in rows} <= set(values), "each message's log time goes out on /clock"
    first_arrival, last_arrival = data[0][1], data[-1][1]
    during = [(t, v) for t, v in clocks if first_arrival <= t <= last_arrival]
    # 100 Hz (plus one per message) over the 0.65 s of playback; generous for a loaded machine.
    assert len(during) >= 0.5 * 100 * (last_arrival - first_arrival), len(during)
    for t, v in during:    # the bag time follows the wall time times the rate
        assert abs((v - first_ns) / 1e9 / rate - (t - first_arrival)) <= TIMING_TOLERANCE_S, (t - first_arrival, v)
    # During the start delay (none left if discovery took longer) /clock holds the first log time.
    assert {v for t, v in clocks if t < first_arrival - 0.02} <= {first_ns}


def test_play_loop_two_passes_with_topics(ros_env, test_node, bag):
    node, executor = test_node
    inbox = Inbox(node, all_topics_qos())
    rate = 4.0
    played = (IMAGE, DETECTIONS)
    rows = [row for row in schedule() if row[1] in played]
    expected = expected_published(rows) * 2
    child = start_child(ros_env, "bevfusion_ros.tools.play", bag, "--start-delay", "1", *WAIT, "--rate", rate, "--loop",
                        "--topics", *played)
    try:
        what = spin_while_playing(executor, inbox, child, lambda: all(
            len(inbox.of(topic)) >= 2 * len([r for r in rows if r[1] == topic]) for topic in played))
        assert child.poll() is None, "--loop must keep playing"
    finally:
        output = finish_child(child, terminate=True)
    assert child.returncode == 0, output
    assert len(inbox.received) >= len(expected), f"{what}\n{output}"
    assert "stopped" in output, output
    assert all(topic in played for topic, _, _ in inbox.received)
    # Each topic's messages in order, twice. (The first message of the second pass is due with
    # the last of the first pass: those two, on different topics, may arrive in either order.)
    arrivals = {}
    for topic in played:
        indices = [i for i, (top, _) in enumerate(expected) if top == topic]
        got = inbox.of(topic)[:len(indices)]
        assert [msg for _, msg in got] == [expected[i][1] for i in indices], topic
        arrivals.update((i, t) for i, (t, _) in zip(indices, got))
    # The second pass starts when the first ends and keeps the schedule (no drift).
    span = rows[-1][0] - rows[0][0]
    log_times = [ns for ns, _, _ in rows] + [ns + span for ns, _, _ in rows]
    assert_schedule([arrivals[i] for i in range(len(expected))], log_times, rate=rate)


def test_play_library_on_message_and_stop(test_node, bag):
    node, _ = test_node
    stop = threading.Event()
    seen = []

    def on_message(message) -> None:
        seen.append((message.log_time_ns, message.topic, message.message))
        if len(seen) == 12:
            stop.set()

    result = play_module.play(str(bag), node, rate=20.0, loop=True, clock=True, on_message=on_message,
                              start_delay=0.0, stop=stop)
    assert (result.published, result.passes, result.stopped) == (12, 1, True)
    rows = schedule()
    assert seen == (rows + rows)[:12]
    with pytest.raises(ValueError, match="not in"):
        play_module.play(str(bag), node, topics=["/nope"], start_delay=0.0)
    assert play_module.message_class("vision_msgs/msg/Detection3DArray") is Detection3DArray
    assert play_module.message_class("sensor_msgs/Image") is Image


def test_play_cli_errors(ros_env, tmp_path, capsys):
    assert play_tool.main([str(tmp_path / "missing.mcap"), "--start-delay", "0"]) == 1
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        play_tool.main([str(tmp_path / "x.mcap"), "--rate", "0"])
    assert exit_info.value.code == 2


# ------------------------------------------------------------------------------------------------
# bevfusion-record
# ------------------------------------------------------------------------------------------------

def diagnostics(ns: int, seed: int) -> DiagnosticArray:
    return DiagnosticArray(header=header(ns, ""), status=[DiagnosticStatus(
        level=DiagnosticStatus.WARN, name="bevfusion: test", message=f"status {seed}", hardware_id="cpu",
        values=[KeyValue(key="frames", value=str(seed)), KeyValue(key="latency_ms", value="12.5")])])


def test_record_child_process_bag_and_json(ros_env, test_node, tmp_path):
    node, executor = test_node
    det_topic, diag_topic = "/test/detections", "/diagnostics"
    det_pub = node.create_publisher(Detection3DArray, det_topic, RELIABLE)
    diag_pub = node.create_publisher(DiagnosticArray, diag_topic, RELIABLE)
    out, json_dir = tmp_path / "rec.mcap", tmp_path / "json"
    wall_before = time.time_ns()
    child = start_child(ros_env, "bevfusion_ros.tools.record", "--out", out, "--topics", det_topic, diag_topic,
                        "--count", "3", "--json", json_dir, "--duration", "20")
    published: list[tuple[str, object]] = []
    try:
        matched = spin_until(executor, lambda: det_pub.get_subscription_count() > 0
                             and diag_pub.get_subscription_count() > 0, DISCOVERY_TIMEOUT_S)
        assert matched, f"recorder did not subscribe (alive: {child.poll() is None})"
        stamps = [BASE_NS + i * 100 * MS for i in range(3)]
        plan = [(diag_topic, diag_pub, diagnostics(stamps[0], 0)), (det_topic, det_pub, detections(stamps[0], 0)),
                (diag_topic, diag_pub, diagnostics(stamps[1], 1)), (det_topic, det_pub, detections(stamps[1], 1)),
                (det_topic, det_pub, detections(stamps[2], 2))]
        for topic, publisher, msg in plan:
            publisher.publish(msg)
            published.append((topic, msg))
            spin_until(executor, lambda: False, 0.05)
        spin_until(executor, lambda: child.poll() is not None, 10.0)
    finally:
        output = finish_child(child, terminate=child.poll() is None)
    wall_after = time.time_ns()
    assert child.returncode == 0, output

    assert bag_summary(str(out)) == {det_topic: ("vision_msgs/msg/Detection3DArray", 3),
                                     diag_topic: ("diagnostic_msgs/msg/DiagnosticArray", 2)}
    recorded = list(read_bag(str(out)))
    assert [(m.topic, m.message) for m in recorded] == published
    log_times = [m.log_time_ns for m in recorded]
    assert log_times == sorted(log_times) and wall_before <= log_times[0] and log_times[-1] <= wall_after

    files = sorted(json_dir.glob("*.json"))
    assert [f.name for f in files] == [f"detections_{ns}.json" for ns in stamps]
    for seed, (path, ns) in enumerate(zip(files, stamps)):
        document = json.loads(path.read_text())
        assert (document["topic"], document["stamp_ns"], document["frame_id"]) == (det_topic, ns, "lidar_top")
        assert len(document["boxes"]) == len(BOXES)
        for index, (box, (class_id, score, (x, y, z), yaw, size)) in enumerate(zip(document["boxes"], BOXES)):
            assert (box["id"], box["class_id"], box["score"]) == (str(index), class_id, score)
            assert box["center"] == [x + seed, y, z] and box["size"] == list(size)
            assert box["yaw"] == pytest.approx(yaw, abs=1e-12)


def test_recorder_in_process_with_play(rclpy_context, bag, tmp_path):
    """The library API of both: play() in a thread, Recorder on a second node spun here."""
    player = rclpy.create_node("player", context=rclpy_context)
    recorder_node = rclpy.create_node("recorder", context=rclpy_context)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(recorder_node)
    out = tmp_path / "copy.mcap"
    topics = [DETECTIONS, IMAGE, POINTS, TF_STATIC, "/never"]
    recorder = Recorder(recorder_node, out, topics, json_dir=tmp_path / "json")
    assert recorder.pending == topics
    results = []
    thread = threading.Thread(target=lambda: results.append(
        play_module.play(str(bag), player, rate=5.0, start_delay=0.5)))
    try:
        # Subscribes once the player's publishers appear, before the start delay ends.
        thread.start()
        assert spin_until(executor, lambda: recorder.pending == ["/never"], DISCOVERY_TIMEOUT_S)
        spin_until(executor, lambda: sum(recorder.counts.values()) >= len(schedule()), PLAY_TIMEOUT_S)
    finally:
        thread.join(timeout=PLAY_TIMEOUT_S)
        recorder.close()
        executor.shutdown()
        player.destroy_node()
        recorder_node.destroy_node()
    assert results and results[0].published == len(schedule())
    assert recorder.counts == {DETECTIONS: 2, IMAGE: 3, POINTS: 2, TF_STATIC: 2, "/never": 0}
    assert recorder.types[DETECTIONS] == "vision_msgs/msg/Detection3DArray"
    assert [(m.topic, m.message) for m in read_bag(str(out))] == expected_published(schedule())
    assert len(list((tmp_path / "json").glob("detections_*.json"))) == 2
    assert record_module.quaternion_yaw(Quaternion(x=0.0, y=0.0, z=math.sin(-1.5), w=math.cos(-1.5))) \
        == pytest.approx(-3.0)
