"""CuPy camera ops (normalize, depth, bevpool, geometry upload) against their NumPy versions.

normalize and depth must match bit for bit. bevpool sums the same float32 terms in another
order (sequential FMA vs NumPy's rounded products + pairwise reduceat), so it is compared
per cell within ``POOL_RTOL * sum |F * W|``: the worst-case float32 error of an n-term sum
is about n * 2**-24 * sum |terms| and the typical one sqrt(n) * 2**-24 * sum |terms|,
i.e. ~1e-6 for the largest (887-point) cells of the nuScenes geometry. Every kernel path (fp16
16-byte or scalar loads, channels-last 16-byte or scalar stores, channel-major stores) sums the
same terms in the same order, so the paths and ``out`` layouts must agree bit for bit; ``out``
buffers are NaN-poisoned first, so every element must be written.
Timings (CUDA events, median of 50 after warm-up) are printed, never asserted.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gpu_timing import median_ms, report

from bevfusion_ros.camera.bevpool import bev_pool, feature_rows
from bevfusion_ros.camera.depth import depth_map, project_points
from bevfusion_ros.camera.geometry import compute_geometry
from bevfusion_ros.camera.normalize import normalize_images
from bevfusion_ros.config import ImageConfig
from bevfusion_ros.model.presets import NUSCENES_R50, TINY

cupy = pytest.importorskip("cupy")

R50 = NUSCENES_R50.pipeline
POOL_RTOL = 1e-5
# Small configs whose taps leave the image (clamping): downscale by 2 and upscale by 2.
DOWNSCALE = ImageConfig(input_width=40, input_height=30, output_width=20, output_height=15, resize_scale=0.5)
UPSCALE = ImageConfig(input_width=10, input_height=8, output_width=20, output_height=16, resize_scale=2.0)


@pytest.fixture(scope="module")
def r50_geometry(frame):
    return compute_geometry(frame.calibration, R50)


def assert_same_bits(gpu, expected: np.ndarray) -> None:
    assert isinstance(gpu, cupy.ndarray) and gpu.dtype == expected.dtype and gpu.shape == expected.shape
    assert np.array_equal(gpu.get().view(np.uint16), expected.view(np.uint16))


# ---------------------------------------------------------------- normalize

def random_images(image: ImageConfig, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, image.input_height, image.input_width, 3), dtype=np.uint8)


@pytest.mark.parametrize("image", [R50.image, TINY.pipeline.image, DOWNSCALE, UPSCALE],
                         ids=["r50", "tiny", "downscale", "upscale"])
@pytest.mark.parametrize("seed, count", [(0, 1), (1, 3)])
def test_normalize_is_bit_identical_on_random_images(image, seed, count):
    images = random_images(image, count, seed)
    expected = normalize_images(list(images), image)
    assert_same_bits(normalize_images(cupy.asarray(images), image), expected)
    listed = [cupy.asarray(rgb) for rgb in images]
    assert_same_bits(normalize_images(listed, image, num_cameras=count), expected)


def test_normalize_is_bit_identical_on_the_example_images(frame, capsys):
    expected = normalize_images(frame.images, R50.image, num_cameras=6)
    images = cupy.asarray(np.stack(frame.images))
    assert_same_bits(normalize_images(images, R50.image, num_cameras=6), expected)
    out = cupy.empty(expected.shape, cupy.float16)
    assert normalize_images(images, R50.image, out=out) is out
    assert_same_bits(out, expected)
    report(capsys, f"normalize 6 x 1600x900 -> 704x256 fp16: "
                   f"{median_ms(lambda: normalize_images(images, R50.image, out=out)):.4f} ms")


def test_normalize_rejects_wrong_images_and_buffers():
    image = TINY.pipeline.image
    images = cupy.asarray(random_images(image, 2, seed=2))
    with pytest.raises(ValueError, match=r"expected 3 camera image\(s\), got 2"):
        normalize_images(images, image, num_cameras=3)
    with pytest.raises(ValueError, match="camera 1: expected a uint8 cupy image, got float32"):
        normalize_images([images[0], images[1].astype(cupy.float32)], image)
    with pytest.raises(ValueError, match="camera 0: expected size"):
        normalize_images(images[:, 1:], image)
    with pytest.raises(ValueError, match="out must be a C-contiguous CuPy float16 array"):
        normalize_images(images, image, out=cupy.empty((2, 3, image.output_height, image.output_width)))
    with pytest.raises(ValueError, match="out= is supported for CuPy images only"):
        normalize_images(list(images.get()), image, out=cupy.empty((2, 3, 1, 1), cupy.float16))


# ---------------------------------------------------------------- depth

def hard_points(frame, seed: int) -> np.ndarray:
    """Example points plus near-duplicates (collisions), random, NaN/inf and behind-camera points."""
    rng = np.random.default_rng(seed)
    sample = frame.points[rng.choice(len(frame.points), 20000, replace=False), :3]
    nearby = sample[:5000] * rng.uniform(0.999, 1.001, (5000, 1)).astype(np.float32)
    spread = rng.uniform([-60, -60, -5], [60, 60, 5], (20000, 3)).astype(np.float32)
    odd = np.array([[np.nan, 1, 1], [np.inf, 0, 0], [0, 0, -np.inf], [0, 0, 0], [1e6, 1e6, 1e6]], np.float32)
    points = np.concatenate([sample, nearby, spread, sample[:3000], odd])
    return points[rng.permutation(len(points))]


def test_depth_is_bit_identical_on_the_example_frame(frame, capsys):
    calibration = frame.calibration
    height, width = R50.image.output_height, R50.image.output_width
    expected = depth_map(frame.points, calibration.lidar2image, calibration.img_aug_matrix, height, width)
    points = cupy.asarray(frame.points)
    lidar2image, augmentation = (cupy.asarray(m, dtype=cupy.float32)
                                 for m in (calibration.lidar2image, calibration.img_aug_matrix))
    assert_same_bits(depth_map(points, lidar2image, augmentation, height, width), expected)
    assert_same_bits(depth_map(points.astype(cupy.float16), lidar2image, augmentation, height, width),
                     depth_map(frame.points.astype(np.float16), calibration.lidar2image,
                               calibration.img_aug_matrix, height, width))
    out = cupy.empty(expected.shape, cupy.float16)
    milliseconds = median_ms(lambda: depth_map(points, lidar2image, augmentation, height, width, out))
    report(capsys, f"depth {len(points)} points x 6 cameras: {milliseconds:.4f} ms")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("size", [(256, 704), (128, 256), (3, 5)], ids=["r50", "tiny", "3x5"])
def test_depth_is_bit_identical_with_collisions_and_odd_points(frame, seed, size):
    height, width = size
    calibration = frame.calibration
    augmentation = calibration.img_aug_matrix.copy()
    augmentation[:, :2] *= width / R50.image.output_width        # shrink the image plane to the size
    points = hard_points(frame, seed)
    with np.errstate(invalid="ignore"):                           # inf * 0 in the odd points
        expected = depth_map(points, calibration.lidar2image, augmentation, height, width)
        _, column, row = project_points(points, calibration.lidar2image, augmentation)
    inside = (column >= 0) & (column < width) & (row >= 0) & (row < height)
    assert inside.sum() > (expected > 0).sum() > 0                # collisions happen
    gpu = depth_map(cupy.asarray(points), calibration.lidar2image, augmentation, height, width)
    assert_same_bits(gpu, expected)                               # with the matrices still NumPy


def test_depth_of_no_points_is_zero_and_buffers_are_checked(frame):
    calibration = frame.calibration
    matrices = (cupy.asarray(calibration.lidar2image), cupy.asarray(calibration.img_aug_matrix))
    out = cupy.full((6, 1, 4, 5), 7, cupy.float16)
    assert depth_map(cupy.zeros((0, 5), cupy.float32), *matrices, 4, 5, out=out) is out
    assert not out.any()
    with pytest.raises(ValueError, match="out must be a C-contiguous CuPy float16 array"):
        depth_map(cupy.zeros((1, 3), cupy.float32), *matrices, 4, 5, out=cupy.empty((6, 4, 5), cupy.float16))
    with pytest.raises(ValueError, match=r"points must be \[P, >=3\]"):
        depth_map(cupy.zeros((4, 2), cupy.float32), *matrices, 4, 5)


# ---------------------------------------------------------------- geometry upload and bevpool

def pool_inputs(geometry, channels: int, seed: int, dtype, signed: bool = True):
    """Random NHWC features and per-pixel softmax depth weights for ``geometry``."""
    rng = np.random.default_rng(seed)
    cameras, depth_bins, height, width = geometry.frustum_shape
    features = rng.standard_normal((cameras, height, width, channels))
    logits = rng.standard_normal((cameras, depth_bins, height, width)) * 3
    weights = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return (features if signed else np.abs(features)).astype(dtype), weights.astype(dtype)


def assert_pool_close(gpu, features, weights, geometry) -> None:
    """GPU BEV equals NumPy's within POOL_RTOL * sum |F W| per cell; empty cells exactly 0."""
    assert isinstance(gpu, cupy.ndarray) and gpu.dtype == np.float32
    expected = bev_pool(features, weights, geometry)
    magnitude = bev_pool(np.abs(features), np.abs(weights), geometry)
    result = gpu.get()
    assert result.shape == expected.shape
    assert np.all(np.abs(result - expected) <= POOL_RTOL * magnitude)
    occupied = np.zeros(geometry.bev_size[0] * geometry.bev_size[1], bool)
    occupied[geometry.intervals[:, 2]] = True
    assert not result.reshape(result.shape[1], -1)[:, ~occupied].any()


