"""Sparse 3D convolution primitives, NumPy or CuPy (no torch): rulebooks and gather-GEMM-scatter.

Same semantics as spconv / libspconv and :mod:`bevfusion_ros.model.sparse_encoder` (the PyTorch
reference). Every public function runs where its arrays live. Arithmetic is in the dtype of the
features: float32 (fp16 weights widened) is the reference; float16 storage with float32
accumulation is the GPU fast path. The convolution's definition, site keys and rulebooks, and
how NumPy and CuPy compute it: docs/pipeline.md, "Sparse convolution".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional, Sequence

import numpy as np

from bevfusion_ros.runtime.array_module import get_array_module, is_cupy

Triple = tuple[int, int, int]
Array = Any                      # numpy.ndarray or cupy.ndarray


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel size, stride and padding per axis (x, y, z), and whether the conv is submanifold."""

    kernel_size: Triple
    stride: Triple
    padding: Triple
    subm: bool

    def __post_init__(self) -> None:
        if self.subm and tuple(self.stride) != (1, 1, 1):
            raise ValueError(f"a submanifold conv needs stride 1, got {self.stride}")

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.kernel_size)

    def output_shape(self, input_shape: Triple) -> Triple:
        """Output grid: the input grid (subm) or floor((n + 2p - k) / s) + 1 per axis."""
        if self.subm:
            return tuple(input_shape)  # type: ignore[return-value]
        shape = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in
                      zip(input_shape, self.kernel_size, self.stride, self.padding))
        if min(shape) < 1:
            raise ValueError(f"conv k={self.kernel_size} s={self.stride} p={self.padding} "
                             f"empties grid {input_shape}")
        return shape  # type: ignore[return-value]


def linear_keys(coords: Array, spatial_shape: Triple) -> Array:
    """(x, y, z) int [N, 3] -> row-major key (x * Y + y) * Z + z, int64 [N]."""
    coords = coords.astype(np.int64, copy=False)
    _, size_y, size_z = spatial_shape
    return (coords[:, 0] * size_y + coords[:, 1]) * size_z + coords[:, 2]


