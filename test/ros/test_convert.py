"""bevfusion_ros.ros.convert against independent references.

Images are packed by hand (row by row, with garbage padding) from numpy arrays and compared
pixel by pixel with channel orders written out here; PNGs come from cv2.imencode (lossless).
Rotations are checked against a float64 Rodrigues (axis-angle) reference and a Hamilton-product
quaternion rotation written in this file; box corners against corners recomputed here from
Detections.to_rep103(). Messages go through rclpy's real serialization where it matters.
"""
from __future__ import annotations

import array
import itertools
import math

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Quaternion, Transform, Vector3
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header
from vision_msgs.msg import Detection3DArray
from visualization_msgs.msg import Marker, MarkerArray

from bevfusion_ros.detections import Detections
from bevfusion_ros.io.distortion import Distortion, DistortionError
from bevfusion_ros.ros import convert
from bevfusion_ros.ros.convert import CalibrationMessageError, ImageError

CLASS_NAMES = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier",
               "motorcycle", "bicycle", "pedestrian", "traffic_cone")
RNG_SEED = 20240611


def header(frame_id: str = "lidar") -> Header:
    """A header with a non-trivial stamp."""
    out = Header(frame_id=frame_id)
    out.stamp.sec, out.stamp.nanosec = 1_700_000_123, 456_789
    return out


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}


def expected_rgb(raw: np.ndarray, encoding: str) -> np.ndarray:
    """Reference: RGB pixels of raw [H, W, C] bytes in ``encoding``, channel by channel."""
    if encoding == "rgb8":
        r, g, b = raw[..., 0], raw[..., 1], raw[..., 2]
    elif encoding == "bgr8":
        b, g, r = raw[..., 0], raw[..., 1], raw[..., 2]
    elif encoding == "rgba8":
        r, g, b = raw[..., 0], raw[..., 1], raw[..., 2]
    elif encoding == "bgra8":
        b, g, r = raw[..., 0], raw[..., 1], raw[..., 2]
    else:  # mono8
        r = g = b = raw[..., 0]
    return np.stack([r, g, b], axis=-1)


def pack_image(raw: np.ndarray, encoding: str, padding: int = 0, as_bytes: bool = False) -> Image:
    """An Image whose rows are ``raw``'s bytes followed by ``padding`` garbage bytes."""
    height, width, channels = raw.shape
    step = width * channels + padding
    data = bytearray()
    for row in range(height):
        data += raw[row].tobytes()
        data += bytes((0xA5 + i) % 256 for i in range(padding))
    assert len(data) == step * height
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=0, step=step)
    msg.header = header("camera")
    msg.data = bytes(data) if as_bytes else array.array("B", bytes(data))
    return msg