def is_channels_last(array) -> bool:
    """``array`` [1, C, X, Y] is a view of a C-contiguous [1, X, Y, C] (nhwc.transpose(0, 3, 1, 2))."""
    return array.ndim == 4 and array.transpose(0, 2, 3, 1).flags.c_contiguous


def poisoned_out(shape, dtype, channels_last: bool, offset: int = 0):
    """NaN-filled CuPy out ``[1, C, X, Y]``, C-contiguous or channels-last, ``offset`` elements into
    its allocation (offset 1 breaks the 16-byte alignment: the kernel's scalar store path)."""
    _, channels, nx, ny = shape
    inner = (1, nx, ny, channels) if channels_last else tuple(shape)
    flat = cupy.full(offset + int(np.prod(inner)), np.nan, dtype=dtype)
    buffer = flat[offset:].reshape(inner)
    out = buffer.transpose(0, 3, 1, 2) if channels_last else buffer
    assert out.shape == tuple(shape) and (out.data.ptr % 16 == 0) == (offset == 0)
    return out


def misaligned(array):
    """C-contiguous CuPy copy of ``array`` 2+ bytes off a 16-byte boundary (the scalar load path)."""
    flat = cupy.empty(array.size + 1, dtype=array.dtype)
    flat[1:] = cupy.asarray(array).ravel()
    copy = flat[1:].reshape(array.shape)
    assert copy.flags.c_contiguous and copy.data.ptr % 16 != 0
    return copy


