"""Runs a parsed CUDA-BEVFusion SCN graph (``lidar.backbone.xyz.onnx``, spec 5.3/5.4) in NumPy.

This is the CPU stand-in for libspconv: voxel features [M, C] + coords (0, x, y, z) on the
sparse grid (e.g. 1440 x 1440 x 41) -> dense BEV [1, C_out * Z_out, X_out, Y_out], channel
c * Z_out + z (e.g. [1, 256, 180, 180]). Ops: ``SparseConvolution`` (subm and strided, fused
``ReLU`` activation, rulebooks shared by the ``rulebook`` key like spconv's ``indice_key``),
``Add``, ``Relu``, ``ScatterDense`` (format "xyz"), ``Transpose`` and ``Reshape``.

Precision: float32 throughout, fp16 weights widened once at construction. libspconv runs the
same graph in fp16 or int8 (the per-layer precision and dynamic-range attributes are ignored
here), so its outputs differ from these by fp16/int8 rounding. Same semantics as the PyTorch
reference :func:`bevfusion_ros.model.scn_onnx.run_scn_graph`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from bevfusion_ros.lidar.scn_graph import SPARSE_CONVOLUTION, ScnLayer, ScnNode, read_scn_onnx
from bevfusion_ros.lidar.sparse_conv import (ConvGeometry, Rulebook, Triple, build_rulebook,
                                             linear_keys, scatter_dense, sparse_conv)


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """Active sites of one frame: features float32 [N, C] at coords int32 [N, 3] (x, y, z) on
    ``spatial_shape`` (X, Y, Z)."""

    features: np.ndarray
    coords: np.ndarray
    spatial_shape: Triple

    def with_features(self, features: np.ndarray) -> "SparseTensor":
        return SparseTensor(features, self.coords, self.spatial_shape)


def sparse_input(features: np.ndarray, coords: np.ndarray, spatial_shape: Triple) -> SparseTensor:
    """Validate voxelizer output (features [M, C], coords int [M, 4] = (0, x, y, z), unique sites
    inside ``spatial_shape``; ValueError on any violation) -> float32 sites in ascending key order.

    The key order (row-major x, y, z) gives the gathers and binary searches memory locality; the
    dense output does not depend on the site order.
    """
    if features.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 4 or \
            features.shape[0] != coords.shape[0]:
        raise ValueError(f"expected features [M, C] and coords [M, 4], "
                         f"got {features.shape} and {coords.shape}")
    if not np.issubdtype(coords.dtype, np.integer):
        raise ValueError(f"coords must be integers, got {coords.dtype}")
    if np.any(coords[:, 0] != 0):
        raise ValueError("coords[:, 0] is the batch index and must be 0 (one frame per call)")
    xyz = coords[:, 1:]
    outside = np.any((xyz < 0) | (xyz >= np.asarray(spatial_shape)), axis=1)
    if outside.any():
        raise ValueError(f"{int(outside.sum())} voxel coordinate(s) outside the sparse grid "
                         f"{tuple(spatial_shape)}, e.g. (x, y, z) = {tuple(xyz[outside][0].tolist())}")
    keys = linear_keys(xyz, spatial_shape)
    order = np.argsort(keys, kind="stable")
    duplicates = np.count_nonzero(np.diff(keys[order]) == 0)
    if duplicates:
        raise ValueError(f"voxel coordinates are not unique: {duplicates} duplicate site(s)")
    return SparseTensor(features[order].astype(np.float32), xyz[order].astype(np.int32),
                        tuple(spatial_shape))  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class _Conv:
    """A ``SparseConvolution`` node ready to run: float32 weight [kx, ky, kz, I, O] and bias [O]."""

    name: str
    layer: ScnLayer
    geometry: ConvGeometry
    weight: np.ndarray
    bias: np.ndarray

    @classmethod
    def from_node(cls, node: ScnNode) -> "_Conv":
        layer = node.layer
        if layer is None:
            raise ValueError(f"{node.name}: SparseConvolution node without its layer")
        geometry = ConvGeometry(layer.kernel_size, layer.stride, layer.padding, layer.subm)
        return cls(node.name, layer, geometry, layer.weight.astype(np.float32),
                   layer.bias.astype(np.float32))

    def rulebook(self, x: SparseTensor, rulebooks: dict[str, Rulebook]) -> Rulebook:
        """The rulebook under this layer's key, built from ``x`` on first use (spconv indice_key)."""
        layer = self.layer
        if tuple(x.spatial_shape) != tuple(layer.input_spatial_shape):
            raise ValueError(f"{self.name}: input grid {x.spatial_shape}, "
                             f"layer expects {layer.input_spatial_shape}")
        rulebook = rulebooks.get(layer.rulebook)
        if rulebook is None:
            rulebook = rulebooks[layer.rulebook] = build_rulebook(x.coords, x.spatial_shape, self.geometry)
        elif rulebook.geometry != self.geometry or rulebook.num_inputs != x.coords.shape[0]:
            raise ValueError(f"{self.name}: rulebook {layer.rulebook!r} was built for "
                             f"{rulebook.geometry} on {rulebook.num_inputs} sites, this layer has "
                             f"{self.geometry} on {x.coords.shape[0]} sites")
        if rulebook.output_shape != tuple(layer.output_spatial_shape):
            raise ValueError(f"{self.name}: output grid {rulebook.output_shape}, "
                             f"layer declares {layer.output_spatial_shape}")
        return rulebook

    def __call__(self, x: SparseTensor, rulebooks: dict[str, Rulebook]) -> SparseTensor:
        rulebook = self.rulebook(x, rulebooks)
        out = sparse_conv(x.features, self.weight, rulebook, self.bias)
        if self.layer.activation == "ReLU":
            np.maximum(out, 0.0, out=out)
        return SparseTensor(out, rulebook.out_coords, rulebook.output_shape)


