"""Runs a parsed CUDA-BEVFusion SCN graph (``lidar.backbone.xyz.onnx``, spec 5.3/5.4), NumPy or CuPy.

This is the stand-in for libspconv: voxel features [M, C] + coords (0, x, y, z) on the
sparse grid (e.g. 1440 x 1440 x 41) -> dense BEV [1, C_out * Z_out, X_out, Y_out], channel
c * Z_out + z (e.g. [1, 256, 180, 180]). Ops: ``SparseConvolution`` (subm and strided, fused
``ReLU`` activation, rulebooks shared by the ``rulebook`` key like spconv's ``indice_key``),
``Add``, ``Relu``, ``ScatterDense`` (format "xyz"), ``Transpose`` and ``Reshape``. A residual
block's conv -> Add -> Relu chain runs as one conv with the residual and ReLU fused (same
arithmetic order in float32; one fp16 rounding instead of three on the GPU fp16 path).

Where it runs: NumPy inputs run on the CPU; CuPy inputs stay on the GPU from the voxels to the
BEV (weights uploaded once, on the first CuPy call, to the then current device; rulebooks and
activations come from CuPy's memory pool, so after the first frame no frame allocates device
memory from the driver). Same semantics as the PyTorch reference
:func:`bevfusion_ros.model.scn_onnx.run_scn_graph`.

Precision: ``compute_dtype`` float32 (default, both paths): fp16 weights widened, float32
arithmetic; the GPU result differs from the NumPy one only by summation order (cuBLAS GEMM vs
tap by tap). ``compute_dtype`` float16 (GPU only): weights and activations stored in fp16,
GEMMs on tensor cores with float32 accumulation, every layer's output rounded to fp16 like
libspconv's fp16 mode (error vs float32 about 1e-3 of the output's magnitude, see the GPU tests).
The per-layer precision and dynamic-range attributes (int8) are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Sequence, Union

import numpy as np
from numpy.typing import DTypeLike

from bevfusion_ros.lidar.scn_graph import SPARSE_CONVOLUTION, ScnLayer, ScnNode, read_scn_onnx
from bevfusion_ros.lidar.sparse_conv import (
    ConvGeometry,
    Rulebook,
    Triple,
    build_rulebook,
    linear_keys,
    prepare_fp16_conv,
    scatter_dense,
    site_table,
    sparse_conv,
)
from bevfusion_ros.runtime.array_module import get_array_module, is_cupy, to_numpy

Array = Any                      # numpy.ndarray or cupy.ndarray
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """Active sites of one frame: features float [N, C] at coords int32 [N, 3] (x, y, z) on
    ``spatial_shape`` (X, Y, Z); NumPy or CuPy arrays."""

    features: Array
    coords: Array
    spatial_shape: Triple

    def with_features(self, features: Array) -> "SparseTensor":
        return SparseTensor(features, self.coords, self.spatial_shape)


def sparse_input(features: Array, coords: Array, spatial_shape: Triple,
                 dtype: DTypeLike = np.float32) -> SparseTensor:
    """Validate voxelizer output (features [M, C], coords int [M, 4] = (0, x, y, z), unique sites
    inside ``spatial_shape``; ValueError on any violation) -> ``dtype`` sites in ascending key order.

    The key order (row-major x, y, z) gives the gathers and table look-ups memory locality; the
    dense output does not depend on the site order. On the GPU (``_cuda.sorted_sites``: two
    kernels around an argsort) the checks cost one device-to-host copy of three counts.
    """
    if features.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 4 or \
            features.shape[0] != coords.shape[0]:
        raise ValueError(f"expected features [M, C] and coords [M, 4], "
                         f"got {features.shape} and {coords.shape}")
    if not np.issubdtype(coords.dtype, np.integer):
        raise ValueError(f"coords must be integers, got {coords.dtype}")
    if is_cupy(features) or is_cupy(coords):
        from bevfusion_ros.lidar import _cuda
        features, xyz, (other_batch, outside_count, duplicates) = _cuda.sorted_sites(
            features, coords, spatial_shape)
    else:
        xyz = coords[:, 1:]
        keys = linear_keys(xyz, spatial_shape)
        order = keys.argsort()
        sorted_keys = keys[order]
        other_batch = np.count_nonzero(coords[:, 0] != 0)
        outside_count = np.count_nonzero(_outside(xyz, spatial_shape))
        duplicates = np.count_nonzero(sorted_keys[1:] == sorted_keys[:-1])
        features, xyz = features[order], xyz[order].astype(np.int32)
    if other_batch:
        raise ValueError("coords[:, 0] is the batch index and must be 0 (one frame per call)")
    if outside_count:
        example = tuple(to_numpy(xyz[_outside(xyz, spatial_shape)][0]).tolist())
        raise ValueError(f"{outside_count} voxel coordinate(s) outside the sparse grid "
                         f"{tuple(spatial_shape)}, e.g. (x, y, z) = {example}")
    if duplicates:
        raise ValueError(f"voxel coordinates are not unique: {duplicates} duplicate site(s)")
    return SparseTensor(features.astype(dtype, copy=False), xyz,
                        tuple(spatial_shape))  # type: ignore[arg-type]


def _outside(xyz: Array, spatial_shape: Triple) -> Array:
    """bool [N]: sites xyz [N, 3] outside the grid ``spatial_shape``."""
    xp = get_array_module(xyz)
    return xp.any((xyz < 0) | (xyz >= xp.asarray(spatial_shape)), axis=1)


class SiteTables:
    """The site tables of one run, one per set of sites (identified by its coordinate array): the
    subm convs of a level and the strided conv leaving it look up the same sites."""

    def __init__(self) -> None:
        self._tables: list[tuple[Array, Any]] = []

    def get(self, x: SparseTensor) -> Any:
        """The table of ``x``'s sites, built on first use."""
        for coords, table in self._tables:
            if coords is x.coords:
                return table
        table = site_table(x.coords, x.spatial_shape)
        self._tables.append((x.coords, table))
        return table


