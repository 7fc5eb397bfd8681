"""Undistortion fused into normalization (camera/undistort.py) against independent references:
exact rational arithmetic (fma32), a float64 bilinear loop, the distortion models' float64
formulas, ``cv2.remap`` followed by ``normalize_images``, and a distort -> undistort round trip."""
from __future__ import annotations

import math
from fractions import Fraction

import cv2
import numpy as np
import pytest

from bevfusion_ros.camera.normalize import normalize_images
from bevfusion_ros.camera.undistort import (
    OPENCV4_TOLERANCE_LEVELS,
    RemapTables,
    distorted_image,
    fma32,
    remap_tables,
    sample_bilinear,
    tap_grid,
    undistortion_map,
)
from bevfusion_ros.config import ImageConfig
from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.distortion import Distortion
from bevfusion_ros.io.frame import load_example_data
from bevfusion_ros.model.presets import NUSCENES_R50, TINY

PLUMB_BOB = Distortion("plumb_bob", (-0.3, 0.1, 0.001, -0.002, 0.0))
RATIONAL = Distortion("rational_polynomial", (0.2, -0.05, 0.001, 0.001, 0.01, 0.5, -0.02, 0.03))
EQUIDISTANT = Distortion("equidistant", (0.05, -0.02, 0.01, -0.002))
MODELS = [PLUMB_BOB, RATIONAL, EQUIDISTANT]
K = np.array([[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]])
# Small configs whose taps leave the image (clamping): downscale by 2 and upscale by 2.
DOWNSCALE = ImageConfig(input_width=40, input_height=30, output_width=20, output_height=15, resize_scale=0.5)
UPSCALE = ImageConfig(input_width=10, input_height=8, output_width=20, output_height=16, resize_scale=2.0)
#: |ours - cv2.remap| in grey levels: OpenCV 5 samples as we do; OpenCV 4 in fixed point.
REMAP_TOLERANCE = 0 if int(cv2.__version__.split(".")[0]) >= 5 else OPENCV4_TOLERANCE_LEVELS


@pytest.fixture(scope="module")
def example(example_data_dir):
    return load_example_data(example_data_dir)


def opencv_remap(rgb: np.ndarray, source: np.ndarray) -> np.ndarray:
    return cv2.remap(rgb, np.ascontiguousarray(source[..., 0]), np.ascontiguousarray(source[..., 1]),
                     cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


# ---------------------------------------------------------------- fma32

def float32_nearest(value: Fraction) -> np.float32:
    """The float32 nearest to ``value`` (ties to the even significand), by exact comparison."""
    guess = np.float32(float(value))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    errors = [abs(Fraction(float(candidate)) - value) for candidate in candidates]
    best = min(errors)
    ties = [candidate for candidate, error in zip(candidates, errors) if error == best]
    return min(ties, key=lambda candidate: int(np.array(candidate).view(np.int32)) & 1)


def test_fma32_rounds_once_like_exact_arithmetic():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, 3000).astype(np.float32)
    b = rng.uniform(-255, 255, 3000).astype(np.float32)
    c = rng.uniform(0, 255, 3000).astype(np.float32)
    # Hard cases: products that nearly cancel c, tiny a, and values a float64 sum rounds twice.
    a[:500] = np.float32(1) + np.float32(2.0 ** -23) * rng.integers(1, 8, 500)
    b[:500] = np.float32(1) - np.float32(2.0 ** -23) * rng.integers(1, 8, 500)
    c[:500] = np.float32(-1)
    a[500:600] = np.float32(2.0 ** -60) * rng.uniform(1, 2, 100).astype(np.float32)
    a[600:700], b[600:700], c[600:700] = np.float32(1 + 2.0 ** -12), np.float32(1 + 2.0 ** -12), np.float32(2.0 ** -60)
    got = fma32(a, b, c)
    expected = [float32_nearest(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                for x, y, z in zip(a, b, c)]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.float32))


# ---------------------------------------------------------------- sampling

def bilinear_float64(rgb: np.ndarray, x: float, y: float) -> np.ndarray:
    """Exact bilinear value at (x, y), taps outside the image 0, one position at a time."""
    height, width = rgb.shape[:2]
    x0, y0 = math.floor(x), math.floor(y)
    ax, ay = x - x0, y - y0
    value = np.zeros(3)
    for dy, wy in ((0, 1 - ay), (1, ay)):
        for dx, wx in ((0, 1 - ax), (1, ax)):
            if 0 <= x0 + dx < width and 0 <= y0 + dy < height:
                value += wx * wy * rgb[y0 + dy, x0 + dx].astype(np.float64)
    return value


