"""Conversions between ROS 2 messages and the numpy/Detections world of bevfusion_ros.

Pure functions: no node, no ``rclpy.init`` needed; only this ROS layer imports message packages.
Images are ``[H, W, 3]`` uint8 RGB arrays, calibrations 3x3 ``K`` and 4x4 homogeneous matrices,
stamps integer nanoseconds; a CameraInfo's lens distortion reads as a
:class:`~bevfusion_ros.io.distortion.Distortion` (:func:`camera_info_distortion`). Boxes are
published in the lidar frame with REP-103 conventions, each box's velocity in
``bevfusion_ros_msgs/FrameInfo.velocities``; detections and markers are written straight to CDR
bytes. The conventions, and why CDR bytes and ``array.array('B')``:
docs/messages.md.
"""
from __future__ import annotations

import array
import math
import struct
from typing import Any, Mapping, Sequence

import numpy as np
from bevfusion_ros_msgs.msg import FrameInfo
from builtin_interfaces.msg import Duration, Time
from geometry_msgs.msg import Quaternion, Transform, Vector3
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import ColorRGBA, Header
from vision_msgs.msg import Detection3DArray
from visualization_msgs.msg import Marker, MarkerArray

try:  # OpenCV converts channel orders ~5x faster than numpy; compressed_to_rgb needs it.
    import cv2
except ImportError:  # image_to_rgb / rgb_to_image then fall back to numpy
    cv2 = None  # type: ignore[assignment]

from bevfusion_ros.camera.jpeg import ImageError, decode_rgb, uint8_buffer
from bevfusion_ros.detections import SCORE, VX, VY, Detections, H, L, W, X, Y, Z, cuda_yaw
from bevfusion_ros.head.decode import BOX_COLUMNS
from bevfusion_ros.io.distortion import Distortion, distortion_from
from bevfusion_ros.ros.cdr import CdrWriter, cdr_string, header_bytes
from bevfusion_ros.streaming.transforms import quaternion_from_matrix, transform_from_translation_quaternion

__all__ = [
    "CLASS_COLORS", "CalibrationMessageError", "ImageError", "IMAGE_CHANNELS", "BOX_EDGES",
    "VELOCITY_ARROW_MIN_SPEED", "box_poses", "camera_info_distortion", "camera_info_intrinsics", "class_color",
    "compressed_to_rgb", "detections_to_markers", "detections_to_msg", "frame_info", "image_to_rgb",
    "serialize_detections", "serialize_markers", "intrinsics_to_camera_info",
    "matrix_to_transform", "ns_to_stamp", "rgb_to_image", "stamp_to_ns", "transform_to_matrix",
    "velocities", "yaw_to_quaternion", "quaternion_yaw",
]


class CalibrationMessageError(ValueError):
    """A CameraInfo or Transform message that does not hold a usable calibration."""


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

#: Supported sensor_msgs/Image encodings -> bytes (channels) per pixel.
IMAGE_CHANNELS: dict[str, int] = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
_SIXTEEN_BIT = {"rgb16", "bgr16", "rgba16", "bgra16", "mono16"}
if cv2 is not None:
    _CV2_TO_RGB = {"bgr8": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB,
                   "bgra8": cv2.COLOR_BGRA2RGB, "mono8": cv2.COLOR_GRAY2RGB}


_uint8_buffer = uint8_buffer      # flat uint8 view of a message's data (bevfusion_ros.camera.jpeg)


