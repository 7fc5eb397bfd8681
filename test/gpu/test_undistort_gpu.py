"""CuPy undistortion fused into normalization against the NumPy reference and OpenCV, and the GPU
pipeline on a distorted frame.

The fused kernel must equal the NumPy reference bit for bit (the same float32 operations, fused
multiply-adds included: ``__fmaf_rn``/``__fsub_rn`` in the kernel, exactly rounded ``fma32`` in
NumPy), and so ``cv2.remap`` + ``normalize_images`` as the CPU tests find it (bit for bit with
OpenCV 5, within ``OPENCV4_TOLERANCE_LEVELS`` with OpenCV 4's fixed-point remap). ``out``
buffers are NaN-poisoned first, so every element must be written. The GPU pipeline (fp32) must
give the CPU pipeline's boxes on a distorted frame (FP32_ATOL, as test_pipeline_gpu.py) and its
undistorted twin's within the twin tolerance (:mod:`twin_boxes`); the raw rows it stages must
be all the fused kernel reads. Timings (CUDA events, median of 50 after warm-up) are printed, never asserted.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from gpu_timing import median_ms, report
from twin_boxes import MODEL, assert_twin_boxes, scene_twins

from bevfusion_ros.camera.normalize import normalize_images
from bevfusion_ros.camera.undistort import OPENCV4_TOLERANCE_LEVELS, RemapTables, remap_tables
from bevfusion_ros.config import ImageConfig
from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.distortion import Distortion
from bevfusion_ros.io.frame import Frame
from bevfusion_ros.model.presets import NUSCENES_R50, TINY
from bevfusion_ros.pipeline import BEVFusionPipeline
from bevfusion_ros.tools.parity import match_boxes

cupy = pytest.importorskip("cupy")

R50 = NUSCENES_R50.pipeline
PLUMB_BOB = Distortion("plumb_bob", (-0.3, 0.1, 0.001, -0.002, 0.0))
RATIONAL = Distortion("rational_polynomial", (0.2, -0.05, 0.001, 0.001, 0.01, 0.5, -0.02, 0.03))
EQUIDISTANT = Distortion("equidistant", (0.05, -0.02, 0.01, -0.002))
EXAMPLE_LENSES = (PLUMB_BOB, None, RATIONAL, None, EQUIDISTANT, PLUMB_BOB)
# Small configs whose taps leave the image (clamping): downscale by 2 and upscale by 2.
DOWNSCALE = ImageConfig(input_width=40, input_height=30, output_width=20, output_height=15, resize_scale=0.5)
UPSCALE = ImageConfig(input_width=10, input_height=8, output_width=20, output_height=16, resize_scale=2.0)
REMAP_TOLERANCE = 0 if int(cv2.__version__.split(".")[0]) >= 5 else OPENCV4_TOLERANCE_LEVELS
FP32_ATOL = 5e-3                 # GPU fp32 vs CPU boxes, as test_pipeline_gpu.py
FP32_PAIRED = 0.8


def assert_same_bits(gpu, expected: np.ndarray) -> None:
    assert isinstance(gpu, cupy.ndarray) and gpu.dtype == expected.dtype and gpu.shape == expected.shape
    assert np.array_equal(gpu.get().view(np.uint16), expected.view(np.uint16))


def example_tables(frame, image: ImageConfig) -> RemapTables:
    calibration = frame.calibration
    rig = Calibration.from_camera2lidar(calibration.camera_intrinsics[:, :3, :3], calibration.camera2lidar, image,
                                        calibration.camera_names, EXAMPLE_LENSES)
    return remap_tables(rig, image)


def remap_then_normalize(images, tables: RemapTables, image: ImageConfig) -> np.ndarray:
    """The definition: ``cv2.remap`` of each distorted camera's raw image, then normalization."""
    undistorted = []
    for index, rgb in enumerate(images):
        source = tables.camera_map(index)
        undistorted.append(rgb if source is None else cv2.remap(
            rgb, np.ascontiguousarray(source[..., 0]), np.ascontiguousarray(source[..., 1]), cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT, borderValue=0))
    return normalize_images(undistorted, image)


# ---------------------------------------------------------------- the fused kernel

@pytest.mark.parametrize("image", [R50.image, TINY.pipeline.image], ids=["r50", "tiny"])
def test_fused_kernel_is_bit_identical_on_the_example_rig(frame, image, capsys):
    tables = example_tables(frame, image)
    expected = normalize_images(frame.images, image, num_cameras=6, remap=tables)
    device_tables = tables.to_device()
    images = cupy.asarray(np.stack(frame.images))
    assert_same_bits(normalize_images(images, image, num_cameras=6, remap=device_tables), expected)
    assert_same_bits(normalize_images(images, image, remap=tables), expected)     # NumPy tables: uploaded
    assert_same_bits(normalize_images([cupy.asarray(rgb) for rgb in frame.images], image, remap=device_tables),
                     expected)
    out = cupy.full(expected.shape, np.nan, dtype=cupy.float16)
    assert normalize_images(images, image, out=out, remap=device_tables) is out
    assert_same_bits(out, expected)
    plain_ms = median_ms(lambda: normalize_images(images, image, out=out))
    fused_ms = median_ms(lambda: normalize_images(images, image, out=out, remap=device_tables))
    report(capsys, f"normalize 6 x 1600x900 -> {image.output_width}x{image.output_height} fp16: plain "
                   f"{plain_ms:.4f} ms, undistorting 4 of 6 cameras {fused_ms:.4f} ms")


