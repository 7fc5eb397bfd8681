"""BN folding, the SCN graph of a :class:`SparseEncoder`, its PyTorch runner and the ONNX writer.

Writes ``lidar.backbone.xyz.onnx`` as CUDA-BEVFusion's exporter does (spec 5.3/5.4;
``CUDA-BEVFusion/qat/export-scn.py``, ``CUDA-BEVFusion/qat/lean/exptool.py``,
``CUDA-BEVFusion/qat/lean/funcs.py``):

- every conv+BN pair becomes one ``SparseConvolution`` with folded weight and bias; a conv followed by
  a ReLU gets ``activation="ReLU"`` (``layer_fusion_bn_relu``); a basic block becomes
  conv1 (ReLU), conv2 (None), ``Add(conv2, block input)``, ``Relu``;
- tensor ids are assigned in creation order ("0" = graph input), node names are
  ``<op><i>`` with one counter per op (conv, add, relu, scatter, transpose, reshape);
- precision "int8" everywhere except ``conv_input`` precision "fp16" and ``conv_out``
  output_precision "fp16"; ``output_bound`` 200000; ``input_shape``/``output_shape`` are the
  [1, C] feature shapes of NVIDIA's one-voxel trace (informational only);
- dynamic ranges (int8 scale = amax / 127): ``weight_dynamic_ranges`` = per-output-channel amax of
  the folded weight, ``input_dynamic_range`` = amax of the conv's input over the calibration
  frames, ``input0/1_dynamic_range`` of an ``Add`` = amax over both of its inputs (one shared
  quantizer in ``QuantAdd``). Calibration uses max, not NVIDIA's histogram calibrator.

The graph runner executes parsed or freshly built nodes with the sparse primitives of
:mod:`bevfusion_ros.model.sparse_encoder` in the dtype of the input features (fp16 weights are
widened), sharing rulebooks by the ``rulebook`` attribute like libspconv.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from bevfusion_ros.lidar.scn_graph import SPARSE_CONVOLUTION, WEIGHT_TO_ONNX, ScnLayer, ScnNode, layer_attributes
from bevfusion_ros.model.presets import ModelPreset
from bevfusion_ros.model.sparse_encoder import (
    SparseBasicBlock,
    SparseConvolution,
    SparseEncoder,
    SparseVoxelTensor,
    Triple,
    cached_rulebook,
    conv_output_shape,
    scatter_dense,
    sparse_conv,
    sparse_input,
    voxel_sample_inputs,
)

OUTPUT_BOUND = 200000
DEFAULT_CALIBRATION_VOXELS = 1000   # synthetic frame used when no calibration frames are given
DEFAULT_CALIBRATION_SEED = 0

NodeInputsObserver = Callable[[ScnNode, list[torch.Tensor]], None]
VoxelFrame = tuple[torch.Tensor, torch.Tensor]     # voxel_features [M, 5], voxel_coords int [M, 4]


def fold_conv_bn(conv: SparseConvolution, bn: nn.BatchNorm1d, activation: str,
                 input_spatial_shape: Triple) -> ScnLayer:
    """Conv (no bias) + eval-mode BN -> one layer with bias.

    w' = w * s, b' = beta - mean * s, s = gamma / sqrt(var + eps); computed in float64, stored
    float32; weight [kx, ky, kz, I, O] with s applied along O.
    """
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.detach().double() * scale
    bias = bn.bias.detach().double() - bn.running_mean.double() * scale
    output_spatial_shape = input_spatial_shape if conv.subm else conv_output_shape(
        input_spatial_shape, conv.kernel_size, conv.stride, conv.padding)
    return ScnLayer(weight=weight.float().numpy(), bias=bias.float().numpy(),
                    kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    subm=conv.subm, rulebook=conv.indice_key, activation=activation,
                    input_spatial_shape=tuple(input_spatial_shape),
                    output_spatial_shape=tuple(output_spatial_shape))


class _GraphBuilder:
    """Appends :class:`ScnNode` records, numbering tensors and node names like exptool.py."""

    def __init__(self) -> None:
        self.nodes: list[ScnNode] = []
        self._next_tensor = 1            # "0" is the graph input
        self._op_counts: Counter[str] = Counter()

    def _emit(self, op_type: str, prefix: str, inputs: tuple[str, ...], attributes: dict,
              layer: Optional[ScnLayer] = None) -> str:
        index = self._op_counts[prefix]
        self._op_counts[prefix] += 1
        output = str(self._next_tensor)
        self._next_tensor += 1
        if layer is not None:
            inputs = (*inputs, f"spconv{index}.weight", f"spconv{index}.bias")
        self.nodes.append(ScnNode(op_type, f"{prefix}{index}", inputs, (output,), attributes, layer))
        return output

    def conv(self, layer: ScnLayer, x: str, precision: str = "int8", output_precision: str = "int8") -> str:
        weight_ranges = np.abs(layer.weight).max(axis=(0, 1, 2, 3))
        attributes = {"output_bound": OUTPUT_BOUND, "input_shape": (1, layer.in_channels),
                      "output_shape": (1, layer.out_channels), "precision": precision,
                      "output_precision": output_precision,
                      "weight_dynamic_ranges": tuple(float(v) for v in weight_ranges)}
        return self._emit(SPARSE_CONVOLUTION, "conv", (x,), attributes, layer)

    def add(self, a: str, b: str) -> str:
        return self._emit("Add", "add", (a, b), {"precision": "int8", "output_precision": "int8"})

    def relu(self, x: str) -> str:
        return self._emit("Relu", "relu", (x,), {})

    def to_bev(self, x: str, channels: int, spatial_shape: Triple) -> str:
        """ScatterDense [1,C,X,Y,Z] -> Transpose (0,1,4,2,3) -> Reshape [1, C*Z, X, Y]."""
        size_x, size_y, size_z = spatial_shape
        x = self._emit("ScatterDense", "scatter", (x,), {
            "input_spatial_shape": tuple(spatial_shape), "format": "xyz",
            "output_shape": (1, channels, *spatial_shape)})
        x = self._emit("Transpose", "transpose", (x,), {"dims": (0, 1, 4, 2, 3)})
        return self._emit("Reshape", "reshape", (x,), {"dims": (1, channels * size_z, size_x, size_y)})


def _fold_sequential(unit: nn.Sequential, spatial_shape: Triple) -> ScnLayer:
    """A ``make_sparse_convmodule`` Sequential (conv, BN, ReLU) as one layer with fused ReLU."""
    conv, bn, relu = unit
    if not (isinstance(conv, SparseConvolution) and isinstance(bn, nn.BatchNorm1d)
            and isinstance(relu, nn.ReLU)):
        raise TypeError(f"expected (SparseConvolution, BatchNorm1d, ReLU), got {unit}")
    return fold_conv_bn(conv, bn, "ReLU", spatial_shape)


def scn_graph_from_encoder(encoder: SparseEncoder) -> list[ScnNode]:
    """The 40-node SCN graph of ``encoder`` (spec 5.4 order), BN folded, without input dynamic ranges."""
    builder = _GraphBuilder()
    layer = _fold_sequential(encoder.conv_input, encoder.sparse_shape)
    x = builder.conv(layer, "0", precision="fp16")
    for stage in encoder.encoder_layers:
        for unit in stage:
            if isinstance(unit, SparseBasicBlock):
                shape = layer.output_spatial_shape
                hidden = builder.conv(fold_conv_bn(unit.conv1, unit.bn1, "ReLU", shape), x)
                layer = fold_conv_bn(unit.conv2, unit.bn2, "None", shape)
                x = builder.relu(builder.add(builder.conv(layer, hidden), x))
            else:
                layer = _fold_sequential(unit, layer.output_spatial_shape)
                x = builder.conv(layer, x)
    layer = _fold_sequential(encoder.conv_out, layer.output_spatial_shape)
    x = builder.conv(layer, x, output_precision="fp16")
    builder.to_bev(x, layer.out_channels, layer.output_spatial_shape)
    return builder.nodes


def _run_conv(node: ScnNode, x: SparseVoxelTensor) -> SparseVoxelTensor:
    layer = node.layer
    if tuple(x.spatial_shape) != tuple(layer.input_spatial_shape):
        raise ValueError(f"{node.name}: input grid {x.spatial_shape}, "
                         f"layer expects {layer.input_spatial_shape}")
    rulebook = cached_rulebook(x, layer.kernel_size, layer.stride, layer.padding, layer.subm, layer.rulebook)
    dtype = x.features.dtype
    out = sparse_conv(x.features, torch.from_numpy(layer.weight).to(dtype), rulebook,
                      torch.from_numpy(layer.bias).to(dtype))
    if layer.activation == "ReLU":
        out = torch.relu(out)
    return SparseVoxelTensor(out, rulebook.out_coords, rulebook.out_spatial_shape, x.rulebooks)


def _run_add(node: ScnNode, a: SparseVoxelTensor, b: SparseVoxelTensor) -> SparseVoxelTensor:
    if not torch.equal(a.coords, b.coords):
        raise ValueError(f"{node.name}: Add inputs have different sites")
    return a.replace_features(a.features + b.features)


def _run_scatter_dense(node: ScnNode, x: SparseVoxelTensor) -> torch.Tensor:
    grid, layout, shape = (node.attributes[k] for k in ("input_spatial_shape", "format", "output_shape"))
    if layout != "xyz" or tuple(x.spatial_shape) != tuple(grid):
        raise ValueError(f"{node.name}: expected format 'xyz' on grid {x.spatial_shape}, "
                         f"got {layout!r} on {grid}")
    dense = scatter_dense(x.features, x.coords, x.spatial_shape)
    if tuple(dense.shape) != tuple(shape):
        raise ValueError(f"{node.name}: dense shape {tuple(dense.shape)} != {shape}")
    return dense


_EXECUTORS = {
    SPARSE_CONVOLUTION: _run_conv,
    "Add": _run_add,
    "Relu": lambda node, x: x.replace_features(torch.relu(x.features)),
    "ScatterDense": _run_scatter_dense,
    "Transpose": lambda node, x: x.permute(*node.attributes["dims"]),
    "Reshape": lambda node, x: x.reshape(*node.attributes["dims"]),
}


def _features(value: Union[SparseVoxelTensor, torch.Tensor]) -> torch.Tensor:
    return value.features if isinstance(value, SparseVoxelTensor) else value


def run_scn_graph(nodes: list[ScnNode], voxel_features: torch.Tensor, voxel_coords: torch.Tensor,
                  spatial_shape: Triple, on_node_inputs: Optional[NodeInputsObserver] = None) -> torch.Tensor:
    """Execute an SCN graph on one frame; returns the last node's output (e.g. BEV [1, 256, 180, 180]).

    voxel_features [M, C_in], voxel_coords int [M, 4] = (0, x, y, z), ``spatial_shape`` the grid
    passed to libspconv's ``set_grid_size`` (e.g. 1440, 1440, 41). ``on_node_inputs(node, tensors)``
    sees each node's data inputs (sparse features [N, C] or dense tensors) before it runs.
    """
    tensors: dict[str, Union[SparseVoxelTensor, torch.Tensor]] = {
        nodes[0].inputs[0]: sparse_input(voxel_features, voxel_coords, spatial_shape)}
    for node in nodes:
        inputs = [tensors[name] for name in node.inputs[:2 if node.op_type == "Add" else 1]]
        if on_node_inputs is not None:
            on_node_inputs(node, [_features(value) for value in inputs])
        tensors[node.outputs[0]] = _EXECUTORS[node.op_type](node, *inputs)
    return tensors[nodes[-1].outputs[0]]


def calibrate_input_ranges(nodes: list[ScnNode], calibration_inputs: Iterable[VoxelFrame],
                           spatial_shape: Triple) -> dict[str, float]:
    """amax of every conv's input and of both inputs of every Add, over all frames: {node name: amax}."""
    amax: dict[str, float] = {}

    def observe(node: ScnNode, inputs: list[torch.Tensor]) -> None:
        if node.op_type in (SPARSE_CONVOLUTION, "Add"):
            value = max((float(t.abs().max()) for t in inputs if t.numel()), default=0.0)
            amax[node.name] = max(amax.get(node.name, 0.0), value)

    with torch.no_grad():
        for features, coords in calibration_inputs:
            run_scn_graph(nodes, features.float(), coords, spatial_shape, observe)
    return amax