@pytest.fixture(params=["opencv", "numpy"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with OpenCV channel conversion and with the numpy fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(convert, "cv2", None)
    return request.param


@pytest.mark.parametrize("encoding", list(CHANNELS))
@pytest.mark.parametrize("padding", [0, 1, 7])
@pytest.mark.parametrize("shape", [(5, 7), (1, 1), (3, 1), (1, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_to_rgb_each_encoding(encoding: str, padding: int, shape: tuple[int, int],
                                    backend: str) -> None:
    rng = np.random.default_rng(RNG_SEED)
    raw = rng.integers(0, 256, size=(*shape, CHANNELS[encoding]), dtype=np.uint8)
    rgb = convert.image_to_rgb(pack_image(raw, encoding, padding))
    assert rgb.dtype == np.uint8 and rgb.shape == (*shape, 3)
    assert rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, expected_rgb(raw, encoding))


@pytest.mark.parametrize("encoding", list(CHANNELS))
def test_image_to_rgb_after_serialization(encoding: str) -> None:
    """Messages as a subscriber receives them (deserialised), also with ``bytes`` data."""
    rng = np.random.default_rng(RNG_SEED + 1)
    raw = rng.integers(0, 256, size=(48, 64, CHANNELS[encoding]), dtype=np.uint8)
    for as_bytes in (False, True):
        msg = pack_image(raw, encoding, padding=3, as_bytes=as_bytes)
        received = deserialize_message(serialize_message(msg), Image)
        np.testing.assert_array_equal(convert.image_to_rgb(received), expected_rgb(raw, encoding))


def test_image_to_rgb_rgb8_without_padding_is_zero_copy() -> None:
    raw = np.random.default_rng(RNG_SEED).integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    msg = pack_image(raw, "rgb8")
    rgb = convert.image_to_rgb(msg)
    assert np.shares_memory(rgb, np.frombuffer(msg.data, dtype=np.uint8))
    np.testing.assert_array_equal(rgb, raw)
    padded = convert.image_to_rgb(pack_image(raw, "rgb8", padding=2))  # must copy to be contiguous
    assert padded.flags.c_contiguous
    np.testing.assert_array_equal(padded, raw)


def test_image_to_rgb_accepts_longer_data() -> None:
    raw = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    msg = pack_image(raw, "bgr8")
    msg.data = array.array("B", bytes(msg.data) + b"\x01\x02\x03")
    np.testing.assert_array_equal(convert.image_to_rgb(msg), raw[..., ::-1])


@pytest.mark.parametrize("encoding, match", [
    ("yuv422", r"unsupported image encoding 'yuv422'"),
    ("32FC1", r"unsupported image encoding '32FC1'"),
    ("bayer_rggb8", r"unsupported image encoding 'bayer_rggb8'"),
    ("", r"unsupported image encoding ''"),
    ("rgb16", r"'rgb16' has 16-bit channels"),
    ("mono16", r"'mono16' has 16-bit channels"),
    ("bgra16", r"'bgra16' has 16-bit channels"),
])
def test_image_to_rgb_rejects_encodings(encoding: str, match: str) -> None:
    msg = Image(height=2, width=2, encoding=encoding, step=12, data=bytes(24))
    with pytest.raises(ImageError, match=match):
        convert.image_to_rgb(msg)


def test_image_to_rgb_rejects_bad_sizes() -> None:
    raw = np.zeros((4, 5, 3), dtype=np.uint8)
    short = pack_image(raw, "rgb8", padding=2)
    short.data = array.array("B", bytes(short.data)[:-1])
    with pytest.raises(ImageError, match=r"rgb8 image 5x4 with step 17 needs 68 bytes of data, got 67"):
        convert.image_to_rgb(short)

    narrow = pack_image(raw, "rgb8")
    narrow.step = 14
    with pytest.raises(ImageError, match=r"rgb8 image of width 5 needs step >= 15 bytes .* got step 14"):
        convert.image_to_rgb(narrow)

    bgra = pack_image(np.zeros((2, 3, 4), dtype=np.uint8), "bgra8")
    bgra.step = 9  # enough for 3 channels, not for 4
    with pytest.raises(ImageError, match=r"needs step >= 12"):
        convert.image_to_rgb(bgra)

    for height, width in ((0, 5), (5, 0), (0, 0)):
        empty = Image(height=height, width=width, encoding="mono8", step=width)
        with pytest.raises(ImageError, match=rf"empty mono8 image \({width}x{height} pixels\)"):
            convert.image_to_rgb(empty)
    assert issubclass(ImageError, ValueError)


def compressed(data: bytes, fmt: str) -> CompressedImage:
    msg = CompressedImage(format=fmt)
    msg.header = header("camera")
    msg.data = array.array("B", data)
    return msg


def test_compressed_png_is_exact() -> None:
    rng = np.random.default_rng(RNG_SEED + 2)
    rgb = rng.integers(0, 256, size=(31, 45, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))  # cv2 encodes BGR
    assert ok
    msg = deserialize_message(serialize_message(compressed(png.tobytes(), "png")), CompressedImage)
    out = convert.compressed_to_rgb(msg)
    assert out.dtype == np.uint8 and out.shape == (31, 45, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


def test_compressed_grey_and_alpha_png() -> None:
    rng = np.random.default_rng(RNG_SEED + 3)
    grey = rng.integers(0, 256, size=(10, 12), dtype=np.uint8)
    _, png = cv2.imencode(".png", grey)
    np.testing.assert_array_equal(convert.compressed_to_rgb(compressed(png.tobytes(), "png")),
                                  np.stack([grey] * 3, axis=-1))
    bgra = rng.integers(0, 256, size=(10, 12, 4), dtype=np.uint8)
    _, png = cv2.imencode(".png", bgra)
    np.testing.assert_array_equal(convert.compressed_to_rgb(compressed(png.tobytes(), "png")),
                                  bgra[..., [2, 1, 0]])


def test_compressed_jpeg_is_close() -> None:
    # Smooth colour gradients survive JPEG at quality 100 within a few grey levels.
    yy, xx = np.mgrid[0:64, 0:96]
    rgb = np.stack([xx * 2, yy * 3, 255 - xx], axis=-1).astype(np.uint8)
    _, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 100])
    out = convert.compressed_to_rgb(compressed(jpeg.tobytes(), "jpeg"))
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 2.0
    # Channel order: the red channel of the decoded image follows the red ramp.
    assert np.corrcoef(out[..., 0].ravel(), rgb[..., 0].ravel())[0, 1] > 0.99


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + bytes(40)],
                         ids=["empty", "garbage", "truncated-png"])
def test_compressed_rejects_undecodable(data: bytes) -> None:
    with pytest.raises(ImageError, match=r"CompressedImage \(format 'png'"):
        convert.compressed_to_rgb(compressed(data, "png"))


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8"])
def test_rgb_to_image(encoding: str, backend: str) -> None:
    rng = np.random.default_rng(RNG_SEED + 4)
    rgb = rng.integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    hdr = header("camera")
    msg = convert.rgb_to_image(rgb, hdr, encoding)
    assert (msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian) == (encoding, 7, 11, 33, 0)
    assert msg.header == hdr
    assert isinstance(msg.data, array.array)
    # Independent reference of the wire bytes: pixel by pixel, channel by channel.
    order = (0, 1, 2) if encoding == "rgb8" else (2, 1, 0)
    reference = bytes(int(rgb[r, c, ch]) for r in range(7) for c in range(11) for ch in order)
    assert bytes(msg.data) == reference
    received = deserialize_message(serialize_message(msg), Image)
    np.testing.assert_array_equal(convert.image_to_rgb(received), rgb)
    # Non-contiguous input (a flipped view) is handled too.
    flipped = rgb[:, ::-1]
    np.testing.assert_array_equal(convert.image_to_rgb(convert.rgb_to_image(flipped, hdr, encoding)), flipped)


def test_rgb_to_image_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        convert.rgb_to_image(np.zeros((4, 4), np.uint8), header())
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        convert.rgb_to_image(np.zeros((4, 4, 4), np.uint8), header())
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        convert.rgb_to_image(np.zeros((4, 4, 3), np.float32), header())
    with pytest.raises(ValueError, match=r"rgb8 and bgr8, got 'mono8'"):
        convert.rgb_to_image(np.zeros((4, 4, 3), np.uint8), header(), "mono8")


# ----------------------------------------------------------------------------------------------
# Calibration and time
# ----------------------------------------------------------------------------------------------

K_NUSCENES = np.array([[1266.417203046554, 0.0, 816.2670197447984],
                       [0.0, 1266.417203046554, 491.50706579294757],
                       [0.0, 0.0, 1.0]])


def test_camera_info_round_trip() -> None:
    hdr = header("CAM_FRONT")
    info = convert.intrinsics_to_camera_info(K_NUSCENES, 1600, 900, hdr)
    assert (info.width, info.height, info.header) == (1600, 900, hdr)
    assert info.distortion_model == "plumb_bob"
    assert list(info.d) == [0.0] * 5
    np.testing.assert_array_equal(np.asarray(info.k).reshape(3, 3), K_NUSCENES)
    np.testing.assert_array_equal(np.asarray(info.r).reshape(3, 3), np.eye(3))
    expected_p = np.hstack([K_NUSCENES, np.zeros((3, 1))])
    np.testing.assert_array_equal(np.asarray(info.p).reshape(3, 4), expected_p)
    received = deserialize_message(serialize_message(info), CameraInfo)
    k = convert.camera_info_intrinsics(received)
    assert k.dtype == np.float64 and k.shape == (3, 3)
    np.testing.assert_array_equal(k, K_NUSCENES)
    # A skew term is allowed.
    skewed = K_NUSCENES.copy()
    skewed[0, 1] = 0.5
    np.testing.assert_array_equal(
        convert.camera_info_intrinsics(convert.intrinsics_to_camera_info(skewed, 10, 10, hdr)), skewed)


def _k_with(index: int, value: float) -> list[float]:
    k = K_NUSCENES.ravel().tolist()
    k[index] = value
    return k


@pytest.mark.parametrize("k, match", [
    ([0.0] * 9, r"fx > 0 and fy > 0 .*uncalibrated"),
    (_k_with(0, math.nan), r"non-finite"),
    (_k_with(2, math.inf), r"non-finite"),
    (_k_with(0, 0.0), r"fx > 0 and fy > 0"),
    (_k_with(4, -1266.0), r"fx > 0 and fy > 0"),
    (_k_with(3, 1.0), r"\[\[fx, s, cx\], \[0, fy, cy\], \[0, 0, 1\]\]"),
    (_k_with(8, 2.0), r"\[\[fx, s, cx\], \[0, fy, cy\], \[0, 0, 1\]\]"),
    (_k_with(6, 0.1), r"\[\[fx, s, cx\], \[0, fy, cy\], \[0, 0, 1\]\]"),
    (_k_with(7, -3.0), r"\[\[fx, s, cx\], \[0, fy, cy\], \[0, 0, 1\]\]"),
], ids=["all-zero", "nan", "inf", "fx-zero", "fy-negative", "k3", "k8", "k6", "k7"])
def test_camera_info_validation(k: list[float], match: str) -> None:
    info = CameraInfo(k=k)
    info.header.frame_id = "CAM_BACK"
    with pytest.raises(CalibrationMessageError, match=match) as caught:
        convert.camera_info_intrinsics(info)
    assert "CAM_BACK" in str(caught.value)
    assert issubclass(CalibrationMessageError, ValueError)
    with pytest.raises(CalibrationMessageError):
        convert.intrinsics_to_camera_info(np.array(k).reshape(3, 3), 10, 10, header())


@pytest.mark.parametrize("distortion", [
    Distortion("plumb_bob", (-0.3, 0.1, 0.001, -0.002, 0.01)),
    Distortion("rational_polynomial", (0.2, -0.05, 0.001, 0.001, 0.01, 0.5, -0.02, 0.03)),
    Distortion("equidistant", (0.05, -0.02, 0.01, -0.002)),
], ids=lambda distortion: distortion.model)
def test_camera_info_distortion_round_trip(distortion: Distortion) -> None:
    info = convert.intrinsics_to_camera_info(K_NUSCENES, 1600, 900, header("CAM_FRONT"), distortion)
    assert info.distortion_model == distortion.model and list(info.d) == list(distortion.coefficients)
    received = deserialize_message(serialize_message(info), CameraInfo)
    assert convert.camera_info_distortion(received) == distortion
    np.testing.assert_array_equal(convert.camera_info_intrinsics(received), K_NUSCENES)


@pytest.mark.parametrize("model, d", [("plumb_bob", [0.0] * 5), ("", []), ("rational_polynomial", [0.0] * 8)])
def test_camera_info_without_distortion(model: str, d: list[float]) -> None:
    assert convert.camera_info_distortion(CameraInfo(distortion_model=model, d=d)) is None


@pytest.mark.parametrize("model, d, match", [
    ("fov", [0.9], r"unsupported distortion model 'fov'"),
    ("plumb_bob", [0.1, 0.0], r"'plumb_bob' takes 4 or 5 coefficients, got 2"),
    ("equidistant", [math.inf, 0.0, 0.0, 0.0], r"must be finite"),
])
def test_camera_info_distortion_refused(model: str, d: list[float], match: str) -> None:
    with pytest.raises(DistortionError, match=match):
        convert.camera_info_distortion(CameraInfo(distortion_model=model, d=d))


def rodrigues(axis: np.ndarray, angle: float) -> np.ndarray:
    """Reference rotation matrix: R = I + sin(a) [k]x + (1 - cos(a)) [k]x^2, k the unit axis."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def axis_angle_quaternion(axis: np.ndarray, angle: float) -> np.ndarray:
    """Reference unit quaternion (x, y, z, w) of a rotation by ``angle`` about ``axis``."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    return np.array([*(math.sin(angle / 2) * k), math.cos(angle / 2)])


def homogeneous(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = rotation, translation
    return out


def rotation_cases() -> list[tuple[np.ndarray, float]]:
    """Axes and angles: identity, exact and near 180 degrees about many axes, random ones."""
    rng = np.random.default_rng(RNG_SEED + 5)
    axes = [np.array(a, dtype=np.float64) for a in
            ([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, -1, 1], [0, -1, 1], [-3, 2, 0.5])]
    cases = [(np.array([0.0, 0.0, 1.0]), 0.0)]
    cases += [(axis, angle) for axis in axes
              for angle in (math.pi, -math.pi, math.pi - 1e-9, math.pi / 2, -2.5, 1e-7)]
    cases += [(rng.normal(size=3), float(angle)) for angle in rng.uniform(-math.pi, math.pi, 200)]
    return cases


def test_transform_round_trip_random_and_180_degree_rotations() -> None:
    rng = np.random.default_rng(RNG_SEED + 6)
    for axis, angle in rotation_cases():
        matrix = homogeneous(rodrigues(axis, angle), rng.uniform(-50, 50, 3))
        transform = convert.matrix_to_transform(matrix)
        q = transform.rotation
        quaternion = np.array([q.x, q.y, q.z, q.w])
        assert abs(np.linalg.norm(quaternion) - 1) < 1e-12
        assert q.w >= 0
        reference = axis_angle_quaternion(axis, angle)
        assert min(np.abs(quaternion - reference).max(), np.abs(quaternion + reference).max()) < 1e-9, \
            (axis, angle, quaternion, reference)
        t = transform.translation
        np.testing.assert_array_equal([t.x, t.y, t.z], matrix[:3, 3])
        received = deserialize_message(serialize_message(transform), Transform)
        back = convert.transform_to_matrix(received)
        assert back.dtype == np.float64 and back.shape == (4, 4)
        np.testing.assert_allclose(back, matrix, rtol=0, atol=1e-12)


def test_transform_to_matrix_against_rodrigues() -> None:
    rng = np.random.default_rng(RNG_SEED + 7)
    for axis, angle in rotation_cases():
        x, y, z, w = axis_angle_quaternion(axis, angle)
        scale = rng.uniform(0.2, 5.0)  # not unit length: must be normalised
        transform = Transform(translation=Vector3(x=1.0, y=-2.0, z=3.5),
                              rotation=Quaternion(x=x * scale, y=y * scale, z=z * scale, w=w * scale))
        matrix = convert.transform_to_matrix(transform)
        np.testing.assert_allclose(matrix, homogeneous(rodrigues(axis, angle), [1.0, -2.0, 3.5]),
                                   rtol=0, atol=1e-12)
    # The default Transform is the identity; 90 degrees about z maps +x onto +y.
    np.testing.assert_array_equal(convert.transform_to_matrix(Transform()), np.eye(4))
    quarter = Transform(rotation=Quaternion(x=0.0, y=0.0, z=math.sqrt(0.5), w=math.sqrt(0.5)))
    np.testing.assert_allclose(convert.transform_to_matrix(quarter) @ [1, 0, 0, 1], [0, 1, 0, 1], atol=1e-15)


@pytest.mark.parametrize("translation, rotation, match", [
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0), r"zero norm"),
    ((0.0, 0.0, 0.0), (1e-12, 0.0, 0.0, 0.0), r"zero norm"),
    ((math.nan, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0), r"non-finite"),
    ((0.0, math.inf, 0.0), (0.0, 0.0, 0.0, 1.0), r"non-finite"),
    ((0.0, 0.0, 0.0), (0.0, math.nan, 0.0, 1.0), r"non-finite"),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0, -math.inf), r"non-finite"),
], ids=["zero-q", "tiny-q", "nan-t", "inf-t", "nan-q", "inf-q"])
def test_transform_to_matrix_rejects(translation, rotation, match) -> None:
    transform = Transform(translation=Vector3(x=translation[0], y=translation[1], z=translation[2]),
                          rotation=Quaternion(x=rotation[0], y=rotation[1], z=rotation[2], w=rotation[3]))
    with pytest.raises(CalibrationMessageError, match=match):
        convert.transform_to_matrix(transform)