def coords_from_keys(keys: Array, spatial_shape: Triple) -> Array:
    """Inverse of :func:`linear_keys`: int64 [N] -> (x, y, z) int32 [N, 3]."""
    xp = get_array_module(keys)
    _, size_y, size_z = spatial_shape
    return xp.stack((keys // (size_y * size_z), (keys // size_z) % size_y, keys % size_z),
                    axis=1).astype(np.int32)


@dataclass(frozen=True, eq=False)
class Rulebook:
    """Index pairs of one sparse convolution (spconv "indice pairs", libspconv "rulebook").

    ``neighbors`` int32 [K, N_out] (K taps in the C order of weight[kx, ky, kz]): the input row
    that output row o reads through tap t, or ``num_inputs`` where none. ``out_coords`` int32
    [N_out, 3] (x, y, z) on ``output_shape``: the input sites for subm, else the reached sites in
    ascending key order. Built for ``num_inputs`` sites on ``input_shape`` with ``geometry``; the
    arrays are NumPy or CuPy, like the coordinates it was built from.
    """

    geometry: ConvGeometry
    input_shape: Triple
    output_shape: Triple
    num_inputs: int
    out_coords: Array
    neighbors: Array

    @property
    def num_outputs(self) -> int:
        return int(self.out_coords.shape[0])

    @property
    def num_pairs(self) -> int:
        xp = get_array_module(self.neighbors)
        return int(xp.count_nonzero(self.neighbors < self.num_inputs))

    @cached_property
    def out_rows(self) -> tuple[Array, ...]:
        """Per tap: the output rows that have an input, int64 [P_t] ascending."""
        xp = get_array_module(self.neighbors)
        return tuple(xp.flatnonzero(rows < self.num_inputs) for rows in self.neighbors)

    @cached_property
    def in_rows(self) -> tuple[Array, ...]:
        """Per tap: the input row of each of :attr:`out_rows`, int32 [P_t] (one-to-one)."""
        return tuple(rows[out] for rows, out in zip(self.neighbors, self.out_rows))


class SiteTable:
    """Sorted linear keys int64 [N] of N unique sites for key -> row lookups (binary search)."""

    def __init__(self, keys: Array):
        self.rows = keys.argsort()               # unique keys: every sort gives the same order
        self.sorted_keys = keys[self.rows]

    @property
    def size(self) -> int:
        return int(self.sorted_keys.shape[0])

    def find(self, keys: Array) -> tuple[Array, Array]:
        """(found bool, row int64 meaningful where found) of query keys int64 (any shape)."""
        xp = get_array_module(keys)
        if self.size == 0:
            return xp.zeros(keys.shape, dtype=bool), xp.zeros(keys.shape, dtype=np.int64)
        position = xp.minimum(xp.searchsorted(self.sorted_keys, keys), self.size - 1)
        return self.sorted_keys[position] == keys, self.rows[position]


def _combine_axes(per_axis: Sequence[tuple[np.ndarray, np.ndarray]], shape: Triple
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per axis (valid bool [N, k_a], coordinate int64 [N, k_a]) -> (valid bool [N, K], key int64
    [N, K]) over all K = kx * ky * kz taps (C order of weight[kx, ky, kz]), key on ``shape``."""
    n, taps = per_axis[0][0].shape[0], math.prod(valid.shape[1] for valid, _ in per_axis)
    valid, key = np.ones((n, 1, 1, 1), dtype=bool), np.zeros((n, 1, 1, 1), dtype=np.int64)
    for axis, ((axis_valid, coordinate), size) in enumerate(zip(per_axis, shape)):
        view = [n, 1, 1, 1]
        view[axis + 1] = axis_valid.shape[1]
        valid = valid & axis_valid.reshape(view)
        key = key * size + coordinate.reshape(view)
    return valid.reshape(n, taps), key.reshape(n, taps)


def site_table(coords: Array, spatial_shape: Triple) -> Any:
    """Key -> row lookup over the unique sites ``coords`` int [N, 3] on ``spatial_shape``: a
    :class:`SiteTable` (sorted keys) for NumPy, a GPU hash table (``_cuda.SiteHash``) for CuPy.
    Both have ``size``; the rulebook builders below accept either where its coordinates live."""
    if is_cupy(coords):
        from bevfusion_ros.lidar import _cuda
        return _cuda.SiteHash(coords, spatial_shape)
    return SiteTable(linear_keys(coords, spatial_shape))


def _reached_sites(coords: Array, geometry: ConvGeometry, output_shape: Triple) -> Array:
    """Output sites int32 [M, 3] (ascending key order, unique) that the input sites ``coords``
    int32 [N, 3] reach: o = (i + p - k) / s per axis when the division is exact and 0 <= o < size."""
    if is_cupy(coords):
        from bevfusion_ros.lidar import _cuda
        return _cuda.reached_sites(coords, geometry.kernel_size, geometry.stride, geometry.padding,
                                   output_shape)
    per_axis = []
    for axis in range(3):
        stride = geometry.stride[axis]
        shifted = (coords[:, axis, None].astype(np.int64) + geometry.padding[axis]
                   - np.arange(geometry.kernel_size[axis]))
        out = shifted // stride
        per_axis.append(((shifted >= 0) & (shifted % stride == 0) & (out < output_shape[axis]), out))
    valid, keys = _combine_axes(per_axis, output_shape)
    return coords_from_keys(np.unique(keys[valid]), output_shape)


def _neighbor_map(out_coords: Array, table: Any, geometry: ConvGeometry, input_shape: Triple) -> Array:
    """Neighbour map int32 [K, N_out]: the row in ``table`` (from :func:`site_table`) of input site
    o * s - p + tap (per axis) for every output site o of ``out_coords`` int32 [N_out, 3], or
    ``table.size`` where none."""
    if is_cupy(out_coords):
        from bevfusion_ros.lidar import _cuda
        return _cuda.neighbor_map(out_coords, table, geometry.kernel_size, geometry.stride,
                                  geometry.padding)
    per_axis = []
    for axis in range(3):
        coordinate = (out_coords[:, axis, None].astype(np.int64) * geometry.stride[axis]
                      - geometry.padding[axis] + np.arange(geometry.kernel_size[axis]))
        per_axis.append(((coordinate >= 0) & (coordinate < input_shape[axis]), coordinate))
    valid, keys = _combine_axes(per_axis, input_shape)
    found, rows = table.find(np.where(valid, keys, -1).T)         # key -1 is never found
    return np.ascontiguousarray(np.where(found, rows, table.size), dtype=np.int32)


def build_rulebook(coords: Array, spatial_shape: Triple, geometry: ConvGeometry,
                   table: Any = None) -> Rulebook:
    """Rulebook of a conv over the unique sites ``coords`` int [N, 3] (x, y, z) on ``spatial_shape``.

    NumPy or CuPy coordinates; the rulebook's arrays live in the same place. ``table``: the
    :func:`site_table` of these sites when the caller already has it (convs on the same sites
    share one), else built here. For subm the output coordinates are ``coords`` itself when it is
    int32 already (no copy).
    """
    output_shape = geometry.output_shape(spatial_shape)
    coords = coords.astype(np.int32, copy=False)
    table = site_table(coords, spatial_shape) if table is None else table
    if table.size != coords.shape[0]:
        raise ValueError(f"site table of {table.size} sites given for {coords.shape[0]} sites")
    out_coords = coords if geometry.subm else _reached_sites(coords, geometry, output_shape)
    neighbors = _neighbor_map(out_coords, table, geometry, spatial_shape)
    return Rulebook(geometry, tuple(spatial_shape), output_shape,  # type: ignore[arg-type]
                    int(coords.shape[0]), out_coords, neighbors)


def _gather_gemm_scatter(features: np.ndarray, tap_weights: np.ndarray, rulebook: Rulebook) -> np.ndarray:
    """NumPy conv over the real pairs: features [N_in, I], tap_weights [K, I, O] -> [N_out, O]."""
    out = np.zeros((rulebook.num_outputs, tap_weights.shape[2]), dtype=features.dtype)
    for tap_weight, in_rows, out_rows in zip(tap_weights, rulebook.in_rows, rulebook.out_rows):
        if in_rows.size:                    # np.take + assignment: ~2.5x faster than out[rows] +=
            partial = np.take(out, out_rows, axis=0)
            partial += np.take(features, in_rows, axis=0) @ tap_weight
            out[out_rows] = partial
    return out


def sparse_conv(features: Array, weight: Array, rulebook: Rulebook, bias: Optional[Array] = None,
                residual: Optional[Array] = None, relu: bool = False,
                prepared: Any = None) -> Array:
    """Gather-GEMM-scatter: features [N_in, I], weight [kx, ky, kz, I, O] (+ bias [O])
    (+ residual [N_out, O]) (then ReLU when ``relu``) -> [N_out, O].

    Computes in the dtype of ``features`` (float32 on the deploy path; float16 on the GPU);
    ``weight``, ``bias`` and ``residual`` are cast to it (and uploaded when the features are CuPy
    arrays and they are not). The result lives where the features do. float32: the GEMM result,
    then + bias, + residual, ReLU, each in float32 (the order of the unfused graph ops). CuPy
    float16 with a multiple of 16 (<= 128) outputs: one tensor-core kernel
    (:class:`bevfusion_ros.lidar._conv_fp16.TiledConv`) that rounds to fp16 once, at the end;
    ``prepared`` is that kernel already set up for this weight and bias (a layer runner keeps
    one), else it is set up here.
    """
    kernel, channels_in, channels_out = weight.shape[:3], weight.shape[3], weight.shape[4]
    if tuple(kernel) != tuple(rulebook.geometry.kernel_size) or features.shape != (
            rulebook.num_inputs, channels_in):
        raise ValueError(f"rulebook (kernel {rulebook.geometry.kernel_size}, {rulebook.num_inputs} "
                         f"inputs) does not fit weight {weight.shape} / features {features.shape}")
    xp = get_array_module(features)
    if xp is not np and features.dtype == np.float16:
        prepared = prepared or prepare_fp16_conv(weight, bias)
        if prepared is not None:
            return prepared(features, rulebook.neighbors,
                            None if residual is None else xp.asarray(residual), relu)
    tap_weights = xp.asarray(weight).reshape(-1, channels_in, channels_out).astype(
        features.dtype, copy=False)
    if xp is np:
        out = _gather_gemm_scatter(features, tap_weights, rulebook)
    else:
        from bevfusion_ros.lidar import _cuda
        out = _cuda.gather_columns(features, rulebook.neighbors) @ tap_weights.reshape(-1, channels_out)
    for term in (bias, residual):
        if term is not None:
            out += xp.asarray(term).astype(features.dtype, copy=False)
    if relu:
        xp.maximum(out, 0, out=out)
    return out


def prepare_fp16_conv(weight: Array, bias: Optional[Array]) -> Any:
    """The GPU fp16 tensor-core conv (``_conv_fp16.TiledConv``) for weight [kx, ky, kz, I, O] and
    bias [O] (zeros when None), or None where that kernel does not apply (O not a multiple of 16
    up to 128, or a GPU older than sm_80: then ``sparse_conv`` uses im2col + GEMM)."""
    import cupy

    from bevfusion_ros.lidar import _conv_fp16, _cuda
    channels_in, channels_out = weight.shape[3], weight.shape[4]
    if not _cuda.fused_conv_supported(channels_out):
        return None
    tap_weights = cupy.asarray(weight, dtype=cupy.float16).reshape(-1, channels_in, channels_out)
    bias = (cupy.zeros(channels_out, dtype=cupy.float16) if bias is None
            else cupy.asarray(bias, dtype=cupy.float16))
    return _conv_fp16.TiledConv(_cuda.pack_conv_weight(tap_weights), bias, channels_in)


def scatter_dense(features: Array, coords: Array, spatial_shape: Triple) -> Array:
    """ScatterDense, format "xyz": features [N, C] at sites [N, 3] -> [1, C, X, Y, Z], zero elsewhere."""
    xp = get_array_module(features)
    dense = xp.zeros((features.shape[1], math.prod(spatial_shape)), dtype=features.dtype)
    dense[:, linear_keys(coords, spatial_shape)] = features.T
    return dense.reshape(1, features.shape[1], *spatial_shape)
