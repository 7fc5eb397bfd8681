"""A :class:`~bevfusion_ros.io.frame.Frame` as the ROS messages a vehicle (or a bag) would carry:
an ``Image`` + ``CameraInfo`` (K and the calibration's lens distortion) per camera of its calibration
(any rig), one ``PointCloud2`` and
the ``/tf_static`` extrinsics.

Frame ids: the cloud is in ``lidar_frame``; camera ``i`` is in ``camera_frame_prefix + name``
(optical frame: z forward, x right, y down, as the calibration's camera2lidar assumes). The
extrinsics are published as ``lidar_frame -> camera frame`` transforms (``camera2lidar``).
The cloud's fields are x, y, z, intensity and, when the frame has a fifth column, ``time_lag``
(seconds; what an aggregated multi-sweep cloud carries, read back by ``node.time_lag_field``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from geometry_msgs.msg import TransformStamped
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from bevfusion_ros.io.frame import Frame
from bevfusion_ros.ros import convert, pointcloud2

CLOUD_FIELDS = ("x", "y", "z", "intensity", "time_lag")
LIDAR_FRAME = "lidar_top"
CAMERA_FRAME_PREFIX = "cam_"


@dataclass
class FrameMessages:
    images: list[Image]
    camera_infos: list[CameraInfo]
    cloud: PointCloud2
    tf_static: TFMessage


def header(stamp_ns: int, frame_id: str) -> Header:
    return Header(stamp=convert.ns_to_stamp(stamp_ns), frame_id=frame_id)


def cloud_message(points: np.ndarray, stamp_ns: int, frame_id: str = LIDAR_FRAME,
                  names: tuple[str, ...] = CLOUD_FIELDS) -> PointCloud2:
    """float32 points [N, C] -> an unorganised PointCloud2 with the first C of ``names``."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    fields = [PointField(name=name, offset=4 * index, datatype=PointField.FLOAT32, count=1)
              for index, name in enumerate(names[:points.shape[1]])]
    structured = points.view([(f.name, np.float32) for f in fields]).reshape(-1)
    return pointcloud2.create_cloud(header(stamp_ns, frame_id), fields, structured)


def frame_messages(frame: Frame, stamp_ns: int, lidar_frame: str = LIDAR_FRAME,
                   camera_frame_prefix: str = CAMERA_FRAME_PREFIX) -> FrameMessages:
    """All messages of ``frame``, every header stamped ``stamp_ns``."""
    calibration = frame.calibration
    images, infos, transforms = [], [], []
    for index, name in enumerate(calibration.camera_names):
        camera_header = header(stamp_ns, camera_frame_prefix + name)
        rgb = frame.images[index]
        images.append(convert.rgb_to_image(rgb, camera_header))
        infos.append(convert.intrinsics_to_camera_info(calibration.camera_intrinsics[index, :3, :3],
                                                       rgb.shape[1], rgb.shape[0], camera_header,
                                                       calibration.distortion(index)))
        transforms.append(TransformStamped(
            header=header(stamp_ns, lidar_frame), child_frame_id=camera_frame_prefix + name,
            transform=convert.matrix_to_transform(calibration.camera2lidar[index])))
    return FrameMessages(images, infos, cloud_message(frame.points, stamp_ns, lidar_frame),
                         TFMessage(transforms=transforms))