def test_matrix_to_transform_rejects_non_rigid() -> None:
    rotation = rodrigues([1.0, 2.0, 3.0], 0.7)
    with pytest.raises(ValueError, match="not a proper rotation"):
        convert.matrix_to_transform(homogeneous(2.0 * rotation, [0, 0, 0]))
    with pytest.raises(ValueError, match="not a proper rotation"):  # a reflection
        convert.matrix_to_transform(homogeneous(rotation @ np.diag([1.0, 1.0, -1.0]), [0, 0, 0]))
    with pytest.raises(ValueError, match="4x4 or 3x4"):
        convert.matrix_to_transform(np.eye(3))
    bad_row = np.eye(4)
    bad_row[3, 0] = 1.0
    with pytest.raises(ValueError, match=r"\[0, 0, 0, 1\]"):
        convert.matrix_to_transform(bad_row)
    with pytest.raises(ValueError, match="non-finite"):
        convert.matrix_to_transform(np.full((4, 4), np.nan))
    # A 3x4 matrix and a float32 one (tolerance) are accepted.
    t = convert.matrix_to_transform(homogeneous(rotation, [1, 2, 3]).astype(np.float32)[:3])
    np.testing.assert_allclose(convert.transform_to_matrix(t)[:3, :3], rotation, atol=1e-6)


