"""Post-training int8 quantization of a float ONNX graph with explicit Q/DQ nodes.

This writes the form of CUDA-BEVFusion's ``resnet50int8`` files (spec 2.7): before every
``Conv`` / ``ConvTranspose`` the activation passes through ``QuantizeLinear`` ->
``DequantizeLinear`` (per-tensor, symmetric, zero point 0) and the weight is stored as an int8
initializer followed by a per-output-channel ``DequantizeLinear`` (symmetric, zero point 0).
Biases, softmax, transposes and every other op stay float, so TensorRT builds int8 kernels
only where the Q/DQ pairs say so.

Scales come from a calibration pass: the graph runs in ONNX Runtime on sample inputs and
each quantized activation's scale is ``amax / 127`` with ``amax`` the largest absolute value
seen (max calibration; NVIDIA used histogram + MSE over 300 batches, which clips outliers —
with random weights and few samples max calibration is the honest choice).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

QUANTIZED_OPS = ("Conv", "ConvTranspose")
INT8_MAX = 127.0


@dataclass(frozen=True)
class QuantizationReport:
    """What :func:`quantize_qdq` did: quantized node names and their activation amax."""

    activation_amax: dict[str, float]     # activation tensor name -> calibrated amax
    quantized_nodes: tuple[str, ...]
    skipped_nodes: tuple[str, ...]


def calibrate_activation_amax(model: onnx.ModelProto, tensor_names: Sequence[str],
                              samples: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Run ``model`` in ONNX Runtime on ``samples`` and return max |x| of each named tensor."""
    import onnxruntime

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing_outputs = {output.name for output in probe.graph.output}
    for name in tensor_names:
        if name not in existing_outputs:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(probe.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    amax = dict.fromkeys(tensor_names, 0.0)
    for sample in samples:
        values = session.run(list(tensor_names), dict(sample))
        for name, value in zip(tensor_names, values):
            amax[name] = max(amax[name], float(np.abs(value).max()))
    return amax


def _scale(amax: float | np.ndarray) -> np.ndarray:
    """Symmetric int8 scale amax/127, never zero (an all-zero tensor keeps scale 1/127)."""
    return (np.maximum(np.asarray(amax, dtype=np.float32), 1e-8) / INT8_MAX).astype(np.float32)


def _quantize_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric int8 weight and its scales along ``axis``."""
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
    scale = _scale(np.abs(weight).max(axis=reduce_axes))
    shape = [1] * weight.ndim
    shape[axis] = -1
    quantized = np.clip(np.rint(weight / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return quantized, scale


def _weight_axis(node: onnx.NodeProto) -> int:
    """Output-channel axis of a conv weight: 0 for Conv [O,I,k..], 1 for ConvTranspose [I,O,k..].

    NVIDIA's axis for the ConvTranspose quantizer is not documented (spec 10.5); the output
    channel is the only axis that keeps per-channel scales meaningful after BN folding.
    """
    return 1 if node.op_type == "ConvTranspose" else 0


def quantize_qdq(model: onnx.ModelProto, samples: Iterable[Mapping[str, np.ndarray]],
                 skip_nodes: Sequence[str] = ()) -> tuple[onnx.ModelProto, QuantizationReport]:
    """Return a copy of ``model`` with Q/DQ before every Conv/ConvTranspose not in ``skip_nodes``.

    ``skip_nodes`` are node names or the names of their weight initializers (which carry the
    PyTorch parameter path, e.g. ``decoder.neck.deblocks.0.0.weight``), for layers whose
    quantization NVIDIA disabled after calibration.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    targets, skipped = [], []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        if node.name in skip_nodes or node.input[1] in skip_nodes or node.input[1] not in initializers:
            skipped.append(node.name)
        else:
            targets.append(node)
    activations = sorted({node.input[0] for node in targets})
    amax = calibrate_activation_amax(model, activations, samples)

    quantized = onnx.ModelProto()
    quantized.CopyFrom(model)
    graph = quantized.graph
    new_initializers: list[onnx.TensorProto] = []
    dequantized_activation = {name: _add_activation_qdq(graph, name, amax[name], new_initializers)
                              for name in activations}
    target_names = {node.name for node in targets}
    for node in graph.node:
        if node.name in target_names:
            node.input[0] = dequantized_activation[node.input[0]]
            node.input[1] = _add_weight_dq(graph, initializers[node.input[1]], _weight_axis(node),
                                           new_initializers)
    graph.initializer.extend(new_initializers)
    _drop_unused_initializers(graph)
    _topologically_sort(graph)
    onnx.checker.check_model(quantized)
    return quantized, QuantizationReport(amax, tuple(sorted(target_names)), tuple(skipped))


def _add_activation_qdq(graph: onnx.GraphProto, name: str, amax: float,
                        new_initializers: list[onnx.TensorProto]) -> str:
    """Insert QuantizeLinear -> DequantizeLinear on activation ``name``; return the DQ output."""
    scale_name, zero_name = f"{name}_act_scale", f"{name}_act_zero_point"
    new_initializers += [numpy_helper.from_array(_scale(amax).reshape(()), scale_name),
                         numpy_helper.from_array(np.zeros((), np.int8), zero_name)]
    quantized_name, dequantized_name = f"{name}_quantized", f"{name}_dequantized"
    graph.node.extend([
        helper.make_node("QuantizeLinear", [name, scale_name, zero_name], [quantized_name],
                         name=f"{name}_QuantizeLinear"),
        helper.make_node("DequantizeLinear", [quantized_name, scale_name, zero_name],
                         [dequantized_name], name=f"{name}_DequantizeLinear"),
    ])
    return dequantized_name


def _add_weight_dq(graph: onnx.GraphProto, weight: onnx.TensorProto, axis: int,
                   new_initializers: list[onnx.TensorProto]) -> str:
    """Store ``weight`` as int8 + per-channel DequantizeLinear; return the DQ output name."""
    quantized, scale = _quantize_weight(numpy_helper.to_array(weight), axis)
    int8_name, scale_name = f"{weight.name}_int8", f"{weight.name}_scale"
    zero_name, output_name = f"{weight.name}_zero_point", f"{weight.name}_dequantized"
    new_initializers += [numpy_helper.from_array(quantized, int8_name),
                         numpy_helper.from_array(scale, scale_name),
                         numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), zero_name)]
    graph.node.append(helper.make_node("DequantizeLinear", [int8_name, scale_name, zero_name],
                                       [output_name], name=f"{weight.name}_DequantizeLinear",
                                       axis=axis))
    return output_name


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    kept = [_copy(init) for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _topologically_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so every input is produced before it is consumed (ONNX requires it)."""
    available = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    available.add("")
    pending, ordered = [_copy(node) for node in graph.node], []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise ValueError("graph has a cycle or an undefined input: "
                             f"{sorted({n for node in pending for n in node.input} - available)[:5]}")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        ready_ids = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def _copy(message):
    """Detached copy of a protobuf message (elements removed from a repeated field die with it)."""
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate
