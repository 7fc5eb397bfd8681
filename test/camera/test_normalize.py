"""normalize_images against a loop formula, OpenCV and the PyTorch reference (spec 1.2)."""
from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest

from bevfusion_ros.camera.normalize import normalize_images, normalize_tables
from bevfusion_ros.config import ImageConfig
from bevfusion_ros.io.frame import load_example_data
from bevfusion_ros.model.presets import NUSCENES_R50, TINY

# Small configs whose taps leave the image, so the clamping is exercised:
# downscale by 2 (last tap beyond the right/bottom edge) and upscale by 2 (first tap at -1).
DOWNSCALE = ImageConfig(input_width=40, input_height=30, output_width=20, output_height=15, resize_scale=0.5)
UPSCALE = ImageConfig(input_width=10, input_height=8, output_width=20, output_height=16, resize_scale=2.0)
# The tiny network input from a rig's 1280x720 cameras (ImageConfig.for_input_size: resize 0.2).
TINY_720P = replace(TINY, name="tiny-1280x720",
                    pipeline=replace(TINY.pipeline, image=TINY.pipeline.image.for_input_size(1280, 720)))


def random_images(image: ImageConfig, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (image.input_height, image.input_width, 3), dtype=np.uint8)
            for _ in range(count)]


def source_taps(output: int, crop: int, size: int, scale: float) -> tuple[int, int, int, int]:
    """(low, high, weight_low, weight_high) of one output pixel: float32 position, 11-bit weights."""
    step = np.float32(1.0) / np.float32(scale)          # CUDA: 1.0f / resize_lim
    position = np.float32(np.float32(output + crop + 0.5) * step) - np.float32(0.5)
    low = math.floor(position)
    weight = int(np.rint(np.float32(position - np.float32(low)) * np.float32(2048)))
    return min(max(low, 0), size - 1), min(max(low + 1, 0), size - 1), 2048 - weight, weight