@pytest.mark.parametrize("ns", [0, 1, 999_999_999, 1_000_000_000, 1_700_000_123_456_789,
                                -1, -1_500_000_000, 2**31 * 1_000_000_000 - 1])
def test_stamp_round_trip(ns: int) -> None:
    stamp = convert.ns_to_stamp(ns)
    assert 0 <= stamp.nanosec < 1_000_000_000
    assert stamp.sec * 1_000_000_000 + stamp.nanosec == ns
    received = deserialize_message(serialize_message(stamp), Time)
    assert convert.stamp_to_ns(received) == ns
    assert isinstance(convert.stamp_to_ns(received), int)


def test_stamp_conversions() -> None:
    assert convert.stamp_to_ns(Time(sec=12, nanosec=345)) == 12_000_000_345
    assert convert.ns_to_stamp(np.int64(3_000_000_007)) == Time(sec=3, nanosec=7)
    assert convert.ns_to_stamp(-1) == Time(sec=-1, nanosec=999_999_999)
    with pytest.raises(ValueError, match="int32 seconds"):
        convert.ns_to_stamp(2**31 * 1_000_000_000)


# ----------------------------------------------------------------------------------------------
# Detections
# ----------------------------------------------------------------------------------------------

def rotate_by_quaternion(q: Quaternion, v: np.ndarray) -> np.ndarray:
    """Reference: v rotated by q as the Hamilton product q (0, v) q*."""
    def mul(a, b):
        (ax, ay, az, aw), (bx, by, bz, bw) = a, b
        return (aw * bx + ax * bw + ay * bz - az * by,
                aw * by - ax * bz + ay * bw + az * bx,
                aw * bz + ax * by - ay * bx + az * bw,
                aw * bw - ax * bx - ay * by - az * bz)
    quaternion = (q.x, q.y, q.z, q.w)
    conjugate = (-q.x, -q.y, -q.z, q.w)
    return np.array(mul(mul(quaternion, (*v, 0.0)), conjugate)[:3])