def with_input_ranges(nodes: list[ScnNode], amax: dict[str, float]) -> list[ScnNode]:
    """Copies of ``nodes`` with ``input_dynamic_range`` (convs) / ``input{0,1}_dynamic_range`` (Adds)."""
    def ranged(node: ScnNode) -> ScnNode:
        if node.op_type == SPARSE_CONVOLUTION:
            extra = {"input_dynamic_range": amax[node.name]}
        elif node.op_type == "Add":
            extra = {"input0_dynamic_range": amax[node.name], "input1_dynamic_range": amax[node.name]}
        else:
            return node
        return dataclasses.replace(node, attributes={**node.attributes, **extra})
    return [ranged(node) for node in nodes]


def _fp16_initializer(array: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float16), name)


def _onnx_node(node: ScnNode) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """NodeProto with all attributes, plus the fp16 weight [O, kx, ky, kz, I] and bias of a conv."""
    attributes = dict(node.attributes)
    initializers = []
    if node.layer is not None:
        attributes.update(layer_attributes(node.layer))
        initializers = [_fp16_initializer(node.layer.weight.transpose(WEIGHT_TO_ONNX), node.inputs[1]),
                        _fp16_initializer(node.layer.bias, node.inputs[2])]
    return helper.make_node(node.op_type, list(node.inputs), list(node.outputs), node.name,
                            **attributes), initializers


