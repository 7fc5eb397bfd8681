"""``bevfusion-record``: record topics into an MCAP bag with rclpy, where ``ros2 bag record`` is
not installed.

    bevfusion-record --out BAG [--topics T ...] [--duration S] [--count N] [--json DIR]
                     [--use-sim-time]

Topics are taken as they appear in the ROS graph, with the QoS of their publishers, and every
message is written with :class:`bevfusion_ros.ros.bag.BagWriter`; ``--json DIR`` also writes
every ``vision_msgs/Detection3DArray`` as a JSON file. Topic discovery, QoS, log times, when it
stops, exit status and the JSON layout: docs/tools.md, "bevfusion-record".

Library use (the demo, tests): :class:`Recorder` on a node that the caller spins.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from bevfusion_ros.ros.bag import BagError, BagWriter, message_class
from bevfusion_ros.ros.convert import quaternion_yaw

DEFAULT_TOPICS = ("/bevfusion/detections", "/bevfusion/frame_info", "/bevfusion/markers", "/diagnostics")
DETECTION3D_ARRAY = "vision_msgs/msg/Detection3DArray"
#: Seconds between two looks at the graph for the topics not subscribed yet.
DISCOVERY_PERIOD_S = 0.1
QUEUE_DEPTH = 100


def detections_json(msg: Any, topic: str = "", receive_time_ns: int | None = None) -> dict[str, Any]:
    """The JSON document of a Detection3DArray (format in docs/tools.md)."""
    boxes = []
    for detection in msg.detections:
        best = max(detection.results, key=lambda r: r.hypothesis.score, default=None)
        pose = detection.bbox.center
        boxes.append({
            "id": detection.id,
            "class_id": best.hypothesis.class_id if best is not None else "",
            "score": float(best.hypothesis.score) if best is not None else None,
            "center": [pose.position.x, pose.position.y, pose.position.z],
            "yaw": quaternion_yaw(pose.orientation),
            "size": [detection.bbox.size.x, detection.bbox.size.y, detection.bbox.size.z],
        })
    stamp = msg.header.stamp
    return {
        "topic": topic,
        "stamp_ns": int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec),
        "frame_id": msg.header.frame_id,
        "receive_time_ns": receive_time_ns,
        "boxes": boxes,
    }


def write_detections_json(directory: Path, document: dict[str, Any]) -> Path:
    """Writes ``document`` to ``directory/detections_<stamp_ns>.json`` atomically; returns the path."""
    path = directory / f"detections_{document['stamp_ns']}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def subscription_qos(publishers: list[Any]) -> QoSProfile:
    """Keep-last QUEUE_DEPTH, reliable / transient local when every publisher in ``publishers``
    (``TopicEndpointInfo``) is, else best effort / volatile."""
    profiles = [p.qos_profile for p in publishers]
    reliable = bool(profiles) and all(p.reliability == ReliabilityPolicy.RELIABLE for p in profiles)
    latched = bool(profiles) and all(p.durability == DurabilityPolicy.TRANSIENT_LOCAL for p in profiles)
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=QUEUE_DEPTH,
        reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
    )


class Recorder:
    """Records ``topics`` from ``node`` into the MCAP bag ``out_path`` (see docs/tools.md).

    The caller spins the node (the subscriptions' callbacks write the bag; a steady timer of
    the node subscribes to topics as they appear). ``counts[topic]``: messages written per
    topic; ``types[topic]``: the type of each subscribed topic; :attr:`pending`: topics not
    subscribed yet. Call :meth:`close` (or use ``with``) to finish the file.
    """

    def __init__(self, node: Node, out_path: str | os.PathLike[str], topics: Iterable[str] = DEFAULT_TOPICS,
                 json_dir: str | os.PathLike[str] | None = None):
        self.node = node
        self.topics = list(dict.fromkeys(topics))
        if not self.topics:
            raise ValueError("no topics to record")
        self.out_path = Path(out_path)
        self.json_dir = Path(json_dir) if json_dir is not None else None
        if self.json_dir is not None:
            self.json_dir.mkdir(parents=True, exist_ok=True)
        self.counts: dict[str, int] = {topic: 0 for topic in self.topics}
        self.types: dict[str, str] = {}
        self.json_files = 0
        self._subscriptions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._writer = BagWriter(str(self.out_path))
        self._timer: Any = node.create_timer(DISCOVERY_PERIOD_S, self._on_timer,
                                             clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.discover()

    @property
    def pending(self) -> list[str]:
        """Requested topics not subscribed to yet (no publisher seen, or an unknown type)."""
        return [topic for topic in self.topics if topic not in self._subscriptions]

    def _on_timer(self) -> None:
        self.discover()

    def discover(self) -> list[str]:
        """Subscribes to the pending topics that have a publisher now; returns them."""
        pending = self.pending
        if self._closed or not pending:
            if not pending and self._timer is not None:
                self._timer.cancel()
            return []
        graph = dict(self.node.get_topic_names_and_types())
        added = []
        for topic in pending:
            types = graph.get(topic)
            if not types:
                continue
            publishers = self.node.get_publishers_info_by_topic(topic)
            if not publishers:
                continue
            type_name = types[0]
            if len(types) > 1:
                self.node.get_logger().warning(f"{topic} has several types {types}; recording {type_name}")
            try:
                cls = message_class(type_name)
            except BagError as error:
                if self.types.get(topic) != type_name:   # log once per type
                    self.node.get_logger().error(f"cannot record {topic}: {error}")
                    self.types[topic] = type_name
                continue
            self._subscriptions[topic] = self.node.create_subscription(
                cls, topic, self._callback(topic, type_name), subscription_qos(publishers))
            self.types[topic] = type_name
            added.append(topic)
            self.node.get_logger().info(f"recording {topic} ({type_name})")
        if not self.pending and self._timer is not None:
            self._timer.cancel()
        return added

    def _callback(self, topic: str, type_name: str):
        def on_message(msg: Any) -> None:
            receive_ns = self.node.get_clock().now().nanoseconds
            with self._lock:
                if self._closed:
                    return
                self._writer.write(topic, msg, receive_ns)
                self.counts[topic] += 1
                if self.json_dir is not None and type_name == DETECTION3D_ARRAY:
                    write_detections_json(self.json_dir, detections_json(msg, topic, receive_ns))
                    self.json_files += 1
        return on_message

    def close(self) -> None:
        """Stops recording and finishes the bag file (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._timer is not None:
                self.node.destroy_timer(self._timer)
                self._timer = None
            for subscription in self._subscriptions.values():
                self.node.destroy_subscription(subscription)
        finally:
            self._writer.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