@pytest.mark.parametrize("psi", [0.0, 0.3, math.pi / 2, -math.pi / 2, 2.5, math.pi, -3.1, 7.0])
def test_yaw_to_quaternion(psi: float) -> None:
    q = convert.yaw_to_quaternion(psi)
    assert (q.x, q.y) == (0.0, 0.0)
    assert q.z == pytest.approx(math.sin(psi / 2)) and q.w == pytest.approx(math.cos(psi / 2))
    assert math.isclose(q.z ** 2 + q.w ** 2, 1.0)
    np.testing.assert_allclose(rotate_by_quaternion(q, np.array([1.0, 0.0, 0.0])),
                               [math.cos(psi), math.sin(psi), 0.0], atol=1e-12)
    np.testing.assert_allclose(convert.transform_to_matrix(Transform(rotation=q))[:3, :3],
                               rodrigues([0, 0, 1], psi), atol=1e-12)
    assert convert.yaw_to_quaternion(np.float32(psi)).z == pytest.approx(math.sin(float(np.float32(psi)) / 2))


def box(x=0.0, y=0.0, z=0.0, w=2.0, l=4.0, h=1.5, yaw=0.0, vx=0.0, vy=0.0, label=0, score=0.5):
    """One row of the CUDA-BEVFusion layout."""
    return [x, y, z, w, l, h, yaw, vx, vy, label, score]


def make_detections(rows: list[list[float]]) -> Detections:
    return Detections(boxes=np.array(rows, dtype=np.float32).reshape(-1, 11), class_names=CLASS_NAMES)


def random_detections(count: int, seed: int) -> Detections:
    rng = np.random.default_rng(seed)
    rows = [box(*rng.uniform(-40, 40, 2), rng.uniform(-2, 2), *rng.uniform(0.3, 12.0, 3),
                rng.uniform(-math.pi, math.pi), *rng.normal(0, 3, 2), int(rng.integers(0, 10)),
                rng.uniform(0.05, 1.0)) for _ in range(count)]
    return make_detections(rows)