def image_to_rgb(msg: Image) -> np.ndarray:
    """Pixels of ``msg`` as a C-contiguous ``[H, W, 3]`` uint8 RGB array.

    Encodings rgb8, bgr8, rgba8, bgra8 (alpha dropped) and mono8 (replicated to 3 channels);
    rows may be padded (``step > width * channels``). rgb8 without padding is returned as a view
    of ``msg.data`` (shares its memory), anything else as a fresh array.
    Raises :class:`ImageError` for other encodings, an empty image, ``step`` smaller than a row
    or ``data`` shorter than ``step * height``.
    """
    encoding, height, width, step = msg.encoding, int(msg.height), int(msg.width), int(msg.step)
    channels = IMAGE_CHANNELS.get(encoding)
    if channels is None:
        supported = ", ".join(IMAGE_CHANNELS)
        if encoding in _SIXTEEN_BIT or "16" in encoding:
            raise ImageError(f"image encoding {encoding!r} has 16-bit channels; only 8-bit "
                             f"encodings are supported ({supported})")
        raise ImageError(f"unsupported image encoding {encoding!r} (supported: {supported})")
    if height == 0 or width == 0:
        raise ImageError(f"empty {encoding} image ({width}x{height} pixels)")
    row_bytes = width * channels
    if step < row_bytes:
        raise ImageError(f"{encoding} image of width {width} needs step >= {row_bytes} bytes "
                         f"({channels} per pixel), got step {step}")
    flat = _uint8_buffer(msg.data)
    needed = step * height
    if flat.size < needed:
        raise ImageError(f"{encoding} image {width}x{height} with step {step} needs {needed} "
                         f"bytes of data, got {flat.size}")
    pixels = flat[:needed].reshape(height, step)[:, :row_bytes].reshape(height, width, channels)
    if encoding == "rgb8":
        return np.ascontiguousarray(pixels)  # a view when step == width * 3
    if cv2 is not None:  # handles the row stride itself, returns a new C-contiguous array
        return cv2.cvtColor(pixels, _CV2_TO_RGB[encoding])
    if encoding == "bgr8":
        return np.ascontiguousarray(pixels[..., ::-1])
    if encoding == "rgba8":
        return np.ascontiguousarray(pixels[..., :3])
    if encoding == "bgra8":
        return np.ascontiguousarray(pixels[..., 2::-1])
    return np.repeat(pixels, 3, axis=2)  # mono8


def compressed_to_rgb(msg: CompressedImage) -> np.ndarray:
    """Decodes ``msg`` (JPEG, PNG, ... whatever OpenCV reads) to a ``[H, W, 3]`` uint8 RGB array.

    Grey images are replicated to 3 channels, alpha is dropped, 16-bit images are scaled to 8 bit
    (:func:`bevfusion_ros.camera.jpeg.decode_rgb`; :class:`~bevfusion_ros.camera.jpeg.ImageDecoder`
    decodes a frame's images in parallel or with nvJPEG).
    Raises :class:`ImageError` when the data is empty or cannot be decoded.
    """
    return decode_rgb(msg.data, "CompressedImage", msg.format)