def scn_model_proto(nodes: list[ScnNode]) -> onnx.ModelProto:
    """The ONNX model of a complete graph: input "0" fp16 [1, C_in], output fp16 = last Reshape dims."""
    protos = [_onnx_node(node) for node in nodes]
    in_channels = nodes[0].layer.in_channels
    graph = helper.make_graph(
        [proto for proto, _ in protos], "scn",
        [helper.make_tensor_value_info(nodes[0].inputs[0], onnx.TensorProto.FLOAT16, [1, in_channels])],
        [helper.make_tensor_value_info(nodes[-1].outputs[0], onnx.TensorProto.FLOAT16,
                                       list(nodes[-1].attributes["dims"]))],
        initializer=[tensor for _, tensors in protos for tensor in tensors])
    return helper.make_model(graph, opset_imports=[helper.make_operatorsetid("ai.onnx", 11)],
                             producer_name="pytorch", producer_version="1.9")


def write_scn_onnx(encoder: SparseEncoder, preset: ModelPreset, path: Union[str, Path],
                   calibration_inputs: Optional[Iterable[VoxelFrame]] = None) -> list[ScnNode]:
    """Write ``encoder`` as CUDA-BEVFusion's ``lidar.backbone.xyz.onnx`` to ``path``; return the nodes.

    ``calibration_inputs``: frames (voxel_features [M, 5], voxel_coords [M, 4]) for the int8 input
    ranges. Default: one synthetic frame, ``voxel_sample_inputs(preset, 0, 1000)``. Its ranges are
    placeholders: fine for fp16 runs (the engine-level precision overrides the per-layer int8
    attributes), but an int8 run needs real lidar frames here.
    """
    sparse_shape = preset.pipeline.voxelization.sparse_shape
    if tuple(encoder.sparse_shape) != tuple(sparse_shape):
        raise ValueError(f"encoder grid {encoder.sparse_shape} != preset {preset.name} grid {sparse_shape}")
    if calibration_inputs is None:
        calibration_inputs = [
            voxel_sample_inputs(preset, DEFAULT_CALIBRATION_SEED, DEFAULT_CALIBRATION_VOXELS)]
    nodes = scn_graph_from_encoder(encoder)
    nodes = with_input_ranges(nodes, calibrate_input_ranges(nodes, calibration_inputs, sparse_shape))
    onnx.save(scn_model_proto(nodes), str(path))
    return nodes
