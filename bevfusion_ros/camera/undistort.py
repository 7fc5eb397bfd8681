"""Lens undistortion fused into normalization: remap tables built once per calibration.

What it computes, for a camera with a :class:`~bevfusion_ros.io.distortion.Distortion`:

1. The **remap table** of the camera: for each pixel (u, v) of the *undistorted* image (the
   input size ``W x H``, camera matrix K: the new camera matrix is K itself, so the calibration's
   K and projections stay valid), the position (x, y) in the *distorted* (raw) image that it
   comes from: ``cv2.initUndistortRectifyMap(K, D, None, K, (W, H), CV_32FC1)``, or
   ``cv2.fisheye.initUndistortRectifyMap`` for ``equidistant`` (:func:`undistortion_map`).
   Non-finite entries become (-2, -2) and positions are clamped to [-2, W + 1] x [-2, H + 1]:
   beyond the one-pixel border no tap is inside the image, so either way they sample 0.
2. The **undistorted pixel** U(u, v) samples the raw image bilinearly at (x, y)
   (:func:`sample_bilinear`): ``x0 = floor(x)``, ``ax = x - x0`` (float32; likewise y), the four
   neighbours (taps outside the image count as 0, as ``cv2.remap``'s ``BORDER_CONSTANT`` with 0),
   and per channel in float32 with fused multiply-adds (one rounding each)::

       top    = fma(ax, p01 - p00, p00)
       bottom = fma(ax, p11 - p10, p10)
       level  = saturate(rint(fma(ay, bottom - top, top)))        # rint: half to even

   This is OpenCV 5's ``cv2.remap(raw, map_x, map_y, INTER_LINEAR, BORDER_CONSTANT, 0)`` for
   uint8 images, which the tests find identical. OpenCV 4's remap is fixed point instead
   (positions rounded to 1/32 pixel, 15-bit weights): against it a level may differ by up to
   ``1 + (|gx| + |gy|) / 64`` for local gradients gx, gy in levels per pixel (the position
   error is at most 1/64 pixel per axis), i.e. by 1 on smooth images and by at most
   :data:`OPENCV4_TOLERANCE_LEVELS` on any uint8 image.
3. **Normalization** is then exactly :func:`~bevfusion_ros.camera.normalize.normalize_images`
   of the undistorted image: the same fixed-point resize + crop + mean/std. Fused, the
   undistorted pixels are computed only where normalization's taps read them (the rows and
   columns of :func:`~bevfusion_ros.camera.normalize.normalize_tables`), straight from the raw
   image; the result equals ``cv2.remap`` followed by ``normalize_images`` (within the OpenCV-4
   tolerance above, which only shifts input levels). The CuPy kernel does the same per output
   pixel (4 undistorted taps x 4 raw pixels) and is bit-identical to this NumPy reference.

Cameras without distortion (``map_index`` -1) are normalized as before, unchanged. A
:class:`RemapTables` depends only on each camera's K, distortion and the input size: a
calibration whose extrinsics alone change keeps its tables (:func:`remap_tables` ``previous=``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import cv2
import numpy as np

from bevfusion_ros.camera.normalize import normalize_tables
from bevfusion_ros.config import ImageConfig
from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.distortion import Distortion
from bevfusion_ros.io.frame import Frame

#: Outside position of a remap entry: its four taps are all outside any image (sampled as 0).
OUTSIDE = -2.0
#: Bound on |cv2.remap of OpenCV 4 (fixed point) - ours| in grey levels (see the module docstring).
OPENCV4_TOLERANCE_LEVELS = 9
MAP_CACHE_SIZE = 16


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``a * b + c`` with a single rounding, as CUDA's ``__fmaf_rn`` (arrays broadcast).

    The product of two float32 is exact in float64; the float64 sum is made *round to odd*
    (Knuth's TwoSum gives its exact error; an inexact even result moves one ulp towards the
    exact value), which a second rounding to float32 cannot spoil (53 >= 2 * 24 + 2 bits).
    """
    product = np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32)
    addend = np.asarray(c, np.float32).astype(np.float64)
    total = product + addend
    virtual = total - product
    error = (product - (total - virtual)) + (addend - virtual)
    move = (error != 0) & ((total.view(np.int64) & 1) == 0)
    if move.any():
        total[move] = np.nextafter(total[move], np.copysign(np.inf, error[move]))
    return total.astype(np.float32)


