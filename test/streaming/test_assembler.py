"""FrameAssembler without ROS: fed the example frame as the node's test publishes it (K, camera
TF, images, cloud), it gives that frame back; missing cameras, bad images, JPEG inputs, missing
calibration, lens distortions, sweep motion compensation (against a float64 NumPy formula) and
dropped sweeps."""
from __future__ import annotations

import dataclasses
import time

import cv2
import numpy as np
import pytest

from bevfusion_ros.camera.jpeg import ImageError
from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.distortion import Distortion
from bevfusion_ros.io.frame import Frame, load_example_data
from bevfusion_ros.model.presets import TINY
from bevfusion_ros.streaming.assembler import EncodedImage, FrameAssembler, Sweep
from bevfusion_ros.streaming.node_config import NodeConfig

LIDAR = "lidar_top"
NAMES = TINY.pipeline.camera_names
STAMP = 1_700_000_000_000_000_000


@pytest.fixture(scope="module")
def example(example_data_dir) -> Frame:
    return load_example_data(example_data_dir)


def settings(**changes) -> NodeConfig:
    sync = changes.pop("sync", {})
    base = NodeConfig(time_lag_field="time_lag", num_sweeps=1)
    return dataclasses.replace(base, sync=dataclasses.replace(base.sync, **sync), **changes)


def calibrate(assembler: FrameAssembler, frame: Frame, skip_info: tuple[str, ...] = ()) -> None:
    """CameraInfo K and the static camera TF of every camera, as the node test publishes them."""
    calibration = frame.calibration
    for index, name in enumerate(NAMES):
        if name not in skip_info:
            assembler.set_intrinsics(name, calibration.camera_intrinsics[index, :3, :3])
        assembler.add_transform(LIDAR, f"cam_{name}", 0, calibration.camera2lidar[index].astype(np.float64), True)


def feed(assembler: FrameAssembler, frame: Frame, stamp_ns: int = STAMP, skip: tuple[str, ...] = (),
         images: dict | None = None, points: np.ndarray | None = None) -> list:
    """The frame's images (or ``images``) and cloud; returns the sweeps synchronised."""
    for index, name in enumerate(NAMES):
        if name not in skip:
            image = (images or {}).get(name, frame.images[index])
            assembler.add_image(name, stamp_ns, f"cam_{name}", image)
    sweep = Sweep(stamp_ns, LIDAR, frame.points if points is None else points, time.monotonic())
    return assembler.add_cloud(sweep).frames


def assemble_one(assembler: FrameAssembler, frame: Frame, **options):
    synced, = feed(assembler, frame, **options)
    return assembler.assemble(synced)


def test_the_example_frame_comes_back_as_the_node_test_sends_it(example):
    from bevfusion_ros.pipeline import BEVFusionPipeline
    assembler = FrameAssembler(TINY.pipeline, settings())
    calibrate(assembler, example)
    assembled = assemble_one(assembler, example)
    assert assembled.cameras_used == NAMES and assembled.missing == {} and assembled.warnings == []
    assert all(got is sent for got, sent in zip(assembled.frame.images, example.images))    # no copies
    np.testing.assert_array_equal(assembled.frame.points, example.points)
    assert assembled.frame.lidar_stamp_ns == STAMP and assembled.sweep.frame_id == LIDAR
    # The example's own lidar2image (from its files) within float32 rounding of K and camera2lidar.
    np.testing.assert_allclose(assembled.frame.calibration.lidar2image, example.calibration.lidar2image,
                               rtol=1e-4, atol=1e-2)
    rebuilt = Calibration.from_camera2lidar(example.calibration.camera_intrinsics[:, :3, :3],
                                            example.calibration.camera2lidar.astype(np.float64),
                                            TINY.pipeline.image, NAMES)
    sent = Frame(example.images, example.points, rebuilt)
    pipeline = BEVFusionPipeline.from_model_dir("models/tiny-synthetic", backend="cpu")
    np.testing.assert_array_equal(pipeline.forward(assembled.frame, assembled.cameras_used).boxes,
                                  pipeline.forward(sent).boxes)


