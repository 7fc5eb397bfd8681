"""Sparse lidar encoder (mmdet3d ``SparseEncoder``, basic blocks) in pure PyTorch, without spconv.

Structure and attribute names mirror mit-han-lab/bevfusion @ db75150717a9 so that ``state_dict()``
keys and shapes equal those under ``encoders.lidar.backbone.`` in its checkpoints (spec 5.4):

- ``bevfusion:mmdet3d/models/backbones/sparse_encoder.py``: ``conv_input``,
  ``encoder_layers.encoder_layer{i}`` (SparseBasicBlocks, then a stride-2 down conv in every stage
  but the last), ``conv_out`` (kernel (1,1,3), stride (1,1,2)); dense output permuted to channel c*Z+z;
- ``bevfusion:mmdet3d/ops/sparse_block.py``: ``make_sparse_convmodule`` = Sequential(conv ``.0``,
  BN1d ``.1``, ReLU ``.2``), convs without bias; ``SparseBasicBlock`` = mmdet ``BasicBlock``
  (``conv1``/``bn1``/``conv2``/``bn2``, 3x3x3 subm convs with padding 1);
- ``bevfusion:mmdet3d/ops/spconv/conv.py``: weights stored as [kx, ky, kz, I, O]; subm output
  sites = input sites; ``indice_key`` shares index pairs between layers;
- ``bevfusion:mmdet3d/ops/spconv/ops.py``: out = floor((n + 2p - k) / s) + 1.

The basic blocks' convs carry the ``subm{i}`` rulebook keys that CUDA-BEVFusion assigns at export
(``CUDA-BEVFusion/qat/lean/exptool.py``); mit-han-lab leaves them unkeyed, which yields the same
index pairs because a subm rulebook depends only on the (unchanged) site set.

Coordinates are integer (x, y, z) voxel indices, spatial shapes (X, Y, Z) in the same order (spec 5.1).
A convolution is cross-correlation like ``torch.nn.functional.conv3d``: output site o reads input
site i = o * stride - padding + k through kernel tap k = (kx, ky, kz).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from bevfusion_ros.model.presets import ModelPreset

Triple = tuple[int, int, int]
IntOrTriple = Union[int, tuple[int, ...]]

BN_EPS = 1e-3          # mmdet3d norm_cfg BN1d eps
BN_MOMENTUM = 0.01     # mmdet3d norm_cfg BN1d momentum


def as_triple(value: IntOrTriple) -> Triple:
    """An int or a 3-sequence (x, y, z) as a tuple of 3 ints."""
    if isinstance(value, int):
        return value, value, value
    if len(value) != 3:
        raise ValueError(f"expected an int or 3 values (x, y, z), got {value!r}")
    return int(value[0]), int(value[1]), int(value[2])


def conv_output_shape(spatial_shape: Triple, kernel_size: Triple, stride: Triple,
                      padding: Triple) -> Triple:
    """Regular (strided) conv output grid: floor((n + 2p - k) / s) + 1 per axis (spconv ops.py)."""
    shape = tuple((n + 2 * p - k) // s + 1
                  for n, k, s, p in zip(spatial_shape, kernel_size, stride, padding))
    if min(shape) < 1:
        raise ValueError(f"conv k={kernel_size} s={stride} p={padding} empties grid {spatial_shape}")
    return shape  # type: ignore[return-value]


def kernel_taps(kernel_size: Triple, device: torch.device | str | None = None) -> torch.Tensor:
    """All kernel taps (kx, ky, kz) as int64 [kx*ky*kz, 3], in the C order of weight[kx, ky, kz]."""
    axes = [torch.arange(k, dtype=torch.int64, device=device) for k in kernel_size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def linear_keys(coords: torch.Tensor, spatial_shape: Triple) -> torch.Tensor:
    """(x, y, z) int64 [N, 3] -> row-major site key (x * Y + y) * Z + z, int64 [N]."""
    _, size_y, size_z = spatial_shape
    return (coords[:, 0] * size_y + coords[:, 1]) * size_z + coords[:, 2]


def coords_from_keys(keys: torch.Tensor, spatial_shape: Triple) -> torch.Tensor:
    """Inverse of :func:`linear_keys`: int64 [N] -> (x, y, z) int64 [N, 3]."""
    _, size_y, size_z = spatial_shape
    return torch.stack((keys // (size_y * size_z), (keys // size_z) % size_y, keys % size_z), dim=1)


@dataclass(frozen=True)
class Rulebook:
    """Index pairs of one sparse convolution (spconv "indice pairs").

    ``in_indices[t]`` / ``out_indices[t]`` (int64 [P_t]) pair input rows with output rows for kernel
    tap t, taps in the C order of weight[kx, ky, kz]. ``out_coords`` (int64 [N_out, 3], x y z) are the
    output sites on the ``out_spatial_shape`` grid; ``num_inputs`` is the input site count.
    """

    in_indices: tuple[torch.Tensor, ...]
    out_indices: tuple[torch.Tensor, ...]
    out_coords: torch.Tensor
    out_spatial_shape: Triple
    num_inputs: int

    @property
    def num_outputs(self) -> int:
        return int(self.out_coords.shape[0])

    @functools.cached_property
    def neighbours(self) -> torch.Tensor:
        """int64 [N_out, taps]: the input row that output row o reads through tap t, or
        ``num_inputs`` (a zero row) where none. One input at most per (output, tap): it is
        o * stride - padding + tap."""
        device = self.out_coords.device
        table = torch.full((self.num_outputs, len(self.in_indices)), self.num_inputs,
                           dtype=torch.int64, device=device)
        taps = torch.cat([torch.full_like(rows, tap) for tap, rows in enumerate(self.out_indices)])
        table[torch.cat(self.out_indices), taps] = torch.cat(self.in_indices)
        return table


class _SiteLookup:
    """Sorted site keys for key -> row lookups (binary search, no dense grid)."""

    def __init__(self, keys: torch.Tensor):
        self.sorted_keys, self.rows = torch.sort(keys)

    def find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``keys`` [N] among the sites: (found mask bool [N], row int64 [N], valid where found)."""
        if self.sorted_keys.numel() == 0:
            return torch.zeros_like(keys, dtype=torch.bool), torch.zeros_like(keys)
        position = torch.searchsorted(self.sorted_keys, keys).clamp_(max=self.sorted_keys.numel() - 1)
        return self.sorted_keys[position] == keys, self.rows[position]


