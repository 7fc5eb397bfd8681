"""Loading sensor frames: the real example data and malformed inputs."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from bevfusion_ros.config import NUSCENES_CAMERA_NAMES
from bevfusion_ros.io.frame import Frame, FrameError, example_camera_names, load_example_data, read_rgb_image
from bevfusion_ros.io.tensor import read_tensor, write_tensor


def test_example_data_frame(example_data_dir):
    frame = load_example_data(example_data_dir)
    assert len(frame.images) == 6
    assert all(image.shape == (900, 1600, 3) and image.dtype == np.uint8 for image in frame.images)
    assert frame.points.shape == (242180, 5) and frame.points.dtype == np.float32
    raw = np.fromfile(example_data_dir / "points.tensor", dtype="<f2", offset=20).reshape(-1, 5)
    assert np.array_equal(frame.points, raw.astype(np.float32))    # exact fp16 widening
    assert len(np.unique(frame.points[:, 4])) == 10                # 10 sweeps, time lags
    assert frame.token == "000681a060c04755a1537cf83b53ba57"
    calibration = frame.calibration
    product = np.einsum("cij,cjk->cik", calibration.camera_intrinsics, calibration.lidar2camera)
    assert (np.abs(product - calibration.lidar2image) / np.maximum(1, np.abs(product))).max() < 1e-4


def test_images_are_rgb(tmp_path):
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 2] = 255                     # pure red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    rgb = read_rgb_image(tmp_path / "red.png")
    assert rgb.shape == (4, 5, 3) and (rgb[..., 0] == 255).all() and (rgb[..., 1:] == 0).all()


def test_undecodable_image(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(FrameError, match="cannot decode image .*broken.jpg"):
        read_rgb_image(tmp_path / "broken.jpg")


def test_frame_shape_errors(example_data_dir):
    frame = load_example_data(example_data_dir)
    with pytest.raises(FrameError, match="frame has 5 images but the calibration has 6 cameras"):
        Frame(frame.images[:5], frame.points, frame.calibration)
    grey = [frame.images[0][..., 0]] + frame.images[1:]
    with pytest.raises(FrameError, match=r"camera FRONT: expected an \[H, W, 3\] uint8 RGB image"):
        Frame(grey, frame.points, frame.calibration)
    with pytest.raises(FrameError, match=r"points must be \[N, C>=4\]"):
        Frame(frame.images, frame.points[:, :3], frame.calibration)


def test_missing_files(example_data_dir, tmp_path):
    with pytest.raises(FrameError, match="does not exist"):
        load_example_data(tmp_path / "nowhere")
    for path in example_data_dir.iterdir():
        if path.name != "3-BACK.jpg":
            (tmp_path / path.name).symlink_to(path)
    with pytest.raises(FrameError, match=r"missing camera image 3-NAME.jpg .*'2-FRONT_LEFT.jpg', '4-BACK_LEFT.jpg'"):
        load_example_data(tmp_path)                           # the folder's own cameras
    with pytest.raises(FrameError, match="missing camera image 3-BACK.jpg of the 6 cameras"):
        load_example_data(tmp_path, NUSCENES_CAMERA_NAMES)    # cameras given


def test_camera_names_come_from_the_image_files(example_data_dir, tmp_path):
    """A folder of other cameras loads with its own names (in index order), or names them when
    the caller expects others."""
    names = ("rear", "front")
    for index, name in enumerate(names):
        (tmp_path / f"{index}-{name}.jpg").symlink_to(example_data_dir / f"{index}-{NUSCENES_CAMERA_NAMES[index]}.jpg")
    assert example_camera_names(tmp_path) == names
    for path in example_data_dir.glob("*.tensor"):
        array = read_tensor(path)
        write_tensor(tmp_path / path.name, array[:, :2] if array.ndim == 4 else array)   # cameras 0, 1
    (tmp_path / "token.txt").write_text("two\n")
    frame = load_example_data(tmp_path)
    assert frame.calibration.camera_names == names and len(frame.images) == 2
    reference = load_example_data(example_data_dir)
    np.testing.assert_array_equal(frame.images[1], reference.images[1])
    np.testing.assert_array_equal(frame.calibration.camera2lidar, reference.calibration.camera2lidar[:2])
    with pytest.raises(FrameError, match=r"missing camera image 0-FRONT.jpg of the 6 cameras .*"
                                         r"\['0-rear.jpg', '1-front.jpg'\]"):
        load_example_data(tmp_path, NUSCENES_CAMERA_NAMES)