def rgb_to_image(rgb: np.ndarray, header: Header, encoding: str = "rgb8") -> Image:
    """An Image of the ``[H, W, 3]`` uint8 RGB array ``rgb``, encoded as rgb8 or bgr8, no row
    padding (``step = 3 * W``)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be a [H, W, 3] uint8 array, got {rgb.dtype} {list(rgb.shape)}")
    if encoding == "rgb8":
        pixels = np.ascontiguousarray(rgb)
    elif encoding == "bgr8":
        pixels = (cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR) if cv2 is not None
                  else np.ascontiguousarray(rgb[..., ::-1]))
    else:
        raise ValueError(f"rgb_to_image supports encodings rgb8 and bgr8, got {encoding!r}")
    height, width = rgb.shape[:2]
    data = array.array("B")
    data.frombytes(pixels.tobytes())
    return Image(header=header, height=height, width=width, encoding=encoding, is_bigendian=0,
                 step=3 * width, data=data)


# ----------------------------------------------------------------------------------------------
# Calibration and time
# ----------------------------------------------------------------------------------------------

def _check_intrinsics(k: np.ndarray, what: str) -> np.ndarray:
    """``k`` (9 values or 3x3) as a validated float64 3x3 camera matrix."""
    k = np.asarray(k, dtype=np.float64)
    if k.size != 9:
        raise CalibrationMessageError(f"{what}: K must have 9 values, got {k.size}")
    k = k.reshape(3, 3)
    if not np.isfinite(k).all():
        raise CalibrationMessageError(f"{what}: K has non-finite values {k.ravel().tolist()}")
    if not (k[0, 0] > 0 and k[1, 1] > 0):
        raise CalibrationMessageError(
            f"{what}: K must have fx > 0 and fy > 0 (all zero means an uncalibrated camera), "
            f"got fx={k[0, 0]}, fy={k[1, 1]}")
    if k[1, 0] != 0 or not np.array_equal(k[2], [0.0, 0.0, 1.0]):
        raise CalibrationMessageError(
            f"{what}: K must be [[fx, s, cx], [0, fy, cy], [0, 0, 1]], got {k.tolist()}")
    return k


def camera_info_intrinsics(msg: CameraInfo) -> np.ndarray:
    """The camera matrix ``K`` of ``msg`` (``k`` row-major), float64 ``[3, 3]``.

    Raises :class:`CalibrationMessageError` unless all values are finite, fx > 0, fy > 0,
    ``k[3] == 0`` and the last row is ``[0, 0, 1]``.
    """
    return _check_intrinsics(msg.k, f"CameraInfo of frame {msg.header.frame_id!r}")


def camera_info_distortion(msg: CameraInfo) -> Distortion | None:
    """The lens distortion of ``msg`` (``distortion_model``, ``d``); None when ``d`` is empty or
    all zero. Raises :class:`~bevfusion_ros.io.distortion.DistortionError` (a ValueError) for an
    unsupported model or coefficients that do not fit it."""
    return distortion_from(msg.distortion_model, msg.d)


def intrinsics_to_camera_info(k: np.ndarray, width: int, height: int, header: Header,
                              distortion: Distortion | None = None) -> CameraInfo:
    """A CameraInfo of a pinhole camera: ``K``, ``R`` = identity, ``P`` = ``[K | 0]`` and
    ``distortion`` (None: plumb_bob with zero coefficients, an undistorted camera)."""
    k = _check_intrinsics(k, "intrinsics")
    projection = np.zeros((3, 4))
    projection[:, :3] = k
    model, coefficients = ("plumb_bob", [0.0] * 5) if distortion is None else \
        (distortion.model, list(distortion.coefficients))
    return CameraInfo(header=header, height=int(height), width=int(width),
                      distortion_model=model, d=coefficients, k=k.ravel().tolist(),
                      r=np.eye(3).ravel().tolist(), p=projection.ravel().tolist())


def transform_to_matrix(transform: Transform) -> np.ndarray:
    """The float64 ``[4, 4]`` homogeneous matrix of ``transform`` (quaternion normalised).

    Raises :class:`CalibrationMessageError` for a non-finite translation or quaternion, or a
    quaternion of (near) zero norm.
    """
    t, q = transform.translation, transform.rotation
    translation = np.array([t.x, t.y, t.z], dtype=np.float64)
    quaternion = np.array([q.x, q.y, q.z, q.w], dtype=np.float64)
    if not (np.isfinite(translation).all() and np.isfinite(quaternion).all()):
        raise CalibrationMessageError(f"transform has non-finite values: translation "
                                      f"{translation.tolist()}, rotation (x, y, z, w) {quaternion.tolist()}")
    norm = float(np.linalg.norm(quaternion))
    if norm < 1e-9:
        raise CalibrationMessageError(f"transform rotation quaternion (x, y, z, w) "
                                      f"{quaternion.tolist()} has zero norm")
    return transform_from_translation_quaternion(translation, quaternion)


def matrix_to_transform(matrix: np.ndarray, tolerance: float = 1e-4) -> Transform:
    """The Transform of a ``[4, 4]`` (or ``[3, 4]``) rigid transformation matrix.

    The rotation block must be a proper rotation (``R^T R = I`` and ``det R = 1`` within
    ``tolerance``), else ValueError. The quaternion is unit length with ``w >= 0``.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape not in ((4, 4), (3, 4)):
        raise ValueError(f"transformation matrix must be 4x4 or 3x4, got {list(m.shape)}")
    if not np.isfinite(m).all():
        raise ValueError(f"transformation matrix has non-finite values: {m.tolist()}")
    if m.shape == (4, 4) and not np.allclose(m[3], [0, 0, 0, 1], atol=tolerance):
        raise ValueError(f"last row of the transformation matrix must be [0, 0, 0, 1], got {m[3].tolist()}")
    r = m[:3, :3]
    if (not np.allclose(r.T @ r, np.eye(3), atol=tolerance)
            or abs(np.linalg.det(r) - 1.0) > tolerance):
        raise ValueError(f"rotation block is not a proper rotation matrix: {r.tolist()}")
    quaternion = quaternion_from_matrix(r)                       # Shepperd's method, unit length
    x, y, z, w = (quaternion if quaternion[3] >= 0 else -quaternion).tolist()
    tx, ty, tz = m[:3, 3].tolist()
    return Transform(translation=Vector3(x=tx, y=ty, z=tz), rotation=Quaternion(x=x, y=y, z=z, w=w))


