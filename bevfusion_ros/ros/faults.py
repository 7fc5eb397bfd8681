"""Malformed and badly timed inputs, as a hostile but realistic sensor stack sends them to
``bevfusion_node``: the catalogue behind the fault-matrix tests and the soak benchmark.

Each :class:`Fault` turns the messages of one good frame (:class:`FrameMessages`, as
:func:`bevfusion_ros.ros.frame_messages.frame_messages` builds them) into the faulty ones, and
may choose a faulty stamp. ``outcome`` says what the node must make of the faulty frame:

* ``"degraded"``: answered, and the frame's diagnostic is WARN with the reason;
* ``"failed"``: not answered, counted in ``frames_failed`` with the reason;
* ``"dropped"``: not answered, counted in ``frames_dropped`` with the reason.

In every case the next good frame is answered (or dropped only because the worker was busy).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from sensor_msgs.msg import PointCloud2

from bevfusion_ros.ros import convert
from bevfusion_ros.ros.frame_messages import FrameMessages, cloud_message

OUTCOMES = ("degraded", "failed", "dropped")
NS_PER_MS = 1_000_000
#: How far back the out-of-order stamp goes (a jittering driver): less than any sane tolerance.
BACKWARDS_JITTER_NS = 30 * NS_PER_MS
#: How far ahead the future stamp goes: a clock off by a day.
FUTURE_OFFSET_NS = 86_400 * 1_000_000_000
#: Camera whose image or CameraInfo the camera faults spoil (index in camera order).
SPOILED_CAMERA = 3


@dataclass(frozen=True)
class Fault:
    """One fault: ``corrupt(messages, max_points)`` gives the faulty messages (a deep copy where
    changed), ``stamp(good_ns, previous_ns)`` the stamp of the faulty frame."""

    name: str
    outcome: str
    reason: str                  # text the node's diagnostic must contain
    corrupt: Callable[[FrameMessages, int], FrameMessages] = field(default=lambda messages, _: messages)
    stamp: Callable[[int, int], int] = field(default=lambda good_ns, _: good_ns)


def _with_cloud(messages: FrameMessages, cloud: PointCloud2) -> FrameMessages:
    return replace(messages, cloud=cloud)


def _cloud_copy(messages: FrameMessages) -> PointCloud2:
    return copy.deepcopy(messages.cloud)


def short_data(messages: FrameMessages, _: int) -> FrameMessages:
    """``data`` half as long as ``width x height x point_step`` says."""
    cloud = _cloud_copy(messages)
    cloud.data = cloud.data[:len(cloud.data) // 2]
    return _with_cloud(messages, cloud)


def wrong_byte_order_flag(messages: FrameMessages, _: int) -> FrameMessages:
    """``is_bigendian`` set on little-endian data."""
    cloud = _cloud_copy(messages)
    cloud.is_bigendian = True
    return _with_cloud(messages, cloud)


def small_point_step(messages: FrameMessages, _: int) -> FrameMessages:
    """``point_step`` of 8 bytes while the fields reach beyond (x, y, z, intensity: 16)."""
    cloud = _cloud_copy(messages)
    cloud.point_step = 8
    cloud.row_step = cloud.width * cloud.point_step
    return _with_cloud(messages, cloud)


def _points(messages: FrameMessages) -> np.ndarray:
    from bevfusion_ros.ros import pointcloud2
    records = pointcloud2.read_points(messages.cloud)
    return np.stack([records[name] for name in records.dtype.names], axis=1).astype(np.float32)


def _recloud(messages: FrameMessages, points: np.ndarray) -> FrameMessages:
    stamp = convert.stamp_to_ns(messages.cloud.header.stamp)
    names = tuple(f.name for f in messages.cloud.fields)
    return _with_cloud(messages, cloud_message(points, stamp, messages.cloud.header.frame_id, names))


def nan_points(messages: FrameMessages, _: int) -> FrameMessages:
    """Every 100th point with z = NaN."""
    points = _points(messages)
    points[::100, 2] = np.nan
    return _recloud(messages, points)


def empty_cloud(messages: FrameMessages, _: int) -> FrameMessages:
    """A cloud with the usual fields and no point."""
    return _recloud(messages, _points(messages)[:0])


def huge_cloud(messages: FrameMessages, max_points: int) -> FrameMessages:
    """More points than ``lidar.max_points`` (the cloud repeated)."""
    points = _points(messages)
    repeats = max_points // max(len(points), 1) + 2
    return _recloud(messages, np.tile(points, (repeats, 1))[:max_points + 1000])


def missing_z(messages: FrameMessages, _: int) -> FrameMessages:
    """A cloud without a z field."""
    points = _points(messages)
    names = tuple(f.name for f in messages.cloud.fields if f.name != "z")
    columns = [i for i, f in enumerate(messages.cloud.fields) if f.name != "z"]
    stamp = convert.stamp_to_ns(messages.cloud.header.stamp)
    return _with_cloud(messages, cloud_message(points[:, columns], stamp, messages.cloud.header.frame_id, names))


def _with_image(messages: FrameMessages, image) -> FrameMessages:
    images = list(messages.images)
    images[SPOILED_CAMERA] = image
    return replace(messages, images=images)


def wrong_encoding(messages: FrameMessages, _: int) -> FrameMessages:
    """One camera's image labelled ``32FC1``."""
    image = copy.deepcopy(messages.images[SPOILED_CAMERA])
    image.encoding = "32FC1"
    return _with_image(messages, image)