def random_positions(rng: np.random.Generator, shape: tuple[int, ...], width: int, height: int):
    """float32 positions over the image and 3 pixels beyond each border, some on the pixel grid."""
    x = rng.uniform(-3, width + 2, shape).astype(np.float32)
    y = rng.uniform(-3, height + 2, shape).astype(np.float32)
    x.flat[::7], y.flat[::5] = np.round(x.flat[::7]), np.round(y.flat[::5])
    return x, y


def test_sampling_is_the_rounded_exact_bilinear_value():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    x, y = random_positions(rng, (2000,), 17, 12)
    got = sample_bilinear(rgb, x, y).astype(np.float64)
    exact = np.array([bilinear_float64(rgb, float(u), float(v)) for u, v in zip(x, y)])
    # float32 arithmetic is within 1e-3 of the exact value: rint of it, unless near a half.
    assert np.abs(got - exact).max() <= 0.5 + 1e-3
    clear = np.abs(exact - np.floor(exact) - 0.5) > 1e-3
    np.testing.assert_array_equal(got[clear], np.rint(exact[clear]))


def test_sampling_equals_opencv_remap_inside_and_across_the_border():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    x, y = random_positions(rng, (300, 400), 80, 60)
    expected = opencv_remap(rgb, np.stack([x, y], -1))
    difference = np.abs(sample_bilinear(rgb, x, y).astype(int) - expected)
    assert difference.max() <= REMAP_TOLERANCE


def test_identity_positions_give_the_image_back():
    rgb = np.random.default_rng(3).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    y, x = np.mgrid[0:9, 0:11].astype(np.float32)
    np.testing.assert_array_equal(sample_bilinear(rgb, x, y), rgb)


# ---------------------------------------------------------------- remap tables

def distorted_normalized(model: Distortion, x: float, y: float) -> tuple[float, float]:
    """The distortion model's float64 formula: undistorted normalized (x, y) -> distorted."""
    k = model.coefficients
    if model.model == "equidistant":
        r = math.hypot(x, y)
        theta = math.atan(r)
        theta_d = theta * (1 + k[0] * theta ** 2 + k[1] * theta ** 4 + k[2] * theta ** 6 + k[3] * theta ** 8)
        scale = theta_d / r if r > 0 else 1.0
        return x * scale, y * scale
    k1, k2, p1, p2, k3, k4, k5, k6 = k + (0.0,) * (8 - len(k))      # plumb_bob: k3 (and k4-k6) 0
    r2 = x * x + y * y
    radial = (1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3) / (1 + k4 * r2 + k5 * r2 ** 2 + k6 * r2 ** 3)
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.model)
def test_remap_table_follows_the_distortion_formula(model):
    width, height = 1600, 900
    source = undistortion_map(K, model, width, height)
    assert source.shape == (height, width, 2) and source.dtype == np.float32 and not source.flags.writeable
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    for v in range(0, height, 53):
        for u in list(range(0, width, 97)) + [width - 1]:
            xd, yd = distorted_normalized(model, (u - cx) / fx, (v - cy) / fy)
            expected = (fx * xd + cx, fy * yd + cy)
            # float32 storage of positions up to ~2000 px: 1.2e-4 ulp.
            np.testing.assert_allclose(source[v, u], expected, atol=1e-3, err_msg=f"pixel {(u, v)}")


def test_remap_table_of_a_zero_distortion_is_the_identity():
    source = undistortion_map(K, Distortion("plumb_bob", (0.0, 0.0, 0.0, 0.0, 1e-30)), 64, 48)
    y, x = np.mgrid[0:48, 0:64]
    np.testing.assert_allclose(source, np.stack([x, y], -1), atol=1e-4)