def stamp_to_ns(stamp: Time) -> int:
    """Nanoseconds since the epoch of a builtin_interfaces/Time."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    """builtin_interfaces/Time of ``ns`` nanoseconds (``0 <= nanosec < 1e9``, sec floored)."""
    sec, nanosec = divmod(int(ns), 1_000_000_000)
    if not -2**31 <= sec < 2**31:
        raise ValueError(f"{ns} ns does not fit a builtin_interfaces/Time (int32 seconds)")
    return Time(sec=sec, nanosec=nanosec)


def _duration(seconds: float) -> Duration:
    """builtin_interfaces/Duration of ``seconds`` >= 0."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"duration must be finite and >= 0 seconds, got {seconds}")
    total_ns = int(round(seconds * 1e9))
    sec, nanosec = divmod(total_ns, 1_000_000_000)
    return Duration(sec=sec, nanosec=nanosec)


# ----------------------------------------------------------------------------------------------
# Detections
# ----------------------------------------------------------------------------------------------

def quaternion_yaw(q: Any) -> float:
    """Heading (rotation about +z) in radians of the quaternion ``q`` (x, y, z, w): the yaw of its
    z-y-x Euler angles; exact for a pure rotation about z (the inverse of :func:`yaw_to_quaternion`)."""
    return math.atan2(2.0 * (q.w * q.z + q.x * q.y), 1.0 - 2.0 * (q.y * q.y + q.z * q.z))


def yaw_to_quaternion(psi: float) -> Quaternion:
    """Quaternion of the rotation about +z by ``psi`` radians (REP-103 heading, CCW from +x)."""
    half = 0.5 * float(psi)
    return Quaternion(x=0.0, y=0.0, z=math.sin(half), w=math.cos(half))


def _quaternions(headings: np.ndarray) -> np.ndarray:
    """float64 ``[M, 4]`` (x, y, z, w) of rotations about +z by ``headings`` (:func:`yaw_to_quaternion`)."""
    half = 0.5 * headings.astype(np.float64)
    zeros = np.zeros_like(half)
    return np.stack([zeros, zeros, np.sin(half), np.cos(half)], axis=1)


def box_poses(detections: Detections) -> np.ndarray:
    """float64 ``[M, 7]``: each box's ``geometry_msgs/Pose`` as written (position = box centre,
    orientation (x, y, z, w) = rotation about +z by the REP-103 heading)."""
    centres = detections.boxes[:, [X, Y, Z]].astype(np.float64)
    return np.concatenate([centres, _quaternions(detections.headings())], axis=1)