def assert_every_out(feature_gpu, weight_gpu, device, reference: np.ndarray) -> None:
    """bev_pool into NaN-poisoned float32/float16 outs, C-contiguous and channels-last, aligned or
    not, returns ``out`` with every element written: float32 equal to ``reference`` (the default
    result) bit for bit, float16 its round to nearest even."""
    for dtype in (np.float32, np.float16):
        expected = reference.astype(dtype)
        for channels_last in (False, True):
            for offset in (0, 1):
                out = poisoned_out(reference.shape, dtype, channels_last, offset)
                assert bev_pool(feature_gpu, weight_gpu, device, out=out) is out
                assert_same_bits(out, expected)


def assert_tables_match(geometry, tables) -> None:
    """The kernel tables: int32 (feature row, point id) per sorted point; every cell once, intervals
    longest first with their (start, end), empty cells as (0, 0)."""
    points, slots = tables.points.get(), tables.slots.get()
    assert points.dtype == np.int32 and points.shape == (geometry.keep_count, 2)
    assert np.array_equal(points[:, 0], feature_rows(geometry.indices, geometry.frustum_shape))
    assert np.array_equal(points[:, 1], geometry.indices)
    cells = geometry.bev_size[0] * geometry.bev_size[1]
    assert slots.dtype == np.int32 and slots.shape == (cells, 3) and slots.flags.c_contiguous
    assert np.array_equal(np.sort(slots[:, 2]), np.arange(cells))
    count = len(geometry.intervals)
    lengths = slots[:count, 1] - slots[:count, 0]
    assert np.all(np.diff(lengths) <= 0)
    by_cell = geometry.intervals[np.argsort(geometry.intervals[:, 2])]
    assert np.array_equal(slots[:count][np.argsort(slots[:count, 2])], by_cell)
    assert not slots[count:, :2].any()


