"""Messages converted at the node's edge into what :class:`~bevfusion_ros.streaming.assembler.FrameAssembler`
takes: the node (serialized messages read by :mod:`~bevfusion_ros.ros.cdr`) and the bag reader
(:mod:`~bevfusion_ros.ros.bag_frames`, deserialized messages) convert the same way."""
from __future__ import annotations

from typing import Any

from bevfusion_ros.camera.jpeg import ImageError
from bevfusion_ros.io.distortion import DistortionError
from bevfusion_ros.ros import convert
from bevfusion_ros.ros.cloud_input import cloud_points
from bevfusion_ros.streaming.assembler import EncodedImage, FrameAssembler, Sweep
from bevfusion_ros.streaming.node_config import NodeConfig
from bevfusion_ros.streaming.transforms import TransformError


def image_input(msg: Any, compressed: bool) -> Any:
    """An ``Image`` as an RGB array (a view for rgb8) or the ImageError saying why it is not
    usable; a ``CompressedImage`` as an :class:`EncodedImage` (decoded at assembly)."""
    if compressed:
        return EncodedImage(msg.data, msg.format)
    try:
        return convert.image_to_rgb(msg)
    except ImageError as error:
        return error


def sweep_input(msg: Any, settings: NodeConfig, received_s: float, context: Any = None) -> Sweep:
    """A ``PointCloud2`` as a :class:`Sweep` (x, y, z, intensity and ``node.time_lag_field``);
    raises :class:`~bevfusion_ros.pipeline.InputError` for a cloud that cannot be read."""
    lag_field = settings.time_lag_field
    decoded = cloud_points(msg, (lag_field,) if lag_field else ())
    return Sweep(convert.stamp_to_ns(msg.header.stamp), msg.header.frame_id, decoded.points, received_s,
                 tuple(decoded.warnings), context)


def set_camera_info(assembler: FrameAssembler, camera: str, msg: Any) -> str | None:
    """The K and lens distortion of a ``CameraInfo`` into ``assembler``; returns why it was
    refused (None when accepted). A refused K keeps the last valid one; a distortion that cannot
    be undone (unsupported model, malformed coefficients) leaves the camera out while
    ``node.undistort`` is on (:meth:`FrameAssembler.refuse_distortion`)."""
    try:
        intrinsics = convert.camera_info_intrinsics(msg)
    except ValueError as error:
        message = f"CameraInfo of {camera}: {error} (keeping the last valid one)"
        assembler.reject_intrinsics(camera, message)
        return message
    try:
        distortion = convert.camera_info_distortion(msg)
    except DistortionError as error:
        left_out = assembler.refuse_distortion(camera, intrinsics, str(error))
        return (f"CameraInfo of {camera}: {error}: the camera is left out until its CameraInfo has a "
                f"supported distortion (or node.undistort is false)") if left_out else None
    assembler.set_intrinsics(camera, intrinsics, distortion)
    return None


def add_transforms(assembler: FrameAssembler, msg: Any, static: bool) -> list[str]:
    """Every transform of a ``TFMessage`` into ``assembler``; returns why each refused one was."""
    errors = []
    for transform in msg.transforms:
        try:
            assembler.add_transform(transform.header.frame_id, transform.child_frame_id,
                                    convert.stamp_to_ns(transform.header.stamp),
                                    convert.transform_to_matrix(transform.transform), static)
        except (ValueError, TransformError) as error:
            errors.append(f"TF {transform.header.frame_id} -> {transform.child_frame_id}: {error}")
    return errors