def test_missing_camera_zero_fill_and_lidar_only(example):
    missing = NAMES[2]
    zero_fill = FrameAssembler(TINY.pipeline, settings())
    calibrate(zero_fill, example)
    assembled = assemble_one(zero_fill, example, skip=(missing,))
    assert assembled.missing == {missing: "no image within slop"}
    assert assembled.cameras_used == tuple(n for n in NAMES if n != missing)
    assert not assembled.frame.images[2].any() and assembled.frame.images[2].shape == (900, 1600, 3)
    lidar_only = FrameAssembler(TINY.pipeline, settings(sync={"missing_camera": "lidar_only"}))
    calibrate(lidar_only, example)
    assembled = assemble_one(lidar_only, example, skip=(missing,))
    assert assembled.cameras_used == () and set(assembled.missing) == set(NAMES)
    assert all(not image.any() for image in assembled.frame.images)


def test_uncalibrated_cameras_are_missing_and_a_refused_camera_info_is_a_warning(example):
    assembler = FrameAssembler(TINY.pipeline, settings())
    calibrate(assembler, example, skip_info=(NAMES[1],))
    assembler.reject_intrinsics(NAMES[0], "CameraInfo of FRONT: K is singular (keeping the last valid one)")
    assembled = assemble_one(assembler, example)
    assert assembled.missing == {NAMES[1]: "not calibrated: no CameraInfo yet"}
    assert assembled.warnings == ["CameraInfo of FRONT: K is singular (keeping the last valid one)"]
    assembler.set_intrinsics(NAMES[0], example.calibration.camera_intrinsics[0, :3, :3])
    assert assemble_one(assembler, example, stamp_ns=STAMP + 10**8).warnings == []


def test_jpeg_inputs_are_decoded_and_bad_images_are_missing(example):
    assembler = FrameAssembler(TINY.pipeline, settings())
    calibrate(assembler, example)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(example.images[0], cv2.COLOR_RGB2BGR))
    reference = cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    images = {NAMES[0]: EncodedImage(jpeg.tobytes(), "jpeg"), NAMES[1]: example.images[1][:450],
              NAMES[2]: ImageError("unsupported image encoding 'yuv422'"),
              NAMES[3]: EncodedImage(b"not a jpeg", "jpeg")}
    assembled = assemble_one(assembler, example, images=images)
    np.testing.assert_array_equal(assembled.frame.images[0], reference)
    assert assembled.missing[NAMES[1]] == "bad image: size 1600x450, expected 1600x900"
    assert assembled.missing[NAMES[2]] == "bad image: unsupported image encoding 'yuv422'"
    assert assembled.missing[NAMES[3]].startswith("bad image:")
    assert assembled.cameras_used == (NAMES[0], *NAMES[4:])
    assembler.close()