@dataclass(frozen=True, eq=False)
class _Conv:
    """A ``SparseConvolution`` node ready to run: weight [kx, ky, kz, I, O] and bias [O] (NumPy
    float32 from :meth:`from_node`; :meth:`to` makes the device copy)."""

    name: str
    layer: ScnLayer
    geometry: ConvGeometry
    weight: Array
    bias: Array
    prepared: Any = None        # the fp16 GPU kernel set up for this layer (``prepare_fp16_conv``)

    @classmethod
    def from_node(cls, node: ScnNode) -> "_Conv":
        layer = node.layer
        if layer is None:
            raise ValueError(f"{node.name}: SparseConvolution node without its layer")
        geometry = ConvGeometry(layer.kernel_size, layer.stride, layer.padding, layer.subm)
        return cls(node.name, layer, geometry, layer.weight.astype(np.float32),
                   layer.bias.astype(np.float32))

    def to(self, xp: ModuleType, dtype: np.dtype) -> "_Conv":
        """This conv with its weight and bias as ``dtype`` arrays of module ``xp`` (e.g. uploaded),
        and for CuPy float16 the tensor-core kernel set up once."""
        weight, bias = xp.asarray(self.weight, dtype=dtype), xp.asarray(self.bias, dtype=dtype)
        prepared = prepare_fp16_conv(weight, bias) if xp is not np and dtype == np.float16 else None
        return replace(self, weight=weight, bias=bias, prepared=prepared)

    def rulebook(self, x: SparseTensor, rulebooks: dict[str, Rulebook],
                 tables: Optional["SiteTables"] = None) -> Rulebook:
        """The rulebook under this layer's key, built from ``x`` on first use (spconv indice_key),
        with the site table of ``x`` from ``tables`` when given (shared by the convs on x's sites)."""
        layer = self.layer
        if tuple(x.spatial_shape) != tuple(layer.input_spatial_shape):
            raise ValueError(f"{self.name}: input grid {x.spatial_shape}, "
                             f"layer expects {layer.input_spatial_shape}")
        rulebook = rulebooks.get(layer.rulebook)
        if rulebook is None:
            table = None if tables is None else tables.get(x)
            rulebook = rulebooks[layer.rulebook] = build_rulebook(x.coords, x.spatial_shape,
                                                                  self.geometry, table)
        elif rulebook.geometry != self.geometry or rulebook.num_inputs != x.coords.shape[0]:
            raise ValueError(f"{self.name}: rulebook {layer.rulebook!r} was built for "
                             f"{rulebook.geometry} on {rulebook.num_inputs} sites, this layer has "
                             f"{self.geometry} on {x.coords.shape[0]} sites")
        if rulebook.output_shape != tuple(layer.output_spatial_shape):
            raise ValueError(f"{self.name}: output grid {rulebook.output_shape}, "
                             f"layer declares {layer.output_spatial_shape}")
        return rulebook

    def __call__(self, x: SparseTensor, rulebooks: dict[str, Rulebook],
                 residual: Optional[SparseTensor] = None, relu: bool = False,
                 tables: Optional["SiteTables"] = None) -> SparseTensor:
        """act(conv(x) + bias (+ residual)); act is this layer's ReLU, or ``relu`` after a fused
        residual add (see :class:`_Fusion`)."""
        rulebook = self.rulebook(x, rulebooks, tables)
        if residual is not None:
            _check_same_sites(self.name, rulebook.out_coords, residual.coords)
        out = sparse_conv(x.features, self.weight, rulebook, self.bias,
                          None if residual is None else residual.features,
                          relu or self.layer.activation == "ReLU", self.prepared)
        return SparseTensor(out, rulebook.out_coords, rulebook.output_shape)


