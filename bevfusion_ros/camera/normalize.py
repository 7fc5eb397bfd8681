"""Camera images -> network input: fixed-point bilinear resize, crop, mean/std (spec 1.2).

Per output pixel (ox, oy) the source position is ``src = (o + crop + 0.5) * step - 0.5`` in
float32 with ``step = 1.0f / float32(resize_scale)`` (a float32 division, as CUDA's kernel); the
two neighbours ``floor(src)`` and ``floor(src) + 1`` are clamped to the image and blended with 11-bit weights
``l = rint(frac * 2048)``, ``h = 2048 - l`` in integer arithmetic (OpenCV's uint8
INTER_LINEAR scheme, total scale 2**22)::

    top    = (hx * p00 + lx * p01) >> 4
    bottom = (hx * p10 + lx * p11) >> 4
    out    = (((hy * top) >> 16) + ((ly * bottom) >> 16) + 2) >> 2

which is again a grey level 0..255. The level is normalised per channel as
``(level * float32(1/255) - mean) / std`` in float32 and stored as fp16.

Everything that depends only on the :class:`ImageConfig` (tap indices, weights, the 256-entry
normalisation table) is computed once by :func:`normalize_tables`; a frame then costs four
row/column gathers, a few integer operations and a table look-up.

Raw images of distorted cameras are undistorted on the way (``remap=``): the undistorted pixels
the taps read are sampled from the raw image first (:mod:`bevfusion_ros.camera.undistort`).

Known difference to CUDA-BEVFusion: its kernel uses ``step = 1.0f / 0.48f`` (float32
division, 2.0833335) where the reference and this module use ``float32(1 / 0.48)``
(2.0833333); a handful of source positions move by one fixed-point weight step.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from bevfusion_ros.config import ImageConfig
from bevfusion_ros.runtime.array_module import is_cupy

WEIGHT_BITS = 11
WEIGHT_SCALE = 1 << WEIGHT_BITS          # 2048: the weights of one axis sum to this
GREY_LEVELS = 256


@dataclass(frozen=True)
class AxisTaps:
    """Bilinear taps of one output axis, four ``[count]`` arrays.

    ``low``/``high`` are the int64 source indices of the two neighbours (clamped to the
    image); ``weight_low``/``weight_high`` are their int32 11-bit weights (sum 2048).
    """

    low: np.ndarray
    high: np.ndarray
    weight_low: np.ndarray
    weight_high: np.ndarray


@dataclass(frozen=True)
class NormalizeTables:
    """Per-:class:`ImageConfig` constants of :func:`normalize_images` (read-only arrays).

    rows:    taps along y, ``[oh]``;
    columns: taps along x into a flattened ``[W * 3]`` RGB row, ``[ow * 3]`` (each x tap
             repeated for R, G, B) so that a row blend is one long contiguous operation;
    levels:  float16 ``[3, 256]``: the normalised value of each grey level per channel.
    """

    rows: AxisTaps
    columns: AxisTaps
    levels: np.ndarray


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def axis_taps(count: int, crop: int, size: int, step: np.float32) -> AxisTaps:
    """Taps of ``count`` output pixels starting ``crop`` resized pixels into a ``size`` axis."""
    position = (np.arange(count, dtype=np.float32) + np.float32(crop) + np.float32(0.5)) * step \
        - np.float32(0.5)
    low = np.floor(position)
    weight_high = np.rint((position - low) * np.float32(WEIGHT_SCALE)).astype(np.int32)   # half to even
    low = low.astype(np.int64)
    return AxisTaps(low=np.clip(low, 0, size - 1), high=np.clip(low + 1, 0, size - 1),
                    weight_low=WEIGHT_SCALE - weight_high, weight_high=weight_high)


def interleaved(taps: AxisTaps, channels: int) -> AxisTaps:
    """Taps into a channel-interleaved axis ``[size * channels]``: index ``i`` -> ``i * channels + c``."""
    channel = np.arange(channels)
    return AxisTaps(low=(taps.low[:, None] * channels + channel).ravel(),
                    high=(taps.high[:, None] * channels + channel).ravel(),
                    weight_low=np.repeat(taps.weight_low, channels),
                    weight_high=np.repeat(taps.weight_high, channels))


def _read_only_taps(taps: AxisTaps) -> AxisTaps:
    arrays = (taps.low, taps.high, taps.weight_low, taps.weight_high)
    return AxisTaps(*(_read_only(array) for array in arrays))


def normalized_levels(image: ImageConfig) -> np.ndarray:
    """float16 ``[3, 256]``: ``(level * float32(1/255) - mean_c) / std_c`` in float32."""
    levels = np.arange(GREY_LEVELS, dtype=np.float32) * np.float32(1.0 / 255.0)
    mean = np.asarray(image.mean, dtype=np.float32)[:, None]
    std = np.asarray(image.std, dtype=np.float32)[:, None]
    return ((levels[None, :] - mean) / std).astype(np.float16)


@lru_cache(maxsize=8)
def normalize_tables(image: ImageConfig) -> NormalizeTables:
    """Tap indices, weights and the level table of ``image`` (cached per config)."""
    crop_x, crop_y = image.crop
    step = np.float32(1.0) / np.float32(image.resize_scale)      # CUDA: 1.0f / resize_lim
    return NormalizeTables(
        rows=_read_only_taps(axis_taps(image.output_height, crop_y, image.input_height, step)),
        columns=_read_only_taps(
            interleaved(axis_taps(image.output_width, crop_x, image.input_width, step), channels=3)),
        levels=_read_only(normalized_levels(image)),
    )


def check_images(images: Sequence[Any], image: ImageConfig, num_cameras: int | None,
                 array_type: type[Any] | tuple[type[Any], ...] = np.ndarray) -> None:
    """Raise ``ValueError`` naming the camera unless ``images`` are ``num_cameras`` uint8
    ``array_type`` ``[H, W, 3]`` images of the configured input size (``array_type`` may be a
    tuple of types, e.g. NumPy and CuPy arrays mixed)."""
    if len(images) == 0 or (num_cameras is not None and len(images) != num_cameras):
        expected = "at least one" if num_cameras is None else str(num_cameras)
        raise ValueError(f"expected {expected} camera image(s), got {len(images)}")
    expected_shape = (image.input_height, image.input_width, 3)
    types = array_type if isinstance(array_type, tuple) else (array_type,)
    library = " or ".join(kind.__module__.split(".")[0] for kind in types)
    for index, rgb in enumerate(images):
        if not isinstance(rgb, types) or rgb.dtype != np.uint8:
            module = type(rgb).__module__.split(".")[0]
            got = "" if isinstance(rgb, types) else \
                f"{'' if module == 'builtins' else module + '.'}{type(rgb).__name__} "
            raise ValueError(f"camera {index}: expected a uint8 {library} image, got "
                             f"{got}{getattr(rgb, 'dtype', '')}".rstrip())
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"camera {index}: expected an [H, W, 3] RGB image, got shape {list(rgb.shape)}")
        if rgb.shape != expected_shape:
            raise ValueError(f"camera {index}: expected size {image.input_width}x{image.input_height} "
                             f"(W x H), got {rgb.shape[1]}x{rgb.shape[0]}")


def _blend_columns(rows: np.ndarray, columns: AxisTaps) -> np.ndarray:
    """uint8 RGB rows ``[oh, W * 3]`` -> int32 ``[oh, ow * 3]`` horizontal blend (scale 2**7)."""
    return (columns.weight_low * rows[:, columns.low] + columns.weight_high * rows[:, columns.high]) >> 4


def resize_crop(rgb: np.ndarray, tables: NormalizeTables) -> np.ndarray:
    """One uint8 ``[H, W, 3]`` image -> int32 grey levels ``[oh, ow, 3]`` (resize + crop)."""
    flat = rgb.reshape(rgb.shape[0], -1)
    top = _blend_columns(flat[tables.rows.low], tables.columns)
    bottom = _blend_columns(flat[tables.rows.high], tables.columns)
    weight_low, weight_high = tables.rows.weight_low[:, None], tables.rows.weight_high[:, None]
    grey = (((weight_low * top) >> 16) + ((weight_high * bottom) >> 16) + 2) >> 2
    return grey.reshape(len(tables.rows.low), -1, 3)


def check_remap(remap: Any, count: int, image: ImageConfig) -> None:
    """Raise ``ValueError`` unless ``remap`` (a :class:`~bevfusion_ros.camera.undistort.RemapTables`
    or None) has one entry per image and tables of the input size."""
    if remap is None:
        return
    if len(remap.map_index) != count:
        raise ValueError(f"the remap tables are for {len(remap.map_index)} cameras, got {count} images")
    if tuple(remap.maps.shape[1:]) != (image.input_height, image.input_width, 2):
        raise ValueError(f"the remap tables are [M, H, W, 2] = {list(remap.maps.shape)}, the input "
                         f"size is {image.input_width}x{image.input_height} (W x H)")


def normalize_images(images: Sequence[np.ndarray], image: ImageConfig,
                     num_cameras: int | None = None, out: Any = None, remap: Any = None) -> np.ndarray:
    """uint8 RGB images ``[H, W, 3]`` (one per camera) -> float16 ``[N, 3, oh, ow]`` planar RGB.

    ``num_cameras``, when given, is the required number of images. Raises ``ValueError``
    naming the camera for a wrong count, size, dtype or channel count. CuPy images (a
    ``[N, H, W, 3]`` array or a list) run on the GPU and give a CuPy result, written into
    ``out`` when given (a CuPy float16 ``[N, 3, oh, ow]``; CuPy only). ``remap``: the
    :class:`~bevfusion_ros.camera.undistort.RemapTables` of distorted cameras (CuPy tables for
    CuPy images), whose raw images are undistorted on the way (:mod:`~bevfusion_ros.camera.undistort`).
    """
    if is_cupy(images) or any(is_cupy(rgb) for rgb in images):
        from bevfusion_ros.camera.normalize_cuda import normalize_images_cuda
        return normalize_images_cuda(images, image, num_cameras, out, remap)
    if out is not None:
        raise ValueError("out= is supported for CuPy images only")
    check_images(images, image, num_cameras)
    check_remap(remap, len(images), image)
    if remap is not None and is_cupy(remap.maps):
        raise ValueError("CuPy (device) remap tables need CuPy images; pass NumPy tables")
    tables = normalize_tables(image)
    output = np.empty((len(images), 3, image.output_height, image.output_width), dtype=np.float16)
    for index, rgb in enumerate(images):
        source = None if remap is None else remap.camera_map(index)
        if source is not None:
            from bevfusion_ros.camera.undistort import undistorted_taps
            rgb = undistorted_taps(rgb, source, image)
        grey = resize_crop(rgb, tables)
        for channel in range(3):
            np.take(tables.levels[channel], grey[..., channel], out=output[index, channel])
    return output