def serialize_detections(detections: Detections, header: Header) -> bytes:
    """The Detection3DArray of ``detections`` as CDR bytes (for ``Publisher.publish(bytes)``),
    written with NumPy rows instead of one Python message object per field (~20x faster at 200
    boxes). One Detection3D per box, in order, each with ``header``, ``id`` = str(index), one
    hypothesis (class name, score, pose = box centre + heading, zero covariance) and ``bbox``
    (same pose, size = (length, width, height)). Velocities are not in it: see :func:`velocities`.
    """
    boxes = detections.boxes.astype(np.float64)
    pose = box_poses(detections)                                                                  # [M, 7]
    # Per box, the float64 run from hypothesis.score to bbox.size: score, pose, covariance[36], pose, size.
    rows = np.concatenate([boxes[:, [SCORE]], pose, np.zeros((len(boxes), 36)), pose, boxes[:, [L, W, H]]], axis=1)
    head = header_bytes(header)
    class_ids = [cdr_string(name) for name in detections.class_names]
    writer = CdrWriter()
    writer.put(head, 4)
    writer.uint32(len(boxes))
    for index, (label, row) in enumerate(zip(detections.labels.tolist(), rows)):
        writer.put(head, 4)
        writer.put(_U32_ONE, 4)                                 # results: one hypothesis
        writer.put(class_ids[label], 4)                         # hypothesis.class_id
        writer.put(row.tobytes(), 8)
        writer.string(str(index))
    return writer.getvalue()


def detections_to_msg(detections: Detections, header: Header) -> Detection3DArray:
    """:func:`serialize_detections` as a Python message (REP-103, see docs/messages.md)."""
    return deserialize_message(serialize_detections(detections, header), Detection3DArray)


def msg_to_detections(msg: Detection3DArray, class_names: tuple[str, ...],
                      velocities: list[Vector3] | None = None) -> Detections:
    """Inverse of :func:`detections_to_msg` (plus the FrameInfo ``velocities`` of the same
    header, zeros when None): back to the CUDA-BEVFusion box layout, lidar frame."""
    rows = []
    for index, detection in enumerate(msg.detections):
        hypothesis = detection.results[0].hypothesis
        pose, size = detection.bbox.center, detection.bbox.size
        q = pose.orientation
        heading = quaternion_yaw(q)
        velocity = velocities[index] if velocities else Vector3()
        rows.append([pose.position.x, pose.position.y, pose.position.z, size.y, size.x, size.z,
                     float(cuda_yaw(heading)), velocity.x, velocity.y,
                     class_names.index(hypothesis.class_id), hypothesis.score])
    boxes = np.array(rows, dtype=np.float32).reshape(-1, len(BOX_COLUMNS))
    return Detections(boxes=boxes, class_names=class_names, stamp_ns=stamp_to_ns(msg.header.stamp),
                      frame_id=msg.header.frame_id)


def frame_info(header: Header, detections: Detections, missing: Mapping[str, str], backend: str,
               latency_ms: float, warnings: Sequence[str], phase_ms: Mapping[str, float]) -> FrameInfo:
    """The ``bevfusion_ros_msgs/FrameInfo`` of one output frame (docs/messages.md): cameras used
    and ``missing`` (names), velocities per box, ``backend``, ``latency_ms``, ``warnings``, and the
    timings: ``phase_ms`` of the frame's path, then ``stage.<name>`` per pipeline stage."""
    timings = {**phase_ms, **{f"stage.{name}": ms for name, ms in detections.stage_ms.items()}}
    return FrameInfo(header=header, cameras_used=list(detections.cameras_used), cameras_missing=list(missing),
                     velocities=velocities(detections), backend=backend, latency_ms=float(latency_ms),
                     warnings=list(warnings), timing_names=list(timings),
                     timing_ms=[float(ms) for ms in timings.values()])


def velocities(detections: Detections) -> list[Vector3]:
    """Velocity (vx, vy, 0) in m/s per box, in the boxes' frame and order (for
    ``bevfusion_ros_msgs/FrameInfo.velocities``)."""
    return [Vector3(x=vx, y=vy, z=0.0)
            for vx, vy in detections.boxes[:, [VX, VY]].astype(np.float64).tolist()]