@dataclass(frozen=True)
class _Fusion:
    """A conv without activation whose only consumer is ``Add(conv, residual)``, optionally
    followed by that Add's only consumer ``Relu``: the three run as one conv (residual added
    before the ReLU, exactly the graph's order). ``output`` names the last fused node's output;
    ``skipped`` are the indices of the absorbed Add/Relu nodes."""

    residual: str
    relu: bool
    output: str
    skipped: tuple[int, ...]


def _consumers(nodes: Sequence[ScnNode], name: str) -> list[int]:
    return [index for index, node in enumerate(nodes) if name in _data_inputs(node)]


def _fusions(nodes: Sequence[ScnNode]) -> dict[int, _Fusion]:
    """Conv node index -> its :class:`_Fusion`, for every conv + Add (+ Relu) chain whose residual
    is computed before the conv (graph input or an earlier node's output)."""
    available = {nodes[0].inputs[0]}
    fusions = {}
    for index, node in enumerate(nodes):
        consumers = _consumers(nodes, node.outputs[0])
        if (node.op_type == SPARSE_CONVOLUTION and node.layer is not None
                and node.layer.activation == "None" and len(consumers) == 1
                and nodes[consumers[0]].op_type == "Add"):
            add = nodes[consumers[0]]
            residual = [name for name in _data_inputs(add) if name != node.outputs[0]]
            if len(residual) == 1 and residual[0] in available:
                after_add = _consumers(nodes, add.outputs[0])
                relu = len(after_add) == 1 and nodes[after_add[0]].op_type == "Relu"
                last = nodes[after_add[0]] if relu else add
                fusions[index] = _Fusion(residual[0], relu, last.outputs[0],
                                         (consumers[0], after_add[0]) if relu else (consumers[0],))
        available.add(node.outputs[0])
    return fusions


def _check_same_sites(name: str, a: Array, b: Array) -> None:
    """Raise unless coords ``a`` and ``b`` are the same sites (the same object in a well-formed
    graph, so the element-wise comparison, a GPU synchronisation, is only the fallback)."""
    if a is not b and not get_array_module(a).array_equal(a, b):
        raise ValueError(f"{name}: Add inputs have different sites")


def _add(node: ScnNode, a: SparseTensor, b: SparseTensor) -> SparseTensor:
    """Sum of two tensors on the same sites."""
    _check_same_sites(node.name, a.coords, b.coords)
    return a.with_features(a.features + b.features)


def _relu(node: ScnNode, x: SparseTensor) -> SparseTensor:
    return x.with_features(get_array_module(x.features).maximum(x.features, x.features.dtype.type(0)))


def _scatter_dense(node: ScnNode, x: SparseTensor) -> Array:
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
    "Transpose": lambda node, x: get_array_module(x).transpose(x, node.attributes["dims"]),
    "Reshape": lambda node, x: get_array_module(x).reshape(x, node.attributes["dims"]),
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