def quaternion_yaw(q: Quaternion) -> float:
    """Yaw of a rotation about +z, wrapped to (-pi, pi]."""
    assert (q.x, q.y) == (0.0, 0.0)
    angle = 2 * math.atan2(q.z, q.w)
    return math.atan2(math.sin(angle), math.cos(angle))


def angle_difference(a: float, b: float) -> float:
    return abs(math.atan2(math.sin(a - b), math.cos(a - b)))


def test_detections_to_msg_hand_made_boxes() -> None:
    detections = make_detections([
        # CUDA yaw -pi/2 is REP-103 heading 0: the box looks along +x.
        box(x=10.0, y=-2.0, z=0.5, w=2.0, l=4.5, h=1.625, yaw=-math.pi / 2, vx=3.0, label=0, score=0.875),
        # CUDA yaw 0 is heading -pi/2: the box looks along -y.
        box(x=-5.0, y=7.0, z=-1.0, w=0.5, l=0.75, h=1.75, yaw=0.0, vy=-1.0, label=8, score=0.25),
    ])
    hdr = header()
    msg = convert.detections_to_msg(detections, hdr)
    assert isinstance(msg, Detection3DArray) and msg.header == hdr
    first, second = msg.detections
    assert first.id == "0" and second.id == "1"
    assert first.header == hdr and second.header == hdr

    assert len(first.results) == 1
    hypothesis = first.results[0]
    assert hypothesis.hypothesis.class_id == "car" and hypothesis.hypothesis.score == 0.875
    position = hypothesis.pose.pose.position
    assert (position.x, position.y, position.z) == (10.0, -2.0, 0.5)
    orientation = hypothesis.pose.pose.orientation
    assert (orientation.x, orientation.y) == (0.0, 0.0)
    # float32 storage of yaw = -pi/2 leaves a heading of ~4e-8 rad.
    assert orientation.z == pytest.approx(0.0, abs=1e-7) and orientation.w == pytest.approx(1.0)
    assert first.bbox.center == hypothesis.pose.pose
    assert (first.bbox.size.x, first.bbox.size.y, first.bbox.size.z) == (4.5, 2.0, 1.625)

    assert second.results[0].hypothesis.class_id == "pedestrian"
    assert second.results[0].hypothesis.score == 0.25
    q = second.bbox.center.orientation
    assert q.z == pytest.approx(math.sin(-math.pi / 4)) and q.w == pytest.approx(math.cos(-math.pi / 4))
    # The length axis of the box (its local +x) points along -y.
    np.testing.assert_allclose(rotate_by_quaternion(q, np.array([1.0, 0.0, 0.0])), [0, -1, 0], atol=1e-12)
    assert (second.bbox.size.x, second.bbox.size.y, second.bbox.size.z) == (0.75, 0.5, 1.75)

    vectors = convert.velocities(detections)
    assert [(v.x, v.y, v.z) for v in vectors] == [(3.0, 0.0, 0.0), (0.0, -1.0, 0.0)]


def test_detections_to_msg_matches_to_rep103() -> None:
    detections = random_detections(60, RNG_SEED + 8)
    hdr = header()
    msg = deserialize_message(serialize_message(convert.detections_to_msg(detections, hdr)),
                              Detection3DArray)
    reference = detections.to_rep103()
    assert len(msg.detections) == len(reference) == 60
    for index, (detection, expected) in enumerate(zip(msg.detections, reference)):
        assert detection.id == str(index) and detection.header == hdr
        (hypothesis,) = detection.results
        assert hypothesis.hypothesis.class_id == expected["label"]
        assert hypothesis.hypothesis.score == pytest.approx(expected["score"], abs=1e-12)
        for pose in (hypothesis.pose.pose, detection.bbox.center):
            p = pose.position
            np.testing.assert_allclose([p.x, p.y, p.z], expected["center"], rtol=0, atol=1e-12)
            assert angle_difference(quaternion_yaw(pose.orientation), expected["yaw"]) < 1e-9
            assert math.isclose(pose.orientation.z ** 2 + pose.orientation.w ** 2, 1.0)
        s = detection.bbox.size
        np.testing.assert_allclose([s.x, s.y, s.z], expected["size"], rtol=0, atol=1e-12)
        assert list(hypothesis.pose.covariance) == [0.0] * 36
    velocity_vectors = convert.velocities(detections)
    assert len(velocity_vectors) == 60
    for vector, expected in zip(velocity_vectors, reference):
        np.testing.assert_allclose([vector.x, vector.y, vector.z], [*expected["velocity"], 0.0], atol=1e-12)