def test_to_device_uploads_the_arrays_once(frame):
    geometry = compute_geometry(frame.calibration, TINY.pipeline)
    device = geometry.to_device()
    assert isinstance(device.indices, cupy.ndarray) and isinstance(device.intervals, cupy.ndarray)
    assert device.indices.dtype == np.int64 and device.intervals.dtype == np.int32
    assert np.array_equal(device.indices.get(), geometry.indices)
    assert np.array_equal(device.intervals.get(), geometry.intervals)
    assert (device.keep_count, device.bev_size, device.frustum_shape) == \
        (geometry.keep_count, geometry.bev_size, geometry.frustum_shape)
    assert geometry.pool_tables is None                                 # the host copy has none
    assert isinstance(device.pool_tables.points, cupy.ndarray)
    assert_tables_match(geometry, device.pool_tables)
    again = device.to_device()                                          # no second upload
    assert again.indices.data.ptr == device.indices.data.ptr
    assert again.intervals.data.ptr == device.intervals.data.ptr
    assert again.pool_tables is device.pool_tables                      # nor a second table build
    assert isinstance(geometry.indices, np.ndarray)                     # the host copy is untouched


@pytest.mark.parametrize("last_interval", ["exclusive", "cuda"])
@pytest.mark.parametrize("channels", [1, 13, 16, 20])     # 16: fp16 16-byte loads and stores
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_bev_pool_matches_numpy_on_the_tiny_geometry(frame, last_interval, channels, dtype):
    geometry = compute_geometry(frame.calibration, TINY.pipeline, last_interval=last_interval)
    device = geometry.to_device()
    for seed in range(2):
        features, weights = pool_inputs(geometry, channels, seed, dtype)
        feature_gpu, weight_gpu = cupy.asarray(features), cupy.asarray(weights)
        bev = bev_pool(feature_gpu, weight_gpu, device)
        assert bev.shape == (1, channels, *geometry.bev_size) and is_channels_last(bev)
        assert_pool_close(bev, features, weights, geometry)
        reference = bev.get()
        assert_every_out(feature_gpu, weight_gpu, device, reference)
        assert_same_bits(bev_pool(misaligned(features), weight_gpu, device), reference)   # scalar loads
    assert_same_bits(bev_pool(features, weights, device), reference)                    # host inputs


def test_bev_pool_builds_missing_or_stale_tables(frame):
    exclusive = compute_geometry(frame.calibration, TINY.pipeline).to_device()
    cuda_end = compute_geometry(frame.calibration, TINY.pipeline, last_interval="cuda").to_device()
    features, weights = (cupy.asarray(a) for a in pool_inputs(exclusive, 16, seed=4, dtype=np.float16))
    expected = bev_pool(features, weights, exclusive).get()
    without = dataclasses.replace(exclusive, pool_tables=None)
    assert_same_bits(bev_pool(features, weights, without), expected)
    stale = dataclasses.replace(exclusive, intervals=cuda_end.intervals)    # tables of other intervals
    assert_same_bits(bev_pool(features, weights, stale), bev_pool(features, weights, cuda_end).get())