def wrong_size(messages: FrameMessages, _: int) -> FrameMessages:
    """One camera's image at half the configured size."""
    original = messages.images[SPOILED_CAMERA]
    half = np.zeros((original.height // 2, original.width // 2, 3), np.uint8)
    return _with_image(messages, convert.rgb_to_image(half, original.header))


def missing_camera(messages: FrameMessages, _: int) -> FrameMessages:
    """One camera's image not sent at all."""
    return _with_image(messages, None)


def bad_camera_info(messages: FrameMessages, _: int) -> FrameMessages:
    """One camera's CameraInfo with K all zero (an uncalibrated camera driver)."""
    infos = list(messages.camera_infos)
    info = copy.deepcopy(infos[SPOILED_CAMERA])
    info.k = [0.0] * 9
    infos[SPOILED_CAMERA] = info
    return replace(messages, camera_infos=infos)


FAULTS: tuple[Fault, ...] = (
    Fault("short_data", "failed", "bytes of data", short_data),
    Fault("wrong_byte_order_flag", "degraded", "byte order", wrong_byte_order_flag),
    Fault("small_point_step", "failed", "point_step", small_point_step),
    Fault("nan_points", "degraded", "NaN", nan_points),
    Fault("empty_cloud", "degraded", "empty point cloud", empty_cloud),
    Fault("huge_cloud", "degraded", "truncated", huge_cloud),
    Fault("missing_z", "failed", "lacks field(s) ['z']", missing_z),
    Fault("wrong_encoding", "degraded", "32FC1", wrong_encoding),
    Fault("wrong_size", "degraded", "bad image: size", wrong_size),
    Fault("missing_camera", "degraded", "cameras missing", missing_camera),
    Fault("bad_camera_info", "degraded", "CameraInfo", bad_camera_info),
    Fault("stamp_backwards", "dropped", "out of order",
          stamp=lambda good_ns, previous_ns: previous_ns - BACKWARDS_JITTER_NS),
    Fault("stamp_future", "dropped", "in the future",
          stamp=lambda good_ns, previous_ns: good_ns + FUTURE_OFFSET_NS),
    Fault("duplicate_stamp", "dropped", "duplicate",
          stamp=lambda good_ns, previous_ns: previous_ns),
)
FAULTS_BY_NAME = {fault.name: fault for fault in FAULTS}
assert all(fault.outcome in OUTCOMES for fault in FAULTS)