@pytest.mark.parametrize("frame_id", ["l", "li", "lid", "lida", "lidar", "lidar_", "lidar_t", "lidar_to"])
def test_serialized_outputs_read_back_for_every_alignment(frame_id: str) -> None:
    """Strings of every length mod 8 before the float64 fields: the bytes the node publishes read
    back through rclpy's own deserializer into the expected fields, and rclpy writes the same
    message in exactly as many bytes (the same layout, padding included)."""
    detections, hdr = random_detections(25, RNG_SEED + len(frame_id)), header(frame_id)
    expected = detections.to_rep103()
    data = convert.serialize_detections(detections, hdr)
    msg = deserialize_message(data, Detection3DArray)
    assert len(serialize_message(msg)) == len(data) and msg.header == hdr
    assert [d.id for d in msg.detections] == [str(i) for i in range(25)]
    assert [d.results[0].hypothesis.class_id for d in msg.detections] == [e["label"] for e in expected]
    np.testing.assert_allclose([d.bbox.size.z for d in msg.detections], [e["size"][2] for e in expected], atol=1e-12)
    data = convert.serialize_markers(detections, hdr, namespace="n" * len(frame_id))
    markers = deserialize_message(data, MarkerArray).markers
    assert len(serialize_message(MarkerArray(markers=markers))) == len(data)
    assert all(marker.header == hdr for marker in markers)
    labels = [m.text for m in markers if m.ns == "n" * len(frame_id) + "/labels"]
    assert labels == [f"{e['label']} {e['score']:.2f}" for e in expected]


def test_velocities_fit_frame_info() -> None:
    from bevfusion_ros_msgs.msg import FrameInfo

    detections = random_detections(5, RNG_SEED + 9)
    info = FrameInfo(header=header(), velocities=convert.velocities(detections))
    received = deserialize_message(serialize_message(info), FrameInfo)
    np.testing.assert_allclose([[v.x, v.y] for v in received.velocities],
                               detections.boxes[:, 7:9].astype(np.float64), atol=0)


def test_empty_detections() -> None:
    empty = make_detections([])
    hdr = header()
    msg = convert.detections_to_msg(empty, hdr)
    assert msg.header == hdr and list(msg.detections) == []
    assert convert.velocities(empty) == []
    markers = convert.detections_to_markers(empty, hdr).markers
    assert len(markers) == 1 and markers[0].action == Marker.DELETEALL


# ----------------------------------------------------------------------------------------------
# Markers
# ----------------------------------------------------------------------------------------------

def reference_corners(center, size, yaw) -> np.ndarray:
    """The 8 corners of a REP-103 box, computed from to_rep103() values: (+-l/2, +-w/2, +-h/2)
    rotated by yaw about +z, then shifted to the centre."""
    length, width, height = size
    rotation = rodrigues([0, 0, 1], yaw)
    local = np.array(list(itertools.product((-length / 2, length / 2), (-width / 2, width / 2),
                                            (-height / 2, height / 2))))
    return local @ rotation.T + np.asarray(center)


def markers_by_ns(markers: list[Marker]) -> dict[str, dict[int, Marker]]:
    out: dict[str, dict[int, Marker]] = {}
    for marker in markers:
        assert marker.id not in out.setdefault(marker.ns, {}), f"duplicate id {marker.ns}/{marker.id}"
        out[marker.ns][marker.id] = marker
    return out


def test_markers_boxes_labels_arrows() -> None:
    detections = make_detections([
        box(x=10.0, y=-2.0, z=0.5, w=2.0, l=4.5, h=1.6, yaw=-math.pi / 2, vx=3.0, label=0, score=0.87),
        box(x=-5.0, y=7.0, z=-1.0, w=0.6, l=0.8, h=1.8, yaw=0.4, vx=0.1, vy=0.1, label=8, score=0.5),
        box(x=1.0, y=1.0, z=0.0, w=2.5, l=10.0, h=3.5, yaw=2.0, vx=0.0, vy=-0.5, label=3, score=0.333),
        box(x=3.0, y=-3.0, z=0.2, w=0.4, l=0.4, h=0.9, yaw=-1.0, label=9, score=0.999),
    ])
    hdr = header()
    array_msg = convert.detections_to_markers(detections, hdr)
    assert isinstance(array_msg, MarkerArray)
    received = deserialize_message(serialize_message(array_msg), MarkerArray)
    markers = list(received.markers)

    assert markers[0].action == Marker.DELETEALL and markers[0].ns == ""
    assert all(marker.action == Marker.ADD for marker in markers[1:])
    assert all(marker.header == hdr for marker in markers)
    namespaces = markers_by_ns(markers[1:])
    assert set(namespaces) == {"bevfusion/boxes", "bevfusion/labels", "bevfusion/velocity"}
    boxes, labels, arrows = (namespaces[f"bevfusion/{name}"] for name in ("boxes", "labels", "velocity"))
    assert sorted(boxes) == sorted(labels) == [0, 1, 2, 3]
    # Speeds 3, 0.14, 0.5, 0 m/s: arrows only above 0.2 m/s.
    assert sorted(arrows) == [0, 2]

    for index, expected in enumerate(detections.to_rep103()):
        label = CLASS_NAMES.index(expected["label"])
        color = convert.CLASS_COLORS[label]

        lines = boxes[index]
        assert lines.type == Marker.LINE_LIST and lines.scale.x == 0.05
        assert (lines.color.r, lines.color.g, lines.color.b, lines.color.a) == pytest.approx((*color, 1.0))
        assert (lines.pose.orientation.w, lines.pose.position.x) == (1.0, 0.0)
        points = np.array([[p.x, p.y, p.z] for p in lines.points])
        assert points.shape == (24, 3)
        corners = reference_corners(expected["center"], expected["size"], expected["yaw"])
        # Each endpoint is a corner; every corner is used, by exactly 3 edges; no edge repeats.
        distance = np.linalg.norm(points[:, None] - corners[None], axis=2)  # [24, 8]
        assert (distance.min(axis=1) < 1e-5).all()
        corner_of_point = distance.argmin(axis=1)
        assert np.bincount(corner_of_point, minlength=8).tolist() == [3] * 8
        edges = {frozenset(pair) for pair in corner_of_point.reshape(12, 2).tolist()}
        assert len(edges) == 12 and all(len(edge) == 2 for edge in edges)
        # Edge lengths: 4 of each of length, width, height, each along its box axis.
        length, width, height = expected["size"]
        heading = np.array([math.cos(expected["yaw"]), math.sin(expected["yaw"]), 0.0])
        left = np.array([-heading[1], heading[0], 0.0])
        counts = {"l": 0, "w": 0, "h": 0}
        for start, end in points.reshape(12, 2, 3):
            vector = end - start
            size = np.linalg.norm(vector)
            direction = vector / size
            if abs(abs(direction @ heading) - 1) < 1e-6:
                assert size == pytest.approx(length, abs=1e-5)
                counts["l"] += 1
            elif abs(abs(direction @ left) - 1) < 1e-6:
                assert size == pytest.approx(width, abs=1e-5)
                counts["w"] += 1
            else:
                assert abs(abs(direction[2]) - 1) < 1e-9
                assert size == pytest.approx(height, abs=1e-5)
                counts["h"] += 1
        assert counts == {"l": 4, "w": 4, "h": 4}

        text = labels[index]
        assert text.type == Marker.TEXT_VIEW_FACING and text.scale.z == 0.6
        assert text.text == f"{expected['label']} {expected['score']:.2f}"
        top = expected["center"][2] + height / 2
        p = text.pose.position
        np.testing.assert_allclose([p.x, p.y, p.z], [*expected["center"][:2], top + 0.5], atol=1e-9)
        assert (text.color.r, text.color.g, text.color.b, text.color.a) == pytest.approx((*color, 1.0))

        if index in arrows:
            arrow = arrows[index]
            assert arrow.type == Marker.ARROW
            assert (arrow.scale.x, arrow.scale.y, arrow.scale.z) == (0.1, 0.2, 0.2)
            start, end = ([q.x, q.y, q.z] for q in arrow.points)
            np.testing.assert_allclose(start, expected["center"], atol=1e-12)
            np.testing.assert_allclose(end, np.asarray(expected["center"]) + [*expected["velocity"], 0.0],
                                       atol=1e-12)
            assert arrow.color == text.color

    assert labels[0].text == "car 0.87"
    assert labels[3].text == "traffic_cone 1.00"