def test_bev_pool_matches_numpy_on_the_example_geometry(r50_geometry, capsys):
    device = r50_geometry.to_device()
    assert_tables_match(r50_geometry, device.pool_tables)
    channels = R50.camera_geometry.camera_channels
    features, weights = pool_inputs(r50_geometry, channels, seed=3, dtype=np.float16)
    feature_gpu, weight_gpu = cupy.asarray(features), cupy.asarray(weights)
    bev = bev_pool(feature_gpu, weight_gpu, device)                     # fp16 16-byte loads and stores
    assert bev.shape == (1, 80, 360, 360) and is_channels_last(bev)
    assert_pool_close(bev, features, weights, r50_geometry)
    reference = bev.get()
    assert_every_out(feature_gpu, weight_gpu, device, reference)
    # float32 features hold the same values: the generic load path sums the same terms in the same order
    assert_same_bits(bev_pool(feature_gpu.astype(cupy.float32), weight_gpu, device), reference)
    assert_same_bits(bev_pool(misaligned(features), weight_gpu, device), reference)
    half_last = poisoned_out(bev.shape, np.float16, channels_last=True)
    half = poisoned_out(bev.shape, np.float16, channels_last=False)
    single = poisoned_out(bev.shape, np.float32, channels_last=False)
    timings = {
        "float32 channels-last (default)": median_ms(lambda: bev_pool(feature_gpu, weight_gpu, device)),
        "fp16 channels-last out": median_ms(lambda: bev_pool(feature_gpu, weight_gpu, device, out=half_last)),
        "fp16 C-contiguous out": median_ms(lambda: bev_pool(feature_gpu, weight_gpu, device, out=half)),
        "float32 C-contiguous out": median_ms(lambda: bev_pool(feature_gpu, weight_gpu, device, out=single)),
    }
    report(capsys, f"bevpool fp16 [6,32,88,80] x [6,118,32,88] -> [1,80,360,360] "
                   f"({r50_geometry.keep_count} points, {len(r50_geometry.intervals)} intervals): "
                   + "; ".join(f"{name}: {ms:.4f} ms" for name, ms in timings.items()))


def test_bev_pool_requires_the_geometry_on_the_device(frame):
    geometry = compute_geometry(frame.calibration, TINY.pipeline)
    features, weights = (cupy.asarray(a) for a in pool_inputs(geometry, 4, seed=0, dtype=np.float32))
    with pytest.raises(ValueError, match="geometry.to_device"):
        bev_pool(features, weights, geometry)
    with pytest.raises(ValueError, match="out must be float32 or float16"):
        bev_pool(features, weights, geometry.to_device(), out=cupy.empty((1, 4, 72, 72), cupy.float64))
    with pytest.raises(ValueError, match="depth_weights must be"):
        bev_pool(features, weights[:, 1:], geometry.to_device())


@pytest.mark.parametrize("make_out", [
    lambda: cupy.empty((1, 4, 72, 71), cupy.float32),
    lambda: cupy.empty((1, 4, 72, 144), cupy.float32)[..., ::2],          # neither layout
    lambda: cupy.empty((1, 72, 4, 72), cupy.float32).transpose(0, 2, 1, 3),
    lambda: np.empty((1, 4, 72, 72), np.float32),
], ids=["shape", "strided", "other-layout", "numpy"])
def test_bev_pool_rejects_other_outs(frame, make_out):
    device = compute_geometry(frame.calibration, TINY.pipeline).to_device()
    features, weights = (cupy.asarray(a) for a in pool_inputs(device, 4, seed=0, dtype=np.float16))
    with pytest.raises(ValueError, match=r"out must be a CuPy float32/float16 array of shape \[1, 4, 72, 72\]"):
        bev_pool(features, weights, device, out=make_out())