def _reached_outputs(in_coords: torch.Tensor, kernel_size: Triple, stride: Triple, padding: Triple,
                     out_shape: Triple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (tap, input) pair that lands on the output grid, all taps at once.

    Output o is reached from input i through tap k when o * stride = i + padding - k with
    0 <= o < out_shape. Returns (taps [P], input rows [P], output coords [P, 3]), ordered by tap,
    then input row.
    """
    device = in_coords.device
    stride_t, padding_t, out_shape_t = (torch.tensor(v, dtype=torch.int64, device=device)
                                        for v in (stride, padding, out_shape))
    scaled = in_coords[None, :, :] + (padding_t - kernel_taps(kernel_size, device))[:, None, :]
    out = torch.div(scaled, stride_t, rounding_mode="floor")
    valid = (((scaled % stride_t) == 0) & (scaled >= 0) & (out < out_shape_t)).all(dim=2)
    taps, rows = torch.nonzero(valid, as_tuple=True)
    return taps, rows, out[taps, rows]


def build_rulebook(in_coords: torch.Tensor, spatial_shape: Triple, kernel_size: Triple,
                   stride: Triple, padding: Triple, subm: bool) -> Rulebook:
    """Index pairs of a sparse conv over sites ``in_coords`` (int64 [N, 3], x y z, unique).

    subm: output sites = input sites (stride must be 1), an output row pairs with every input
    neighbour under the kernel. Regular: output sites = every site of the
    :func:`conv_output_shape` grid reached by an input, in ascending key order.
    """
    kernel_size, stride, padding = (as_triple(v) for v in (kernel_size, stride, padding))
    if subm and stride != (1, 1, 1):
        raise ValueError(f"a submanifold conv needs stride 1, got {stride}")
    out_shape = spatial_shape if subm else conv_output_shape(spatial_shape, kernel_size, stride, padding)
    taps, rows, out_coords = _reached_outputs(in_coords, kernel_size, stride, padding, out_shape)
    if subm:
        found, out_rows = _SiteLookup(linear_keys(in_coords, spatial_shape)).find(
            linear_keys(out_coords, spatial_shape))
        taps, rows, out_rows = taps[found], rows[found], out_rows[found]
        out_sites = in_coords
    else:
        unique_keys, out_rows = torch.unique(linear_keys(out_coords, out_shape), sorted=True,
                                             return_inverse=True)
        out_sites = coords_from_keys(unique_keys, out_shape)
    counts = torch.bincount(taps, minlength=math.prod(kernel_size)).tolist()
    return Rulebook(torch.split(rows, counts), torch.split(out_rows, counts), out_sites, out_shape,
                    int(in_coords.shape[0]))


def sparse_conv(features: torch.Tensor, weight: torch.Tensor, rulebook: Rulebook,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """features [N_in, I], weight [kx, ky, kz, I, O] -> [N_out, O] (+ bias [O]).

    One gather and one GEMM: each output row's kernel neighbourhood (``rulebook.neighbours``,
    missing neighbours read an appended zero row) as [N_out, taps * I] times the weight as
    [taps * I, O] (implicit im2col)."""
    kernel_volume = math.prod(weight.shape[:3])
    if len(rulebook.in_indices) != kernel_volume or features.shape[0] != rulebook.num_inputs:
        raise ValueError(f"rulebook ({len(rulebook.in_indices)} taps, {rulebook.num_inputs} inputs) "
                         f"does not fit weight {tuple(weight.shape)} / features {tuple(features.shape)}")
    padded = torch.cat([features, features.new_zeros((1, features.shape[1]))])
    columns = padded.index_select(0, rulebook.neighbours.reshape(-1)).reshape(
        rulebook.num_outputs, kernel_volume * features.shape[1])   # backward: index_add_, no sort
    out = columns @ weight.reshape(-1, weight.shape[4]).to(columns.dtype)
    return out if bias is None else out + bias


@dataclass
class SparseVoxelTensor:
    """Active sites of one frame: features [N, C], coords int64 [N, 3] (x y z) on ``spatial_shape``.

    ``rulebooks`` maps an ``indice_key`` to its :class:`Rulebook`; tensors derived from one input
    share the same dict, so layers with equal keys reuse index pairs (spconv ``indice_dict``).
    """

    features: torch.Tensor
    coords: torch.Tensor
    spatial_shape: Triple
    rulebooks: dict[str, Rulebook] = field(default_factory=dict)

    def replace_features(self, features: torch.Tensor) -> "SparseVoxelTensor":
        """Same sites and rulebooks, new features [N, C']."""
        return dataclasses.replace(self, features=features)


def sparse_input(voxel_features: torch.Tensor, voxel_coords: torch.Tensor,
                 spatial_shape: Triple) -> SparseVoxelTensor:
    """Validate voxelizer output (features [M, C], coords int [M, 4] = batch 0, x, y, z; unique)."""
    if voxel_coords.ndim != 2 or voxel_coords.shape[1] != 4 or voxel_features.ndim != 2 \
            or voxel_features.shape[0] != voxel_coords.shape[0]:
        raise ValueError(f"expected features [M, C] and coords [M, 4], got "
                         f"{tuple(voxel_features.shape)} and {tuple(voxel_coords.shape)}")
    coords = voxel_coords.to(torch.int64)
    if bool((coords[:, 0] != 0).any()):
        raise ValueError("only batch index 0 is supported (one frame per call)")
    xyz = coords[:, 1:]
    if bool((xyz < 0).any()) or bool((xyz >= torch.tensor(spatial_shape, device=xyz.device)).any()):
        raise ValueError(f"voxel coordinates outside the grid {spatial_shape}")
    if torch.unique(linear_keys(xyz, spatial_shape)).numel() != xyz.shape[0]:
        raise ValueError("voxel coordinates are not unique")
    return SparseVoxelTensor(voxel_features, xyz.contiguous(), tuple(spatial_shape))


def cached_rulebook(x: SparseVoxelTensor, kernel_size: Triple, stride: Triple, padding: Triple,
                    subm: bool, indice_key: Optional[str]) -> Rulebook:
    """The rulebook stored under ``indice_key`` in ``x.rulebooks``, built and stored if absent."""
    rulebook = x.rulebooks.get(indice_key) if indice_key is not None else None
    if rulebook is None:
        rulebook = build_rulebook(x.coords, x.spatial_shape, kernel_size, stride, padding, subm)
        if indice_key is not None:
            x.rulebooks[indice_key] = rulebook
    elif rulebook.num_inputs != x.coords.shape[0]:
        raise ValueError(f"rulebook {indice_key!r} was built for {rulebook.num_inputs} sites, "
                         f"the input has {x.coords.shape[0]}")
    return rulebook


def scatter_dense(features: torch.Tensor, coords: torch.Tensor, spatial_shape: Triple) -> torch.Tensor:
    """ScatterDense (format "xyz"): features [N, C] at coords [N, 3] -> [1, C, X, Y, Z], zero elsewhere."""
    dense = features.new_zeros((features.shape[1], math.prod(spatial_shape)))
    dense[:, linear_keys(coords, spatial_shape)] = features.t()
    return dense.reshape(1, features.shape[1], *spatial_shape)


def flatten_z_into_channels(dense: torch.Tensor) -> torch.Tensor:
    """Transpose (0,1,4,2,3) + Reshape: [1, C, X, Y, Z] -> BEV [1, C*Z, X, Y], channel c*Z + z (spec 5.3)."""
    batch, channels, size_x, size_y, size_z = dense.shape
    return dense.permute(0, 1, 4, 2, 3).reshape(batch, channels * size_z, size_x, size_y)


class SparseModule(nn.Module):
    """Marker base: ``forward`` takes and returns a :class:`SparseVoxelTensor`."""


class SparseConvolution(SparseModule):
    """spconv ``SubMConv3d`` (``subm=True``) / ``SparseConv3d`` without bias; weight [kx, ky, kz, I, O]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTriple,
                 stride: IntOrTriple = 1, padding: IntOrTriple = 0, subm: bool = False,
                 indice_key: Optional[str] = None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (as_triple(v) for v in (kernel_size, stride, padding))
        self.subm, self.indice_key = subm, indice_key
        self.weight = nn.Parameter(torch.empty(*self.kernel_size, in_channels, out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = I * kx * ky * kz (= spconv's kaiming, a=sqrt(5))."""
        bound = 1.0 / math.sqrt(self.in_channels * math.prod(self.kernel_size))
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: SparseVoxelTensor) -> SparseVoxelTensor:
        rulebook = cached_rulebook(x, self.kernel_size, self.stride, self.padding, self.subm, self.indice_key)
        return SparseVoxelTensor(sparse_conv(x.features, self.weight, rulebook), rulebook.out_coords,
                                 rulebook.out_spatial_shape, x.rulebooks)

    def extra_repr(self) -> str:
        kind = "subm" if self.subm else "regular"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, {kind}, indice_key={self.indice_key!r}")