def test_marker_colors_namespace_and_lifetime() -> None:
    assert len(convert.CLASS_COLORS) == 10
    assert len(set(convert.CLASS_COLORS)) == 10
    assert all(0.0 <= c <= 1.0 for color in convert.CLASS_COLORS for c in color)
    detections = make_detections([box(x=float(i), label=i, vx=1.0) for i in range(10)])
    markers = convert.detections_to_markers(detections, header(), namespace="front", lifetime_s=0.25).markers
    namespaces = markers_by_ns(markers[1:])
    assert set(namespaces) == {"front/boxes", "front/labels", "front/velocity"}
    colors = [(m.color.r, m.color.g, m.color.b) for _, m in sorted(namespaces["front/boxes"].items())]
    np.testing.assert_allclose(colors, convert.CLASS_COLORS, atol=1e-6)  # ColorRGBA is float32
    assert len(set(colors)) == 10
    for marker in markers[1:]:
        assert (marker.lifetime.sec, marker.lifetime.nanosec) == (0, 250_000_000)
    assert convert.class_color(13) == convert.class_color(3)
    default = convert.detections_to_markers(detections, header()).markers
    assert all((m.lifetime.sec, m.lifetime.nanosec) == (0, 0) for m in default)
    with pytest.raises(ValueError, match="duration"):
        convert.detections_to_markers(detections, header(), lifetime_s=-1.0)


def test_msg_to_detections_inverts_detections_to_msg():
    from bevfusion_ros.ros.convert import msg_to_detections
    rng = np.random.default_rng(11)
    boxes = np.column_stack([rng.uniform(-50, 50, (20, 3)), rng.uniform(0.5, 5, (20, 3)),
                             rng.uniform(-np.pi, np.pi, 20), rng.uniform(-5, 5, (20, 2)),
                             rng.integers(0, 3, 20), rng.uniform(0, 1, 20)]).astype(np.float32)
    detections = Detections(boxes=boxes, class_names=("car", "truck", "bus"))
    header = Header(frame_id="lidar_top")
    header.stamp.sec, header.stamp.nanosec = 12, 345
    back = msg_to_detections(convert.detections_to_msg(detections, header), detections.class_names,
                             convert.velocities(detections))
    assert back.stamp_ns == 12_000_000_345 and back.frame_id == "lidar_top"
    np.testing.assert_allclose(back.boxes[:, [0, 1, 2, 3, 4, 5, 7, 8, 9, 10]],
                               boxes[:, [0, 1, 2, 3, 4, 5, 7, 8, 9, 10]], atol=1e-5)
    yaw_error = np.angle(np.exp(1j * (back.boxes[:, 6] - boxes[:, 6])))
    assert np.abs(yaw_error).max() < 1e-5