#: Marker colour (r, g, b) per class index (index modulo 10), for the nuScenes classes:
#: 0 car orange, 1 truck blue, 2 construction_vehicle yellow, 3 bus purple, 4 trailer brown,
#: 5 barrier grey, 6 motorcycle magenta, 7 bicycle cyan, 8 pedestrian green, 9 traffic_cone red.
CLASS_COLORS: tuple[tuple[float, float, float], ...] = (
    (1.00, 0.60, 0.00),
    (0.00, 0.45, 1.00),
    (1.00, 0.90, 0.00),
    (0.60, 0.25, 1.00),
    (0.60, 0.40, 0.20),
    (0.60, 0.60, 0.60),
    (1.00, 0.00, 0.60),
    (0.00, 0.85, 0.85),
    (0.00, 0.80, 0.20),
    (1.00, 0.15, 0.15),
)

#: The 12 edges of a box as pairs of :meth:`Detections.corners_lidar` indices: bottom face,
#: top face, then the 4 vertical edges.
BOX_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 0),
    (4, 5), (5, 6), (6, 7), (7, 4),
    (0, 4), (1, 5), (2, 6), (3, 7),
)
_EDGE_INDICES = np.array(BOX_EDGES, dtype=np.int64).reshape(-1)

#: Boxes slower than this (m/s) get no velocity arrow.
VELOCITY_ARROW_MIN_SPEED = 0.2


def class_color(label: int) -> ColorRGBA:
    """Opaque colour of class index ``label`` (:data:`CLASS_COLORS`)."""
    r, g, b = CLASS_COLORS[int(label) % len(CLASS_COLORS)]
    return ColorRGBA(r=r, g=g, b=b, a=1.0)


_U32_ONE = struct.pack("<I", 1)
_IDENTITY_POSE = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
# Marker fields from ``colors`` (empty) to ``uv_coordinates`` (empty), written 4-aligned:
# colors [], texture_resource "", texture (header stamp 0 frame_id "", format "", data []), uv [].
_MARKER_MIDDLE = (struct.pack("<I", 0) + cdr_string("") + bytes(3) + struct.pack("<iI", 0, 0) + cdr_string("")
                  + bytes(3) + cdr_string("") + bytes(3) + struct.pack("<II", 0, 0))
# Marker fields after ``text``, written 4-aligned: mesh_resource "", mesh_file ("", []), mesh_use_embedded_materials.
_MARKER_END = cdr_string("") + bytes(3) + cdr_string("") + bytes(3) + struct.pack("<I?", 0, False)


def _put_marker(writer: CdrWriter, head: tuple[bytes, bytes], marker_id: int, marker_type: int, action: int,
                pose_scale: bytes, color_lifetime: bytes, points: np.ndarray | None = None, text: str = "") -> None:
    """One ``visualization_msgs/Marker``: ``head`` = (header, ns) as CDR, ``pose_scale`` = 10
    float64 (position, orientation, scale), ``color_lifetime`` = colour (4 float32), lifetime,
    frame_locked; ``points`` float64 ``[P, 3]``."""
    for part in head:
        writer.put(part, 4)
    writer.put(struct.pack("<iii", marker_id, marker_type, action), 4)
    writer.put(pose_scale, 8)
    writer.put(color_lifetime, 4)
    if points is None:
        writer.uint32(0)
    else:
        writer.uint32(len(points))
        writer.put(points.tobytes(), 8)
    writer.put(_MARKER_MIDDLE, 4)
    writer.string(text)
    writer.put(_MARKER_END, 4)


def _pose_scale(position: tuple[float, float, float], scale: tuple[float, float, float]) -> bytes:
    return struct.pack("<10d", *position, *_IDENTITY_POSE[3:], *scale)


