"""CUDA-BEVFusion SCN graph (``lidar.backbone.xyz.onnx``, spec 5.3/5.4): records and parser.

numpy + onnx only (no torch): this is the deploy side's reader. The attribute set of a
``SparseConvolution`` node is encoded and decoded here (:func:`layer_attributes`,
:func:`layer_from_attributes`) so that the writer (``bevfusion_ros.model.scn_onnx``) and this
reader agree by construction.

Format facts (``CUDA-BEVFusion/qat/lean/exptool.py`` writer, ``CUDA-BEVFusion/qat/export-scn.py``,
``CUDA-BEVFusion/src/bevfusion/lidar-scn-onnx-parser.cpp`` reader):

- custom ops in the default domain: ``SparseConvolution``, ``Add``, ``Relu``, ``ScatterDense``,
  ``Transpose``, ``Reshape``; tensor names are decimal strings, graph input ``"0"``;
- a ``SparseConvolution`` has inputs (x, ``spconv<i>.weight``, ``spconv<i>.bias``); both initializers
  FLOAT16 raw data, the weight [O, kx, ky, kz, I] = mmdet3d's [kx, ky, kz, I, O] permuted (4,0,1,2,3);
- string attributes are bytes in ONNX and decoded to ``str`` here; int/float lists become tuples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bevfusion_ros.engines.base import EngineError

Triple = tuple[int, int, int]

SPARSE_CONVOLUTION = "SparseConvolution"
SUPPORTED_OPS = (SPARSE_CONVOLUTION, "Add", "Relu", "ScatterDense", "Transpose", "Reshape")
ACTIVATIONS = ("ReLU", "None")
WEIGHT_TO_ONNX = (4, 0, 1, 2, 3)   # [kx, ky, kz, I, O] -> [O, kx, ky, kz, I]
WEIGHT_FROM_ONNX = (1, 2, 3, 4, 0)  # [O, kx, ky, kz, I] -> [kx, ky, kz, I, O]

# Attributes fixed by this model family: no dilation, deconvolution, inverse or grouped conv.
_FIXED_CONV_ATTRIBUTES = {"ndim": 3, "dilation": (1, 1, 1), "output_padding": (0, 0, 0),
                          "transposed": 0, "inverse": 0, "groups": 1}


@dataclass(frozen=True, eq=False)
class ScnLayer:
    """One sparse convolution with batch norm folded in (fused ReLU in ``activation``).

    weight [kx, ky, kz, I, O] (mmdet3d spconv layout), bias [O]; kernel/stride/padding and the
    spatial shapes per axis x, y, z. ``rulebook`` is the spconv ``indice_key`` shared by layers
    with equal index pairs. Output = act(sum over taps of input @ weight[tap] + bias).
    """

    weight: np.ndarray
    bias: np.ndarray
    kernel_size: Triple
    stride: Triple
    padding: Triple
    subm: bool
    rulebook: str
    activation: str
    input_spatial_shape: Triple
    output_spatial_shape: Triple

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[3])

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[4])


@dataclass(frozen=True, eq=False)
class ScnNode:
    """One graph node: op type, node name, ONNX input/output tensor names, attributes.

    For ``SparseConvolution`` the structural attributes live in ``layer`` and ``attributes`` holds
    the rest (precisions, dynamic ranges, output_bound, trace shapes); other ops have ``layer=None``.
    """

    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, Any] = field(default_factory=dict)
    layer: Optional[ScnLayer] = None


def layer_attributes(layer: ScnLayer) -> dict[str, Any]:
    """The structural ``SparseConvolution`` attributes of ``layer`` (spec 5.3 table)."""
    return {
        **_FIXED_CONV_ATTRIBUTES,
        "input_spatial_shape": tuple(layer.input_spatial_shape),
        "output_spatial_shape": tuple(layer.output_spatial_shape),
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel_size": tuple(layer.kernel_size),
        "stride": tuple(layer.stride),
        "padding": tuple(layer.padding),
        "subm": int(layer.subm),
        "rulebook": layer.rulebook,
        "activation": layer.activation,
    }


LAYER_ATTRIBUTE_NAMES = frozenset(_FIXED_CONV_ATTRIBUTES) | {
    "input_spatial_shape", "output_spatial_shape", "in_channels", "out_channels", "kernel_size",
    "stride", "padding", "subm", "rulebook", "activation"}


def layer_from_attributes(node_name: str, attributes: dict[str, Any], weight_oxyzi: np.ndarray,
                          bias: np.ndarray) -> ScnLayer:
    """Rebuild a :class:`ScnLayer` from decoded attributes and the ONNX weight [O, kx, ky, kz, I]."""
    missing = sorted(LAYER_ATTRIBUTE_NAMES - set(attributes))
    if missing:
        raise ValueError(f"{node_name}: missing attribute(s) {missing}")
    for name, value in _FIXED_CONV_ATTRIBUTES.items():
        if attributes[name] != value:
            raise ValueError(f"{node_name}: unsupported {name}={attributes[name]!r} (need {value!r})")
    if attributes["activation"] not in ACTIVATIONS:
        raise ValueError(f"{node_name}: unknown activation {attributes['activation']!r}")
    layer = ScnLayer(
        weight=np.ascontiguousarray(weight_oxyzi.transpose(WEIGHT_FROM_ONNX)), bias=bias,
        kernel_size=attributes["kernel_size"], stride=attributes["stride"],
        padding=attributes["padding"], subm=bool(attributes["subm"]), rulebook=attributes["rulebook"],
        activation=attributes["activation"], input_spatial_shape=attributes["input_spatial_shape"],
        output_spatial_shape=attributes["output_spatial_shape"])
    expected = (*layer.kernel_size, attributes["in_channels"], attributes["out_channels"])
    if layer.weight.shape != expected or layer.bias.shape != (attributes["out_channels"],):
        raise ValueError(f"{node_name}: weight {weight_oxyzi.shape} / bias {bias.shape} do not match "
                         f"kernel {layer.kernel_size} and channels "
                         f"{attributes['in_channels']}->{attributes['out_channels']}")
    return layer


def _decode_attribute(attribute: onnx.AttributeProto) -> Any:
    """ONNX attribute -> Python: bytes -> str, lists -> tuples."""
    value = helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return tuple(item.decode() if isinstance(item, bytes) else item for item in value)
    return value


def _fp16_initializer(initializers: dict[str, onnx.TensorProto], name: str, node_name: str) -> np.ndarray:
    """An initializer as float16 ndarray; like libspconv's parser, only FLOAT16 is accepted."""
    if name not in initializers:
        raise ValueError(f"{node_name}: initializer {name!r} not found")
    tensor = initializers[name]
    if tensor.data_type != onnx.TensorProto.FLOAT16:
        raise ValueError(f"{node_name}: initializer {name!r} has data type "
                         f"{onnx.TensorProto.DataType.Name(tensor.data_type)}, only FLOAT16 is supported")
    return np.array(numpy_helper.to_array(tensor))  # writable copy (raw data arrives read-only)