def expected_value(rgb: np.ndarray, ox: int, oy: int, channel: int, image: ImageConfig) -> float:
    """Fixed-point bilinear level (shifts as floor divisions) normalised in float64."""
    crop_x, crop_y = image.crop
    x0, x1, hx, lx = source_taps(ox, crop_x, image.input_width, image.resize_scale)
    y0, y1, hy, ly = source_taps(oy, crop_y, image.input_height, image.resize_scale)
    p = rgb[:, :, channel].astype(int)
    top = (hx * p[y0, x0] + lx * p[y0, x1]) // 16
    bottom = (hx * p[y1, x0] + lx * p[y1, x1]) // 16
    level = (hy * top // 65536 + ly * bottom // 65536 + 2) // 4
    return (level / 255.0 - image.mean[channel]) / image.std[channel]


@pytest.mark.parametrize("image", [NUSCENES_R50.pipeline.image, TINY.pipeline.image, DOWNSCALE, UPSCALE],
                         ids=["r50", "tiny", "downscale", "upscale"])
def test_matches_loop_formula_on_a_random_region(image):
    rgb = random_images(image, 1, seed=0)[0]
    output = normalize_images([rgb], image)[0].astype(np.float64)
    rng = np.random.default_rng(1)
    height, width = min(image.output_height, 10), min(image.output_width, 12)
    top = rng.integers(0, image.output_height - height + 1)
    left = rng.integers(0, image.output_width - width + 1)
    rows = list(range(top, top + height)) + [image.output_height - 1]      # plus the last row/column
    columns = list(range(left, left + width)) + [image.output_width - 1]
    expected = np.array([[[expected_value(rgb, x, y, c, image) for x in columns] for y in rows]
                         for c in range(3)])
    # fp16 storage: half an ulp is 2**-11 relative; one grey level is ~1.7e-2 absolute.
    np.testing.assert_allclose(output[:, rows][:, :, columns], expected, rtol=2.0 ** -11, atol=1e-6)


def grey_levels(normalized: np.ndarray, image: ImageConfig) -> np.ndarray:
    """fp16 ``[3, h, w]`` back to grey levels ``[h, w, 3]`` (within fp16 rounding of an integer)."""
    pixels = normalized.astype(np.float64).transpose(1, 2, 0) * np.array(image.std) * 255 \
        + np.array(image.mean) * 255
    assert np.abs(pixels - np.rint(pixels)).max() < 0.06
    return np.rint(pixels)


@pytest.mark.parametrize("preset", [NUSCENES_R50, TINY, TINY_720P], ids=lambda preset: preset.name)
def test_matches_opencv_resize_then_crop(preset):
    image = preset.pipeline.image
    images = random_images(image, 2, seed=2)
    crop_x, crop_y = image.crop
    for rgb, normalized in zip(images, normalize_images(images, image)):
        resized = cv2.resize(rgb, image.resized_size, interpolation=cv2.INTER_LINEAR)
        cropped = resized[crop_y:crop_y + image.output_height, crop_x:crop_x + image.output_width]
        difference = np.abs(grey_levels(normalized, image) - cropped)
        # OpenCV steps by the double 1600/768, CUDA by 1.0f/0.48f: ~2 % of noise pixels 1 level off.
        assert difference.max() <= 1 and (difference > 0).mean() < 0.03


@pytest.mark.parametrize("preset", [NUSCENES_R50, TINY, TINY_720P], ids=lambda preset: preset.name)
def test_equals_the_reference_bit_for_bit(preset):
    pytest.importorskip("torch")
    from bevfusion_ros.model.reference import normalize_images as reference_normalize
    images = random_images(preset.pipeline.image, 2, seed=3)
    ours = normalize_images(images, preset.pipeline.image, num_cameras=2)
    expected = reference_normalize(images, preset).numpy()
    assert ours.dtype == np.float16 and ours.shape == expected.shape
    assert np.array_equal(ours.view(np.uint16), expected.view(np.uint16))


def test_equals_the_reference_on_the_example_images(example_data_dir):
    pytest.importorskip("torch")
    from bevfusion_ros.model.reference import normalize_images as reference_normalize
    frame = load_example_data(example_data_dir)
    ours = normalize_images(frame.images, NUSCENES_R50.pipeline.image, num_cameras=6)
    expected = reference_normalize(frame.images, NUSCENES_R50).numpy()
    assert ours.shape == (6, 3, 256, 704)
    assert np.array_equal(ours.view(np.uint16), expected.view(np.uint16))


def test_tables_are_built_once_per_config_and_read_only():
    image = NUSCENES_R50.pipeline.image
    tables = normalize_tables(image)
    assert normalize_tables(ImageConfig()) is tables
    assert normalize_tables(TINY.pipeline.image) is not tables
    assert tables.rows.low.shape == (image.output_height,)
    assert tables.columns.low.shape == (3 * image.output_width,)
    with pytest.raises(ValueError):
        tables.levels[0, 0] = 0


@pytest.mark.parametrize("images, message", [
    (lambda ok: ok[:5], r"expected 6 camera image\(s\), got 5"),
    (lambda ok: [], "got 0"),
    (lambda ok: ok[:2] + [ok[2][:-1]] + ok[3:], "camera 2: expected size 1600x900"),
    (lambda ok: ok[:3] + [ok[3].astype(np.float32)] + ok[4:], "camera 3: expected a uint8"),
    (lambda ok: ok[:1] + [ok[1][..., :2]] + ok[2:], r"camera 1: expected an \[H, W, 3\] RGB image"),
    (lambda ok: ok[:5] + [ok[5][..., 0]], r"camera 5: expected an \[H, W, 3\] RGB image"),
], ids=["count", "empty", "size", "dtype", "channels", "grey"])
def test_rejects_wrong_images_naming_the_camera(images, message):
    image = NUSCENES_R50.pipeline.image
    good = [np.zeros((image.input_height, image.input_width, 3), np.uint8) for _ in range(6)]
    with pytest.raises(ValueError, match=message):
        normalize_images(images(good), image, num_cameras=6)