def _add(node: ScnNode, a: SparseTensor, b: SparseTensor) -> SparseTensor:
    if a.coords is not b.coords and not np.array_equal(a.coords, b.coords):
        raise ValueError(f"{node.name}: Add inputs have different sites")
    return a.with_features(a.features + b.features)


def _relu(node: ScnNode, x: SparseTensor) -> SparseTensor:
    return x.with_features(np.maximum(x.features, 0.0))


def _scatter_dense(node: ScnNode, x: SparseTensor) -> np.ndarray:
    grid, layout, shape = (node.attributes[k] for k in ("input_spatial_shape", "format", "output_shape"))
    if layout != "xyz" or tuple(x.spatial_shape) != tuple(grid):
        raise ValueError(f"{node.name}: expected format 'xyz' on grid {x.spatial_shape}, "
                         f"got {layout!r} on {grid}")
    dense = scatter_dense(x.features, x.coords, x.spatial_shape)
    if dense.shape != tuple(shape):
        raise ValueError(f"{node.name}: dense shape {dense.shape} != declared {shape}")
    return dense


_TENSOR_OPS = {
    "Add": _add,
    "Relu": _relu,
    "ScatterDense": _scatter_dense,
    "Transpose": lambda node, x: np.transpose(x, node.attributes["dims"]),
    "Reshape": lambda node, x: np.reshape(x, node.attributes["dims"]),
}


def _data_inputs(node: ScnNode) -> tuple[str, ...]:
    """Tensor names a node reads (a conv's weight and bias inputs are initializers, not data)."""
    return node.inputs[:2 if node.op_type == "Add" else 1]


def _check_graph(nodes: Sequence[ScnNode]) -> None:
    """Supported ops, a conv on the graph input first, every data input produced by an earlier node."""
    if not nodes or nodes[0].op_type != SPARSE_CONVOLUTION:
        raise ValueError("an SCN graph starts with a SparseConvolution on the voxel features")
    unsupported = sorted({node.op_type for node in nodes} - {SPARSE_CONVOLUTION, *_TENSOR_OPS})
    if unsupported:
        raise ValueError(f"unsupported SCN op(s) {unsupported}")
    produced = {nodes[0].inputs[0]}
    for node in nodes:
        missing = [name for name in _data_inputs(node) if name not in produced]
        if missing:
            raise ValueError(f"{node.name}: input(s) {missing} not produced by an earlier node")
        produced.add(node.outputs[0])


class SparseEncoderRunner:
    """Executes SCN graph nodes (graph order, as :func:`read_scn_onnx` returns them) on one frame.

    Stateless between calls: rulebooks live for one :meth:`run`. The first node must be a
    ``SparseConvolution`` reading the graph input; the last node's output is the result.
    """

    def __init__(self, nodes: Sequence[ScnNode]):
        _check_graph(nodes)
        self.nodes = tuple(nodes)
        self._convs = tuple(_Conv.from_node(node) if node.op_type == SPARSE_CONVOLUTION else None
                            for node in nodes)
        first = self._convs[0]
        assert first is not None        # _check_graph: the graph starts with a conv
        self._input_layer = first.layer

    @classmethod
    def from_onnx(cls, path: Union[str, Path]) -> "SparseEncoderRunner":
        """Runner for ``lidar.backbone.xyz.onnx`` at ``path``."""
        return cls(read_scn_onnx(path))

    @property
    def input_channels(self) -> int:
        return self._input_layer.in_channels

    @property
    def input_spatial_shape(self) -> Triple:
        return self._input_layer.input_spatial_shape

    def run(self, features: np.ndarray, coords: np.ndarray, sparse_shape: Triple) -> np.ndarray:
        """Voxel features fp16/float32 [M, C_in], coords int32 [M, 4] (0, x, y, z) on ``sparse_shape``
        (X, Y, Z) -> float32 output of the last node, e.g. BEV [1, C_out * Z_out, X_out, Y_out].

        Raises ValueError for malformed, out-of-grid or duplicate coordinates, or inputs that do not
        fit the graph's first layer.
        """
        if tuple(sparse_shape) != self.input_spatial_shape or features.shape[-1] != self.input_channels:
            raise ValueError(f"graph expects {self.input_channels} channels on grid "
                             f"{self.input_spatial_shape}, got features {features.shape} on "
                             f"{tuple(sparse_shape)}")
        tensors: dict[str, Union[SparseTensor, np.ndarray]] = {
            self.nodes[0].inputs[0]: sparse_input(features, coords, sparse_shape)}
        rulebooks: dict[str, Rulebook] = {}
        for node, conv in zip(self.nodes, self._convs):
            inputs = [tensors[name] for name in _data_inputs(node)]
            if conv is not None:
                tensors[node.outputs[0]] = conv(inputs[0], rulebooks)  # type: ignore[arg-type]
            else:
                tensors[node.outputs[0]] = _TENSOR_OPS[node.op_type](node, *inputs)  # type: ignore[operator]
        result = tensors[self.nodes[-1].outputs[0]]
        return np.ascontiguousarray(result.features if isinstance(result, SparseTensor) else result)