def _float_dtype(dtype: DTypeLike, name: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float16, got {dtype}")
    return dtype


class SparseEncoderRunner:
    """Executes SCN graph nodes (graph order, as :func:`read_scn_onnx` returns them) on one frame.

    Stateless between calls: rulebooks live for one :meth:`run`. The first node must be a
    ``SparseConvolution`` reading the graph input; the last node's output is the result.
    ``compute_dtype``: float32, or float16 for CuPy inputs (see the module docstring);
    ``output_dtype``: dtype of the returned array (float32 or float16; the dense engines take both).
    """

    def __init__(self, nodes: Sequence[ScnNode], compute_dtype: DTypeLike = np.float32,
                 output_dtype: DTypeLike = np.float32):
        _check_graph(nodes)
        self.nodes = tuple(nodes)
        self.compute_dtype = _float_dtype(compute_dtype, "compute_dtype")
        self.output_dtype = _float_dtype(output_dtype, "output_dtype")
        self._convs = tuple(_Conv.from_node(node) if node.op_type == SPARSE_CONVOLUTION else None
                            for node in nodes)
        self._device_convs: Optional[tuple[Optional[_Conv], ...]] = None
        self._fusions = _fusions(self.nodes)
        first = self._convs[0]
        assert first is not None        # _check_graph: the graph starts with a conv
        self._input_layer = first.layer

    @classmethod
    def from_onnx(cls, path: Union[str, Path], compute_dtype: DTypeLike = np.float32,
                  output_dtype: DTypeLike = np.float32) -> "SparseEncoderRunner":
        """Runner for ``lidar.backbone.xyz.onnx`` at ``path``."""
        return cls(read_scn_onnx(path), compute_dtype, output_dtype)

    @property
    def input_channels(self) -> int:
        return self._input_layer.in_channels

    @property
    def input_spatial_shape(self) -> Triple:
        return self._input_layer.input_spatial_shape

    def _convs_for(self, xp: ModuleType) -> tuple[Optional[_Conv], ...]:
        """The convs with weights where ``xp`` computes: NumPy float32, or uploaded once to the GPU."""
        if xp is np:
            if self.compute_dtype != np.float32:
                raise ValueError(f"compute_dtype {self.compute_dtype} needs CuPy inputs; "
                                 f"the NumPy path computes in float32")
            return self._convs
        if self._device_convs is None:
            self._device_convs = tuple(None if conv is None else conv.to(xp, self.compute_dtype)
                                       for conv in self._convs)
        return self._device_convs

    def run(self, features: Array, coords: Array, sparse_shape: Triple) -> Array:
        """Voxel features fp16/float32 [M, C_in], coords int32 [M, 4] (0, x, y, z) on ``sparse_shape``
        (X, Y, Z) -> ``output_dtype`` C-contiguous output of the last node, e.g. BEV
        [1, C_out * Z_out, X_out, Y_out]. CuPy inputs (either one) -> CuPy output, on the GPU
        throughout; NumPy inputs -> NumPy output.

        Raises ValueError for malformed, out-of-grid or duplicate coordinates, or inputs that do not
        fit the graph's first layer.
        """
        if tuple(sparse_shape) != self.input_spatial_shape or features.shape[-1] != self.input_channels:
            raise ValueError(f"graph expects {self.input_channels} channels on grid "
                             f"{self.input_spatial_shape}, got features {features.shape} on "
                             f"{tuple(sparse_shape)}")
        xp = get_array_module(features, coords)
        convs = self._convs_for(xp)
        tensors: dict[str, Union[SparseTensor, Array]] = {self.nodes[0].inputs[0]: sparse_input(
            xp.asarray(features), xp.asarray(coords), sparse_shape, self.compute_dtype)}
        rulebooks: dict[str, Rulebook] = {}
        tables = SiteTables()
        skipped: set[int] = set()
        for index, (node, conv) in enumerate(zip(self.nodes, convs)):
            if index in skipped:
                continue
            inputs = [tensors[name] for name in _data_inputs(node)]
            fusion = self._fusions.get(index)
            if conv is None:
                tensors[node.outputs[0]] = _TENSOR_OPS[node.op_type](node, *inputs)  # type: ignore[operator]
            elif fusion is None:
                tensors[node.outputs[0]] = conv(inputs[0], rulebooks,  # type: ignore[arg-type]
                                                tables=tables)
            else:
                tensors[fusion.output] = conv(inputs[0], rulebooks,  # type: ignore[arg-type]
                                              tensors[fusion.residual], fusion.relu,  # type: ignore[arg-type]
                                              tables)
                skipped.update(fusion.skipped)
        result = tensors[self.nodes[-1].outputs[0]]
        return xp.ascontiguousarray(result.features if isinstance(result, SparseTensor) else result,
                                    dtype=self.output_dtype)