class SparseSequential(nn.Sequential, SparseModule):
    """spconv ``SparseSequential``: sparse modules get the tensor, the others (BN, ReLU) its features."""

    def forward(self, x: SparseVoxelTensor) -> SparseVoxelTensor:  # type: ignore[override]
        for module in self:
            x = module(x) if isinstance(module, SparseModule) else x.replace_features(module(x.features))
        return x


def batch_norm(channels: int) -> nn.BatchNorm1d:
    """mmdet3d norm_cfg ``BN1d`` (eps 1e-3, momentum 0.01)."""
    return nn.BatchNorm1d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: IntOrTriple, stride: IntOrTriple,
                 padding: IntOrTriple, subm: bool, indice_key: str) -> SparseSequential:
    """``make_sparse_convmodule``: ``.0`` conv (no bias), ``.1`` BN1d, ``.2`` ReLU."""
    return SparseSequential(
        SparseConvolution(in_channels, out_channels, kernel_size, stride, padding, subm, indice_key),
        batch_norm(out_channels), nn.ReLU())


class SparseBasicBlock(SparseModule):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + x) with 3x3x3 subm convs, padding 1 (mmdet BasicBlock)."""

    def __init__(self, channels: int, indice_key: str):
        super().__init__()
        self.conv1 = SparseConvolution(channels, channels, 3, 1, 1, subm=True, indice_key=indice_key)
        self.bn1 = batch_norm(channels)
        self.conv2 = SparseConvolution(channels, channels, 3, 1, 1, subm=True, indice_key=indice_key)
        self.bn2 = batch_norm(channels)
        self.relu = nn.ReLU()

    def forward(self, x: SparseVoxelTensor) -> SparseVoxelTensor:
        out = self.conv1(x)
        out = out.replace_features(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        return out.replace_features(self.relu(self.bn2(out.features) + x.features))


class SparseEncoder(nn.Module):
    """mmdet3d ``SparseEncoder`` (block_type "basicblock") for ``preset.lidar`` on the voxel grid.

    forward(voxel_features [M, C_in] float, voxel_coords [M, 4] int (0, x, y, z))
    -> BEV [1, output_channels * Z_out, X_out, Y_out], e.g. [1, 256, 180, 180] for nuscenes-r50.
    Memory: only sparse features and the final dense [C, X_out, Y_out, Z_out] are allocated.
    """

    def __init__(self, preset: ModelPreset):
        super().__init__()
        spec = preset.lidar
        self.sparse_shape: Triple = preset.pipeline.voxelization.sparse_shape
        self.conv_input = conv_bn_relu(spec.in_channels, spec.base_channels, 3, 1, 1, True, "subm1")
        self.encoder_layers = SparseSequential()
        channels = spec.base_channels
        for stage, (stage_channels, stage_paddings) in enumerate(
                zip(spec.encoder_channels, spec.encoder_paddings), start=1):
            has_down = stage < len(spec.encoder_channels)
            layers, channels = _encoder_stage(stage, channels, stage_channels, stage_paddings, has_down)
            self.encoder_layers.add_module(f"encoder_layer{stage}", layers)
        self.conv_out = conv_bn_relu(channels, spec.output_channels, (1, 1, 3), (1, 1, 2), 0,
                                     False, "spconv_down2")

    def forward_sparse(self, voxel_features: torch.Tensor, voxel_coords: torch.Tensor) -> SparseVoxelTensor:
        """Sparse output of ``conv_out``: features [N, output_channels] on the final grid (e.g. 180,180,2)."""
        x = sparse_input(voxel_features, voxel_coords, self.sparse_shape)
        return self.conv_out(self.encoder_layers(self.conv_input(x)))

    def forward(self, voxel_features: torch.Tensor, voxel_coords: torch.Tensor) -> torch.Tensor:
        out = self.forward_sparse(voxel_features, voxel_coords)
        return flatten_z_into_channels(scatter_dense(out.features, out.coords, out.spatial_shape))


def _encoder_stage(stage: int, in_channels: int, stage_channels: tuple[int, ...],
                   stage_paddings: tuple, has_down: bool) -> tuple[SparseSequential, int]:
    """encoder_layer{stage}: basic blocks, the last entry a stride-2 conv when ``has_down``.

    Returns the stage and its output channels. As in mmdet3d, a basic block keeps its channels
    (``SparseBasicBlock(out, out)``), so its entry must equal the incoming channel count.
    """
    layers = SparseSequential()
    channels = in_channels
    for index, (out_channels, padding) in enumerate(zip(stage_channels, stage_paddings)):
        if has_down and index == len(stage_channels) - 1:
            layers.add_module(str(index), conv_bn_relu(channels, out_channels, 3, 2, padding, False,
                                                       f"spconv{stage}"))
        elif out_channels != channels:
            raise ValueError(f"encoder_layer{stage}.{index}: a basic block maps {channels} channels "
                             f"to {channels}, the preset asks for {out_channels}")
        else:
            layers.add_module(str(index), SparseBasicBlock(out_channels, f"subm{stage}"))
        channels = out_channels
    return layers, channels


def voxel_sample_inputs(preset: ModelPreset, seed: int, num_voxels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic voxelizer output: unique random voxels, point-mean-like features.

    Returns features float32 [M, 5] = (x, y, z) in metres inside the voxel, intensity in [0, 255],
    time lag in [0, 0.5] s; coords int32 [M, 4] = (0, x, y, z) with z in 0..grid_z-1 (the SCN grid
    has one more z slice, spec 5.1). Voxels are uniform over the grid and in random order.
    """
    if preset.lidar.in_channels != 5:
        raise ValueError(f"voxel features are (x, y, z, intensity, time lag); preset wants "
                         f"{preset.lidar.in_channels} channels")
    voxelization = preset.pipeline.voxelization
    grid = voxelization.grid_size
    rng = np.random.default_rng(seed)
    keys = rng.choice(math.prod(grid), size=num_voxels, replace=False)
    xyz = np.stack(np.unravel_index(keys, grid), axis=1)
    metres = (np.asarray(voxelization.point_range_min)
              + (xyz + rng.random((num_voxels, 3))) * np.asarray(voxelization.voxel_size))
    features = np.concatenate([metres, rng.uniform(0.0, 255.0, (num_voxels, 1)),
                               rng.uniform(0.0, 0.5, (num_voxels, 1))], axis=1)
    coords = np.concatenate([np.zeros((num_voxels, 1), np.int64), xyz], axis=1)
    return torch.from_numpy(features.astype(np.float32)), torch.from_numpy(coords.astype(np.int32))