def test_far_and_non_finite_positions_are_outside_and_sample_zero(monkeypatch):
    import bevfusion_ros.camera.undistort as undistort
    wild = np.zeros((6, 8, 2), np.float32)
    wild[0, 0], wild[0, 1], wild[1, 0], wild[1, 1] = (np.nan, 3), (1e30, 3), (3, -1e30), (3, np.inf)
    wild[2, 2] = (3.5, 2.25)
    monkeypatch.setattr(undistort, "_opencv_map", lambda *args: wild)
    source = undistort.undistortion_map(np.diag([100.0, 100.0, 1.0]), Distortion("plumb_bob", (0.5, 0, 0, 0)), 8, 6)
    np.testing.assert_array_equal(source[0, 0], (-2, -2))
    np.testing.assert_array_equal(source[0, 1], (9, 3))
    np.testing.assert_array_equal(source[1, 0], (3, -2))
    np.testing.assert_array_equal(source[2, 2], (3.5, 2.25))
    rgb = np.full((6, 8, 3), 200, np.uint8)
    samples = sample_bilinear(rgb, source[..., 0], source[..., 1])
    assert not samples[0, :2].any() and not samples[1, :2].any() and (samples[2, 2] == 200).all()


# ---------------------------------------------------------------- fused normalization

def remap_then_normalize(images, tables: RemapTables, image: ImageConfig) -> np.ndarray:
    """The definition: ``cv2.remap`` of each distorted camera's raw image, then normalization."""
    undistorted = [rgb if tables.camera_map(index) is None else opencv_remap(rgb, tables.camera_map(index))
                   for index, rgb in enumerate(images)]
    return normalize_images(undistorted, image)


def grey_levels(normalized: np.ndarray, image: ImageConfig) -> np.ndarray:
    """fp16 ``[N, 3, h, w]`` back to integer grey levels."""
    mean, std = (np.array(values)[None, :, None, None] for values in (image.mean, image.std))
    return np.rint((normalized.astype(np.float64) * std + mean) * 255)


def rig(example, image: ImageConfig, distortions) -> Calibration:
    calibration = example.calibration
    return Calibration.from_camera2lidar(calibration.camera_intrinsics[:, :3, :3], calibration.camera2lidar,
                                         image, calibration.camera_names, distortions)


def assert_equal_or_within_opencv4(got: np.ndarray, expected: np.ndarray, image: ImageConfig) -> None:
    if REMAP_TOLERANCE == 0:
        assert np.array_equal(got.view(np.uint16), expected.view(np.uint16))
    else:     # a shifted input level shifts a blended level by at most as much (+1 rounding)
        assert np.abs(grey_levels(got, image) - grey_levels(expected, image)).max() <= REMAP_TOLERANCE + 1


@pytest.mark.parametrize("image", [NUSCENES_R50.pipeline.image, TINY.pipeline.image], ids=["r50", "tiny"])
def test_fused_normalization_is_remap_then_normalize_on_the_example_rig(example, image):
    calibration = rig(example, image, [PLUMB_BOB, None, RATIONAL, None, EQUIDISTANT, PLUMB_BOB])
    tables = remap_tables(calibration, image)
    np.testing.assert_array_equal(tables.map_index, [0, -1, 1, -1, 2, 3])
    fused = normalize_images(example.images, image, num_cameras=6, remap=tables)
    assert_equal_or_within_opencv4(fused, remap_then_normalize(example.images, tables, image), image)
    plain = normalize_images(example.images, image)          # undistorted cameras: unchanged, bit for bit
    assert np.array_equal(fused[[1, 3]].view(np.uint16), plain[[1, 3]].view(np.uint16))
    assert not np.array_equal(fused[0], plain[0])


@pytest.mark.parametrize("image", [DOWNSCALE, UPSCALE], ids=["downscale", "upscale"])
def test_fused_normalization_with_random_tables_and_clamped_taps(image):
    rng = np.random.default_rng(4)
    height, width = image.input_height, image.input_width
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(3)]
    maps = np.stack([np.stack(random_positions(rng, (height, width), width, height), -1) for _ in range(2)])
    tables = RemapTables(np.array([1, -1, 0], np.int32), maps, slice(0, height), ())
    fused = normalize_images(images, image, remap=tables)
    assert_equal_or_within_opencv4(fused, remap_then_normalize(images, tables, image), image)