@pytest.mark.parametrize("image", [R50.image, TINY.pipeline.image], ids=["r50", "tiny"])
def test_fused_kernel_is_remap_then_normalize(frame, image):
    tables = example_tables(frame, image)
    got = normalize_images(cupy.asarray(np.stack(frame.images)), image, remap=tables.to_device()).get()
    expected = remap_then_normalize(frame.images, tables, image)
    if REMAP_TOLERANCE == 0:
        assert np.array_equal(got.view(np.uint16), expected.view(np.uint16))
    else:        # a shifted input level shifts a blended level by at most as much (+1 rounding)
        scale = np.array(image.std)[None, :, None, None] * 255
        assert (np.abs(got.astype(np.float64) - expected) * scale).max() <= REMAP_TOLERANCE + 1.2


@pytest.mark.parametrize("image", [DOWNSCALE, UPSCALE, TINY.pipeline.image], ids=["downscale", "upscale", "tiny"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_kernel_with_random_tables_across_the_border(image, seed):
    rng = np.random.default_rng(seed)
    height, width = image.input_height, image.input_width
    images = rng.integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    positions = [np.stack([rng.uniform(-3, width + 2, (height, width)), rng.uniform(-3, height + 2, (height, width))],
                          -1).astype(np.float32) for _ in range(2)]
    positions[1][::3, ::2] = np.round(positions[1][::3, ::2])             # on the pixel grid
    tables = RemapTables(np.array([1, -1, 0], np.int32), np.stack(positions), slice(0, height), ())
    expected = normalize_images(list(images), image, remap=tables)
    assert_same_bits(normalize_images(cupy.asarray(images), image, remap=tables.to_device()), expected)


def test_fused_kernel_refuses_mismatched_tables():
    image = DOWNSCALE
    images = cupy.zeros((3, 30, 40, 3), dtype=cupy.uint8)
    tables = RemapTables(np.array([0, -1], np.int32), np.zeros((1, 30, 40, 2), np.float32), slice(0, 30), ())
    with pytest.raises(ValueError, match="remap tables are for 2 cameras, got 3 images"):
        normalize_images(images, image, remap=tables.to_device())
    wrong_type = RemapTables(cupy.array([0, -1, 0], cupy.int64), cupy.zeros((1, 30, 40, 2), cupy.float32),
                             slice(0, 30), ())
    with pytest.raises(ValueError, match="float32 maps and int32 indices"):
        normalize_images(images, image, remap=wrong_type)


# ---------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def twins() -> tuple[Frame, Frame]:
    from bevfusion_ros.config import load_config
    return scene_twins(load_config(MODEL / "bevfusion.yaml").image)


@pytest.fixture(scope="module")
def gpu_pipeline() -> BEVFusionPipeline:
    pipeline = BEVFusionPipeline.from_model_dir(MODEL, backend="gpu", precision="fp32")
    assert pipeline.device == "cuda"
    return pipeline


def test_gpu_pipeline_undistorts_as_the_cpu_pipeline(gpu_pipeline, twins):
    frame, distorted = twins
    cpu = BEVFusionPipeline.from_model_dir(MODEL, backend="cpu").forward(distorted).boxes
    gpu = gpu_pipeline.forward(distorted).boxes
    assert gpu_pipeline.remap_tables is not None and isinstance(gpu_pipeline.remap_tables.maps, cupy.ndarray)
    match = match_boxes(gpu, cpu)
    assert match.fraction_within(1e-3) >= FP32_PAIRED and match.max_difference(gpu, cpu, within=1e-3) <= FP32_ATOL
    assert_twin_boxes(gpu, gpu_pipeline.forward(frame).boxes)


def test_gpu_pipeline_stages_the_raw_rows_the_undistortion_reads(gpu_pipeline, twins):
    """The uploader copies only ``source_rows`` of each raw image: rows outside it (inverted here)
    are never on the device, rows inside are all that the fused kernel needs (a band too narrow
    would leave rows of uninitialised device memory in the result)."""
    _, distorted = twins
    gpu_pipeline.update(distorted.calibration)
    tables, image = gpu_pipeline.remap_tables, gpu_pipeline.config.image
    band = tables.source_rows
    assert gpu_pipeline._uploader.row_band == band
    poisoned = []
    for rgb in distorted.images:
        copy = rgb.copy()
        copy[:band.start], copy[band.stop:] = 255 - copy[:band.start], 255 - copy[band.stop:]
        poisoned.append(copy)
    uploaded = gpu_pipeline._uploader.images(poisoned, cupy.cuda.get_current_stream())
    expected = normalize_images(distorted.images, image, 6, remap=remap_tables(distorted.calibration, image))
    assert_same_bits(normalize_images(uploaded, image, 6, remap=tables), expected)