def serialize_markers(detections: Detections, header: Header, namespace: str = "bevfusion",
                      lifetime_s: float = 0.0) -> bytes:
    """RViz markers of ``detections`` as CDR bytes of a MarkerArray, all in ``header.frame_id``.

    First a DELETEALL marker with an empty ``ns`` (RViz then clears every marker of the display,
    so boxes of the previous frame disappear), then per box ``i`` (id ``i`` in each namespace):

    * ``{namespace}/boxes``: LINE_LIST of the 12 edges (24 points, :data:`BOX_EDGES` of
      :meth:`Detections.corners_lidar`), scale.x 0.05 m, class colour (:func:`class_color`);
    * ``{namespace}/labels``: TEXT_VIEW_FACING ``"<class> <score:.2f>"`` 0.5 m above the box top,
      scale.z 0.6 m;
    * ``{namespace}/velocity``: ARROW from the box centre to centre + velocity * 1 s, only when
      the speed exceeds :data:`VELOCITY_ARROW_MIN_SPEED` (shaft 0.1 m, head 0.2 x 0.2 m).

    ``lifetime_s`` = 0 keeps markers until deleted. Written like :func:`serialize_detections`.
    """
    lifetime = _duration(lifetime_s)
    lifetime_locked = struct.pack("<iI?", lifetime.sec, lifetime.nanosec, False)
    colors = [struct.pack("<4f", *color, 1.0) + lifetime_locked for color in CLASS_COLORS]
    frame = header_bytes(header)
    boxes_head, labels_head, velocity_head = ((frame, cdr_string(f"{namespace}/{kind}"))
                                              for kind in ("boxes", "labels", "velocity"))
    boxes = detections.boxes.astype(np.float64)
    edge_points = detections.corners_lidar()[:, _EDGE_INDICES]                    # [M, 24, 3]
    centres, velocities_xy = boxes[:, [X, Y, Z]], boxes[:, [VX, VY]]
    arrow_ends = centres + np.pad(velocities_xy, ((0, 0), (0, 1)))
    tops = (boxes[:, Z] + boxes[:, H] / 2).tolist()
    moving = (np.hypot(velocities_xy[:, 0], velocities_xy[:, 1]) > VELOCITY_ARROW_MIN_SPEED).tolist()
    origin = (0.0, 0.0, 0.0)
    lines_pose, arrow_pose = _pose_scale(origin, (0.05, 0.0, 0.0)), _pose_scale(origin, (0.1, 0.2, 0.2))
    writer = CdrWriter()
    writer.uint32(1 + 2 * len(boxes) + sum(moving))
    _put_marker(writer, (frame, cdr_string("")), 0, Marker.ARROW, Marker.DELETEALL, _pose_scale(origin, origin),
                bytes(16) + struct.pack("<iI?", 0, 0, False))
    for index, (label, score) in enumerate(zip(detections.labels.tolist(), boxes[:, SCORE].tolist())):
        color = colors[label % len(colors)]
        _put_marker(writer, boxes_head, index, Marker.LINE_LIST, Marker.ADD, lines_pose, color, edge_points[index])
        x, y, _ = centres[index].tolist()
        _put_marker(writer, labels_head, index, Marker.TEXT_VIEW_FACING, Marker.ADD,
                    _pose_scale((x, y, tops[index] + 0.5), (0.0, 0.0, 0.6)), color,
                    text=f"{detections.class_names[label]} {score:.2f}")
        if moving[index]:
            _put_marker(writer, velocity_head, index, Marker.ARROW, Marker.ADD, arrow_pose, color,
                        np.stack([centres[index], arrow_ends[index]]))
    return writer.getvalue()


def detections_to_markers(detections: Detections, header: Header, namespace: str = "bevfusion",
                          lifetime_s: float = 0.0) -> MarkerArray:
    """:func:`serialize_markers` as a Python message."""
    return deserialize_message(serialize_markers(detections, header, namespace, lifetime_s), MarkerArray)