def _read_node(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> ScnNode:
    if node.op_type not in SUPPORTED_OPS:
        raise ValueError(f"{node.name}: unsupported op {node.op_type!r}; supported: {SUPPORTED_OPS}")
    attributes = {attribute.name: _decode_attribute(attribute) for attribute in node.attribute}
    layer = None
    if node.op_type == SPARSE_CONVOLUTION:
        if len(node.input) != 3:
            raise ValueError(f"{node.name}: expected inputs (x, weight, bias), got {list(node.input)}")
        layer = layer_from_attributes(node.name, attributes,
                                      _fp16_initializer(initializers, node.input[1], node.name),
                                      _fp16_initializer(initializers, node.input[2], node.name))
        attributes = {k: v for k, v in attributes.items() if k not in LAYER_ATTRIBUTE_NAMES}
    return ScnNode(node.op_type, node.name, tuple(node.input), tuple(node.output), attributes, layer)


def read_scn_onnx(path: Union[str, Path]) -> list[ScnNode]:
    """Parse ``lidar.backbone.xyz.onnx`` into nodes in graph order (weights float16 [kx,ky,kz,I,O]).

    Raises ValueError for ops, attributes or initializer types that libspconv would not run.
    """
    try:
        graph = onnx.load(str(path)).graph
    except Exception as error:  # onnx raises DecodeError, OSError, ValueError, ...
        raise EngineError(f"cannot load model file {path}: {error}") from error
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    return [_read_node(node, initializers) for node in graph.node]