def pose(index: int) -> np.ndarray:
    yaw, matrix = 0.03 * index, np.eye(4)
    matrix[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
    matrix[:3, 3] = [2.0 * index, -0.5 * index, 0.1 * index]
    return matrix


def test_past_sweeps_are_moved_into_the_current_frame_with_the_tf_odometry(example):
    """Three sweeps 0.1 s apart with odom -> lidar poses on TF: the output is the current sweep
    (lag 0), then each past sweep, without its points within 1 m of the lidar, moved by
    inverse(pose_now) @ pose_then (float64 reference), with its lag in seconds."""
    assembler = FrameAssembler(TINY.pipeline, settings(num_sweeps=3, time_lag_field=""))
    calibrate(assembler, example)
    rng = np.random.default_rng(5)
    sweeps = [np.column_stack([rng.uniform(-30, 30, (500, 3)), rng.uniform(0, 255, 500)]).astype(np.float32)
              for _ in range(3)]
    for sweep in sweeps:
        sweep[:20, :2] = rng.uniform(-0.9, 0.9, (20, 2))              # close to the lidar
    for index, points in enumerate(sweeps):
        stamp = STAMP + index * 10**8
        assembler.add_transform("odom", LIDAR, stamp, pose(index), False)
        assembled = assemble_one(assembler, example, stamp_ns=stamp, points=points)
    expected = [np.column_stack([sweeps[2], np.zeros(500)])]
    for index in (1, 0):
        past = sweeps[index].astype(np.float64)
        far = past[~((np.abs(past[:, 0]) < 1.0) & (np.abs(past[:, 1]) < 1.0))]       # mmdet3d remove_close
        current_T_past = np.linalg.inv(pose(2)) @ pose(index)
        moved = far[:, :3] @ current_T_past[:3, :3].T + current_T_past[:3, 3]
        expected.append(np.column_stack([moved, far[:, 3], np.full(len(far), (2 - index) * 0.1)]))
    np.testing.assert_allclose(assembled.frame.points, np.concatenate(expected), atol=2e-5)
    assert assembled.warnings == []


def test_dropped_sweeps_and_time_going_backwards_are_reported(example):
    assembler = FrameAssembler(TINY.pipeline, settings())
    calibrate(assembler, example)
    assert len(feed(assembler, example)) == 1
    duplicate = assembler.add_cloud(Sweep(STAMP, LIDAR, example.points, time.monotonic()))
    assert duplicate.frames == [] and [drop.reason for drop in duplicate.drops] == ["duplicate_stamp"]
    back = assembler.add_cloud(Sweep(STAMP - 5 * 10**9, LIDAR, example.points, time.monotonic()))
    assert back.reset and "lidar" in back.reset


LENS = Distortion("plumb_bob", (-0.25, 0.07, 0.0005, -0.0005, 0.0))
FISHEYE = Distortion("equidistant", (0.05, -0.02, 0.01, -0.002))


def test_camera_info_distortions_reach_the_frame_calibration(example):
    assembler = FrameAssembler(TINY.pipeline, settings())
    calibrate(assembler, example)
    assembler.set_intrinsics(NAMES[1], example.calibration.camera_intrinsics[1, :3, :3], LENS)
    assembler.set_intrinsics(NAMES[4], example.calibration.camera_intrinsics[4, :3, :3], FISHEYE)
    calibration = assemble_one(assembler, example).frame.calibration
    assert calibration.distortions == (None, LENS, None, None, FISHEYE, None)
    for index in (1, 4):                              # the camera matrix of the undistorted image
        np.testing.assert_array_equal(calibration.camera_intrinsics[index, :3, :3],
                                      example.calibration.camera_intrinsics[index, :3, :3])
    assembler.set_intrinsics(NAMES[1], example.calibration.camera_intrinsics[1, :3, :3])
    assembler.set_intrinsics(NAMES[4], example.calibration.camera_intrinsics[4, :3, :3], None)
    assert assemble_one(assembler, example, stamp_ns=STAMP + 10**8).frame.calibration.distortions == ()


def test_a_distortion_that_cannot_be_undone_leaves_the_camera_out_until_a_usable_one(example):
    assembler = FrameAssembler(TINY.pipeline, settings())
    calibrate(assembler, example)
    K = example.calibration.camera_intrinsics[2, :3, :3]
    assert assembler.refuse_distortion(NAMES[2], K, "unsupported distortion model 'kannala_brandt'")
    assembled = assemble_one(assembler, example)
    assert assembled.missing == {NAMES[2]: "lens distortion cannot be undone: unsupported distortion model "
                                           "'kannala_brandt'"}
    assert NAMES[2] not in assembled.cameras_used and assembled.frame.calibration.distortions == ()
    assembler.set_intrinsics(NAMES[2], K, LENS)
    assembled = assemble_one(assembler, example, stamp_ns=STAMP + 10**8)
    assert assembled.missing == {} and assembled.frame.calibration.distortion(2) == LENS


def test_without_undistort_distortions_are_ignored(example):
    assembler = FrameAssembler(TINY.pipeline, settings(undistort=False))
    calibrate(assembler, example)
    K = example.calibration.camera_intrinsics[0, :3, :3]
    assembler.set_intrinsics(NAMES[0], K, LENS)
    assert not assembler.refuse_distortion(NAMES[1], example.calibration.camera_intrinsics[1, :3, :3], "unsupported")
    assembled = assemble_one(assembler, example)
    assert assembled.missing == {} and assembled.frame.calibration.distortions == ()


def test_file_calibration_distortions_unless_undistort_is_off(example):
    lenses = (LENS, None, None, None, FISHEYE, None)
    calibration = dataclasses.replace(example.calibration.for_image(TINY.pipeline.image), distortions=lenses)
    file_settings = settings(calibration_source="file", calibration_file="calibration.yaml")
    on = FrameAssembler(TINY.pipeline, file_settings, calibration)
    assert assemble_one(on, example).frame.calibration.distortions == lenses
    off = FrameAssembler(TINY.pipeline, dataclasses.replace(file_settings, undistort=False), calibration)
    assert assemble_one(off, example).frame.calibration.distortions == ()