def test_rows_outside_the_source_band_are_never_read(example):
    image = NUSCENES_R50.pipeline.image
    calibration = example.calibration
    front = Calibration.from_camera2lidar(calibration.camera_intrinsics[:1, :3, :3], calibration.camera2lidar[:1],
                                          image, calibration.camera_names[:1], [PLUMB_BOB])
    tables = remap_tables(front, image)
    band = tables.source_rows
    assert 0 <= band.start < band.stop <= image.input_height
    poisoned = [example.images[0].copy()]
    for rgb in poisoned:
        rgb[:band.start] = 255 - rgb[:band.start]
        rgb[band.stop:] = 255 - rgb[band.stop:]
    expected = normalize_images(example.images[:1], image, remap=tables)
    assert np.array_equal(normalize_images(poisoned, image, remap=tables).view(np.uint16), expected.view(np.uint16))
    # ... and the band is tight: its first and last rows are read.
    for row in (band.start, band.stop - 1):
        changed = example.images[0].copy()
        changed[row] = 255 - changed[row]
        assert not np.array_equal(normalize_images([changed], image, remap=tables), expected)


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.model)
def test_a_distorted_image_undistorts_back_to_the_original(example, model):
    """Round trip: the example FRONT image seen through ``model`` (OpenCV's inverse mapping),
    then undistorted by the fused path: the network input matches the original's within the
    blur of two bilinear interpolations (levels, where the distorted image covers the view)."""
    image = NUSCENES_R50.pipeline.image
    intrinsics = example.calibration.camera_intrinsics[0, :3, :3]
    raw = distorted_image(example.images[0], intrinsics, model)
    source = undistortion_map(intrinsics, model, image.input_width, image.input_height)
    tables = RemapTables(np.array([0], np.int32), source[None], slice(0, image.input_height), ())
    got = grey_levels(normalize_images([raw], image, remap=tables), image)[0]
    original = grey_levels(normalize_images([example.images[0]], image), image)[0]
    difference = np.abs(got - original)
    assert difference.mean() < 0.6 and np.percentile(difference, 99) <= 4 and difference.max() <= 25
    without = np.abs(grey_levels(normalize_images([raw], image), image)[0] - original)
    assert without.mean() > 10 * difference.mean()          # the distortion is large


def test_tables_depend_on_intrinsics_and_distortion_only(example):
    image = TINY.pipeline.image
    assert remap_tables(rig(example, image, [None] * 6), image) is None
    tables = remap_tables(rig(example, image, [None, PLUMB_BOB, None, None, None, None]), image)
    assert tables.maps.shape == (1, 900, 1600, 2) and not tables.maps.flags.writeable
    np.testing.assert_array_equal(tables.camera_map(1), undistortion_map(
        example.calibration.camera_intrinsics[1, :3, :3], PLUMB_BOB, 1600, 900))
    moved = example.calibration.camera2lidar.copy()
    moved[:, :3, 3] += 0.5
    other_extrinsics = Calibration.from_camera2lidar(example.calibration.camera_intrinsics[:, :3, :3], moved, image,
                                                     example.calibration.camera_names,
                                                     [None, PLUMB_BOB, None, None, None, None])
    assert remap_tables(other_extrinsics, image, previous=tables) is tables
    assert remap_tables(rig(example, image, [None, RATIONAL] + [None] * 4), image, previous=tables) is not tables


def test_tap_grid_is_what_normalization_reads():
    image = NUSCENES_R50.pipeline.image
    rows, columns = tap_grid(image)
    # scale 0.48: each output row / column reads two distinct source rows / columns
    assert len(rows) == 2 * image.output_height and len(columns) == 2 * image.output_width
    rgb = np.random.default_rng(5).integers(0, 256, (900, 1600, 3), dtype=np.uint8)
    masked = np.zeros_like(rgb)
    masked[np.ix_(rows, columns)] = rgb[np.ix_(rows, columns)]
    assert np.array_equal(normalize_images([masked], image), normalize_images([rgb], image))


@pytest.mark.parametrize("change, message", [
    (lambda tables: RemapTables(tables.map_index[:2], tables.maps, tables.source_rows, ()),
     "remap tables are for 2 cameras, got 3 images"),
    (lambda tables: RemapTables(tables.map_index, tables.maps[:, :-1], tables.source_rows, ()),
     r"the input size is 40x30"),
], ids=["count", "size"])
def test_mismatched_tables_are_refused(change, message):
    images = [np.zeros((30, 40, 3), np.uint8)] * 3
    tables = RemapTables(np.array([0, -1, 0], np.int32), np.zeros((1, 30, 40, 2), np.float32), slice(0, 30), ())
    with pytest.raises(ValueError, match=message):
        normalize_images(images, DOWNSCALE, remap=change(tables))