BORDER = 2      # zero pixels around the raw image: every tap of a clamped position lands inside


def _padded_pixels(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` ``[H, W, 3]`` in a zero frame of :data:`BORDER` pixels, flattened to ``[(H+4)(W+4), 3]``."""
    height, width = rgb.shape[:2]
    padded = np.zeros((height + 2 * BORDER, width + 2 * BORDER, 3), dtype=rgb.dtype)
    padded[BORDER:BORDER + height, BORDER:BORDER + width] = rgb
    return padded.reshape(-1, 3)


def sample_bilinear(rgb: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """uint8 ``rgb`` ``[H, W, 3]`` sampled at float32 positions ``x``, ``y`` (any shape S, finite):
    uint8 ``[*S, 3]``, the bilinear formula of the module docstring (0 outside the image).

    A top-left tap left of -1 or right of W - 1 (likewise in y) has no neighbour inside: it is
    clamped to -2 or W, which keeps all four taps in the zero frame of the padded image."""
    height, width = rgb.shape[:2]
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    x0, y0 = np.floor(x), np.floor(y)
    ax, ay = (x - x0)[..., None], (y - y0)[..., None]
    left = np.clip(x0, -BORDER, width).astype(np.int64) + BORDER
    upper = np.clip(y0, -BORDER, height).astype(np.int64) + BORDER
    stride = width + 2 * BORDER
    pixels = _padded_pixels(rgb)
    index = upper * stride + left
    p00, p01 = pixels[index].astype(np.float32), pixels[index + 1].astype(np.float32)
    p10, p11 = pixels[index + stride].astype(np.float32), pixels[index + stride + 1].astype(np.float32)
    top = fma32(ax, p01 - p00, p00)
    bottom = fma32(ax, p11 - p10, p10)
    level = fma32(ay, bottom - top, top)
    return np.clip(np.rint(level), 0, 255).astype(np.uint8)


def _opencv_map(intrinsics: np.ndarray, distortion: Distortion, size: tuple[int, int]) -> np.ndarray:
    """OpenCV's float32 (x, y) ``[H, W, 2]`` source positions, new camera matrix = K."""
    coefficients = np.asarray(distortion.coefficients, dtype=np.float64)
    if distortion.is_fisheye:
        map_x, map_y = cv2.fisheye.initUndistortRectifyMap(intrinsics, coefficients, np.eye(3), intrinsics,
                                                           size, cv2.CV_32FC1)
    else:
        map_x, map_y = cv2.initUndistortRectifyMap(intrinsics, coefficients, None, intrinsics, size,
                                                   cv2.CV_32FC1)
    return np.stack([map_x, map_y], axis=-1)


@lru_cache(maxsize=MAP_CACHE_SIZE)
def _cached_map(intrinsics: tuple[float, ...], distortion: Distortion, width: int, height: int) -> np.ndarray:
    source = _opencv_map(np.array(intrinsics, dtype=np.float64).reshape(3, 3), distortion, (width, height))
    finite = np.isfinite(source).all(axis=-1, keepdims=True)
    source = np.clip(source, OUTSIDE, np.array([width + 1, height + 1], np.float32))
    source = np.where(finite, source, np.float32(OUTSIDE)).astype(np.float32)
    source.flags.writeable = False
    return source


def undistortion_map(intrinsics: np.ndarray, distortion: Distortion, width: int, height: int) -> np.ndarray:
    """The remap table of one camera: read-only float32 ``[height, width, 2]``, for each pixel
    (u, v) of the undistorted image the (x, y) it samples in the raw image (module docstring).
    ``intrinsics``: K ``[3, 3]``, also the undistorted image's camera matrix. Cached per
    (K, distortion, size)."""
    key = tuple(float(value) for value in np.asarray(intrinsics, dtype=np.float64)[:3, :3].ravel())
    return _cached_map(key, distortion, int(width), int(height))


@lru_cache(maxsize=8)
def tap_grid(image: ImageConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns): the sorted int64 pixel rows and columns of an input image that
    normalization's taps read (its undistorted pixels that must be computed)."""
    tables = normalize_tables(image)
    rows = np.union1d(tables.rows.low, tables.rows.high)
    columns = np.union1d(tables.columns.low[::3] // 3, tables.columns.high[::3] // 3)
    return rows, columns


@dataclass(frozen=True)
class RemapTables:
    """The undistortion of a rig for one :class:`ImageConfig` (:func:`remap_tables`).

    map_index:   int32 ``[N]``: camera i's table in ``maps``, -1 for a camera without distortion;
    maps:        float32 ``[M, H, W, 2]`` remap tables (:func:`undistortion_map`), M >= 1;
    source_rows: the rows of the raw images that undistorting their taps reads (a slice);
    key:         per camera (K, distortion) or None: what the tables were built from.
    ``map_index`` and ``maps`` are NumPy arrays, or CuPy ones after :meth:`to_device`.
    """

    map_index: Any
    maps: Any
    source_rows: slice
    key: tuple

    def to_device(self) -> "RemapTables":
        """The same tables with CuPy arrays on the current device (one upload)."""
        import cupy
        return RemapTables(cupy.asarray(self.map_index), cupy.asarray(self.maps), self.source_rows, self.key)

    def camera_map(self, index: int) -> np.ndarray | None:
        """The remap table of camera ``index`` (NumPy tables), None when it is not distorted."""
        position = int(self.map_index[index])
        return None if position < 0 else self.maps[position]


def _rows_read(source: np.ndarray, rows: np.ndarray, columns: np.ndarray, height: int) -> tuple[int, int]:
    """(first, last) raw row that sampling ``source`` at the tap grid reads; (height, -1): none."""
    y0 = np.floor(source[np.ix_(rows, columns)][..., 1]).astype(np.int64).ravel()
    touched = np.concatenate([y0[(y0 >= 0) & (y0 < height)], y0[(y0 + 1 >= 0) & (y0 + 1 < height)] + 1])
    return (int(touched.min()), int(touched.max())) if touched.size else (height, -1)


def _source_rows(maps: Sequence[np.ndarray], plain_cameras: bool, image: ImageConfig) -> slice:
    """The rows of the raw images read: the undistortion's, and normalization's own band when
    some camera is not distorted."""
    rows, columns = tap_grid(image)
    spans = [_rows_read(source, rows, columns, image.input_height) for source in maps]
    if plain_cameras:
        spans.append((int(rows.min()), int(rows.max())))
    first, last = min(span[0] for span in spans), max(span[1] for span in spans)
    return slice(first, last + 1) if last >= first else slice(0, 0)


def calibration_key(calibration: Calibration) -> tuple:
    """Per camera (K as a tuple, distortion) when distorted, else None: what the tables depend on."""
    return tuple(None if calibration.distortion(index) is None else
                 (tuple(calibration.camera_intrinsics[index, :3, :3].ravel().tolist()), calibration.distortion(index))
                 for index in range(calibration.num_cameras))


def remap_tables(calibration: Calibration, image: ImageConfig,
                 previous: RemapTables | None = None) -> RemapTables | None:
    """The :class:`RemapTables` of ``calibration``'s distorted cameras at ``image``'s input size;
    None when no camera is distorted; ``previous`` itself when it was built from the same K and
    distortions (extrinsics do not matter)."""
    if not calibration.distorted:
        return None
    key = calibration_key(calibration)
    if previous is not None and previous.key == key:
        return previous
    maps, map_index = [], np.full(calibration.num_cameras, -1, dtype=np.int32)
    for index, entry in enumerate(key):
        if entry is not None:
            map_index[index] = len(maps)
            maps.append(undistortion_map(np.array(entry[0]).reshape(3, 3), entry[1],
                                         image.input_width, image.input_height))
    stacked = np.stack(maps)
    stacked.flags.writeable = False
    map_index.flags.writeable = False
    return RemapTables(map_index, stacked, _source_rows(maps, bool((map_index < 0).any()), image), key)


def undistorted_taps(rgb: np.ndarray, source: np.ndarray, image: ImageConfig) -> np.ndarray:
    """uint8 ``[H, W, 3]``: the undistorted image of raw ``rgb`` ``[H, W, 3]`` under the remap
    table ``source`` ``[H, W, 2]``, computed at the pixels normalization reads (:func:`tap_grid`);
    every other pixel is 0 (never read)."""
    rows, columns = tap_grid(image)
    grid = np.ix_(rows, columns)
    undistorted = np.zeros_like(rgb)
    positions = source[grid]
    undistorted[grid] = sample_bilinear(rgb, positions[..., 0], positions[..., 1])
    return undistorted


def _undistorted_positions(pixels: np.ndarray, intrinsics: np.ndarray, distortion: Distortion) -> np.ndarray:
    """float64 ``[P, 2]`` raw pixel positions -> their positions in the undistorted image (K both)."""
    coefficients = np.asarray(distortion.coefficients, dtype=np.float64)
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-12)
    points = pixels.reshape(-1, 1, 2)
    if distortion.is_fisheye:
        undistorted = cv2.fisheye.undistortPoints(points, intrinsics, coefficients, R=np.eye(3), P=intrinsics,
                                                  criteria=criteria)
    elif hasattr(cv2, "undistortPointsIter"):           # OpenCV 4: the iterating variant has its own name
        undistorted = cv2.undistortPointsIter(points, intrinsics, coefficients, np.eye(3), intrinsics, criteria)
    else:
        undistorted = cv2.undistortPoints(points, intrinsics, coefficients, R=np.eye(3), P=intrinsics,
                                          criteria=criteria)
    return undistorted.reshape(-1, 2)


def distorted_image(rgb: np.ndarray, intrinsics: np.ndarray, distortion: Distortion) -> np.ndarray:
    """What a camera with lens ``distortion`` sees of the undistorted uint8 image ``rgb`` ``[H, W, 3]``
    (camera matrix ``intrinsics`` for both): each raw pixel samples ``rgb`` bilinearly where it
    lies undistorted (OpenCV's iterative ``undistortPoints``, to 1e-12), 0 outside. The inverse
    of :func:`undistortion_map` up to interpolation; for synthetic data and tests."""
    height, width = rgb.shape[:2]
    pixels = np.stack(np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)), -1)
    source = _undistorted_positions(pixels.reshape(-1, 2), np.asarray(intrinsics, np.float64)[:3, :3], distortion)
    source = source.reshape(height, width, 2).astype(np.float32)
    return cv2.remap(rgb, source[..., 0], source[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                     borderValue=0)


def distorted_frame(frame: Frame, distortions: Sequence[Distortion | None]) -> Frame:
    """``frame`` as cameras with these lenses (one per camera, None: none) would have recorded
    it: each distorted camera's image through :func:`distorted_image`, the calibration the same
    with ``distortions``. Undistorting it gives ``frame`` back up to interpolation (a distorted
    twin, for synthetic data and tests)."""
    calibration = frame.calibration
    if len(distortions) != calibration.num_cameras:
        raise ValueError(f"{len(distortions)} distortions for {calibration.num_cameras} cameras")
    intrinsics = calibration.camera_intrinsics[:, :3, :3]
    images = [rgb if lens is None else distorted_image(rgb, intrinsics[index], lens)
              for index, (rgb, lens) in enumerate(zip(frame.images, distortions))]
    lenses = tuple(distortions) if any(lens is not None for lens in distortions) else ()
    return dataclasses.replace(frame, images=images,
                               calibration=dataclasses.replace(calibration, distortions=lenses).validate())
