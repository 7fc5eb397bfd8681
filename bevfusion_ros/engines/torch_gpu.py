"""PyTorch backend: a small ONNX interpreter as a ``torch.nn.Module``, on CUDA or the CPU.

:class:`OnnxModule` turns one ONNX graph (opset 13-17, static shapes) into a module that runs
its nodes in file order, with constants folded and shape inputs read at build time, so a forward
pass never synchronizes with the GPU and can be captured in a CUDA graph. It supports exactly
the ops of the graphs ``bevfusion-export`` writes; anything else raises :class:`EngineError`
naming the node. Build-time folding, numerics (dtype, Q/DQ emulation, channels-last, fused conv
+ ReLU) and the op list: docs/pipeline.md, "PyTorch backend".

:class:`TorchEngine` wraps a module behind :class:`Engine` and can replay it as a CUDA graph.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper, shape_inference

from bevfusion_ros.engines.base import EngineError, FileEngine, Shape, TensorSpec
from bevfusion_ros.runtime.array_module import is_cupy

SUPPORTED_OPSETS = range(13, 18)
"""Default-domain opset versions whose op semantics the interpreter implements."""

_TORCH_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
    TensorProto.DOUBLE: torch.float64, TensorProto.INT64: torch.int64,
    TensorProto.INT32: torch.int32, TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8, TensorProto.BOOL: torch.bool}
_QUANTIZED_TYPES = {np.dtype(np.int8): (torch.int8, -128, 127), np.dtype(np.uint8): (torch.uint8, 0, 255)}
"""Zero-point element type -> (quantized torch dtype, lowest, highest)."""

OpFunction = Callable[..., Any]
"""A compiled node: tensors for its non-static inputs, in input order -> tensor or tuple."""


# --------------------------------------------------------------------------------------------
# Op registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _BuildContext:
    """What an op builder sees: the node, its attributes and the graph's constants so far."""

    node: onnx.NodeProto
    constants: Mapping[str, np.ndarray]
    float_dtype: torch.dtype

    @functools.cached_property
    def attrs(self) -> dict[str, Any]:
        values = {attr.name: helper.get_attribute_value(attr) for attr in self.node.attribute}
        return {name: value.decode() if isinstance(value, bytes) else value
                for name, value in values.items()}

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def input_name(self, position: int) -> str:
        """Name of input ``position``; ``""`` when the optional input is absent."""
        return self.node.input[position] if position < len(self.node.input) else ""

    def constant(self, position: int) -> np.ndarray | None:
        """Value of input ``position`` if it is a constant, else ``None``."""
        return self.constants.get(self.input_name(position))

    def static(self, position: int) -> np.ndarray | None:
        """Host value of a steering input; ``None`` when absent; an error when not constant."""
        name = self.input_name(position)
        if not name:
            return None
        if name not in self.constants:
            raise self.error(f"input {position} ('{name}') must be a constant (static graphs only)")
        return self.constants[name]

    def required(self, position: int) -> np.ndarray:
        """Host value of a steering input that must be present."""
        value = self.static(position)
        if value is None:
            raise self.error(f"input {position} is required")
        return value

    def error(self, message: str) -> EngineError:
        return EngineError(f"{self.node.op_type} node '{self.node.name}': {message}")


@dataclass(frozen=True)
class _OpDef:
    """An op: its builder and how its inputs are treated.

    ``static`` positions are read on the host by the builder and not passed at run time;
    constants at ``float32`` positions are stored as float32 whatever the module's dtype
    (quantization scales and zero points); the constant at ``weight`` is a conv weight.
    """

    build: Callable[[_BuildContext], OpFunction]
    static: frozenset[int] = frozenset()
    float32: frozenset[int] = frozenset()
    weight: int | None = None


_OPS: dict[str, _OpDef] = {}


def _op(name: str, static: Sequence[int] = (), float32: Sequence[int] = (),
        weight: int | None = None) -> Callable[[Callable[[_BuildContext], OpFunction]],
                                                Callable[[_BuildContext], OpFunction]]:
    """Register the decorated builder for ONNX op ``name``."""
    def register(build: Callable[[_BuildContext], OpFunction]) -> Callable[[_BuildContext], OpFunction]:
        _OPS[name] = _OpDef(build, frozenset(static), frozenset(float32), weight)
        return build
    return register


def _register_plain(name: str, function: OpFunction) -> None:
    """An op without attributes that maps 1:1 onto a torch function."""
    _OPS[name] = _OpDef(lambda ctx: function)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


_PLAIN_OPS: dict[str, OpFunction] = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Sqrt": torch.sqrt, "Add": torch.add,
    "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow, "MatMul": torch.matmul,
    "Equal": torch.eq, "Where": torch.where, "Identity": _identity}
for _name, _function in _PLAIN_OPS.items():
    _register_plain(_name, _function)


def torch_dtype(onnx_type: int, float_dtype: torch.dtype) -> torch.dtype:
    """Torch dtype of an ONNX element type; every float type becomes ``float_dtype``."""
    if onnx_type not in _TORCH_DTYPES:
        raise EngineError(f"unsupported ONNX element type {TensorProto.DataType.Name(onnx_type)}")
    dtype = _TORCH_DTYPES[onnx_type]
    return float_dtype if dtype.is_floating_point else dtype


# --------------------------------------------------------------------------------------------
# Op builders
# --------------------------------------------------------------------------------------------

@_op("Div")
def _build_div(ctx: _BuildContext) -> OpFunction:
    """Float division, or integer division truncating toward zero as ONNX defines it."""
    def divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a / b if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc")
    return divide


def _spatial_rank(ctx: _BuildContext) -> int:
    """Number of spatial dims of a conv/pool node (from ``kernel_shape`` or the weight)."""
    kernel = ctx.attr("kernel_shape")
    if kernel is not None:
        return len(kernel)
    weight = ctx.constant(1)
    if weight is None:
        raise ctx.error("needs kernel_shape or a constant weight")
    return weight.ndim - 2


def _symmetric_pads(ctx: _BuildContext, rank: int) -> tuple[int, ...]:
    """The ``pads`` attribute as torch's per-dimension padding (begin must equal end)."""
    if ctx.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ctx.error(f"auto_pad={ctx.attr('auto_pad')} is not supported")
    pads = list(ctx.attr("pads", [0] * 2 * rank))
    if pads[:rank] != pads[rank:]:
        raise ctx.error(f"asymmetric pads {pads} are not supported")
    return tuple(pads[:rank])


def _conv_options(ctx: _BuildContext, rank: int) -> dict[str, Any]:
    return {"stride": tuple(ctx.attr("strides", [1] * rank)),
            "padding": _symmetric_pads(ctx, rank),
            "dilation": tuple(ctx.attr("dilations", [1] * rank)),
            "groups": ctx.attr("group", 1)}


@_op("Conv", weight=1)
def _build_conv(ctx: _BuildContext) -> OpFunction:
    rank = _spatial_rank(ctx)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    return functools.partial(conv, **_conv_options(ctx, rank))


@_op("ConvTranspose", weight=1)
def _build_conv_transpose(ctx: _BuildContext) -> OpFunction:
    if ctx.attr("output_shape") is not None:
        raise ctx.error("output_shape is not supported (use pads/output_padding)")
    rank = _spatial_rank(ctx)
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]
    return functools.partial(conv, output_padding=tuple(ctx.attr("output_padding", [0] * rank)),
                             **_conv_options(ctx, rank))


@_op("MaxPool")
def _build_max_pool(ctx: _BuildContext) -> OpFunction:
    if len([name for name in ctx.node.output if name]) > 1:
        raise ctx.error("the Indices output is not supported")
    rank = _spatial_rank(ctx)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]
    kernel = tuple(ctx.attr("kernel_shape"))
    return functools.partial(pool, kernel_size=kernel, stride=tuple(ctx.attr("strides", [1] * rank)),
                             padding=_symmetric_pads(ctx, rank),
                             dilation=tuple(ctx.attr("dilations", [1] * rank)),
                             ceil_mode=bool(ctx.attr("ceil_mode", 0)))


@_op("Resize", static=(1, 2, 3))
def _build_resize(ctx: _BuildContext) -> OpFunction:
    """Linear resize with half_pixel (torch ``align_corners=False``) or align_corners."""
    mode, transform = ctx.attr("mode", "nearest"), ctx.attr("coordinate_transformation_mode", "half_pixel")
    if mode != "linear" or transform not in ("half_pixel", "align_corners"):
        raise ctx.error(f"mode={mode} with coordinate_transformation_mode={transform} is not supported")
    scales, sizes = ctx.static(2), ctx.static(3)
    options: dict[str, Any] = {"align_corners": transform == "align_corners"}
    if sizes is not None and sizes.size:
        rank = len(sizes)
        options["size"] = tuple(int(size) for size in sizes[2:])
    elif scales is not None and scales.size and np.all(scales[:2] == 1):
        rank = len(scales)
        options.update(scale_factor=tuple(float(scale) for scale in scales[2:]),
                       recompute_scale_factor=False)
    else:
        raise ctx.error("needs constant sizes, or scales of 1 on batch and channels")
    options["mode"] = {3: "linear", 4: "bilinear", 5: "trilinear"}[rank]
    return functools.partial(F.interpolate, **options)


@_op("Softmax")
def _build_softmax(ctx: _BuildContext) -> OpFunction:
    return functools.partial(torch.softmax, dim=ctx.attr("axis", -1))


@_op("Transpose")
def _build_transpose(ctx: _BuildContext) -> OpFunction:
    perm = ctx.attr("perm")

    def transpose(x: torch.Tensor) -> torch.Tensor:
        return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))
    return transpose


@_op("Reshape", static=(1,))
def _build_reshape(ctx: _BuildContext) -> OpFunction:
    """Reshape to a constant shape; 0 copies the input's dim unless ``allowzero``."""
    shape = [int(dim) for dim in ctx.required(1)]
    copied = [] if ctx.attr("allowzero", 0) else [axis for axis, dim in enumerate(shape) if dim == 0]

    def reshape(x: torch.Tensor) -> torch.Tensor:
        target = list(shape)
        for axis in copied:
            target[axis] = x.shape[axis]
        return x.reshape(target)
    return reshape


@_op("Slice", static=(1, 2, 3, 4))
def _build_slice(ctx: _BuildContext) -> OpFunction:
    """Constant starts/ends/axes/steps (positive steps) as Python slicing, which clamps alike."""
    starts, ends = ctx.required(1), ctx.required(2)
    axes, steps = ctx.static(3), ctx.static(4)
    axes_list = [int(axis) for axis in axes] if axes is not None else list(range(len(starts)))
    steps_list = [int(step) for step in steps] if steps is not None else [1] * len(starts)
    if any(step <= 0 for step in steps_list):
        raise ctx.error(f"only positive steps are supported, got {steps_list}")
    cuts = [(axis, slice(int(start), int(end), step))
            for axis, start, end, step in zip(axes_list, starts, ends, steps_list)]

    def slice_(x: torch.Tensor) -> torch.Tensor:
        index: list[slice] = [slice(None)] * x.dim()
        for axis, cut in cuts:
            index[axis] = cut
        return x[tuple(index)]
    return slice_


@_op("Concat")
def _build_concat(ctx: _BuildContext) -> OpFunction:
    axis = ctx.attr("axis")
    return lambda *tensors: torch.cat(tensors, dim=axis)


@_op("Unsqueeze", static=(1,))
def _build_unsqueeze(ctx: _BuildContext) -> OpFunction:
    axes = [int(axis) for axis in ctx.required(1)]

    def unsqueeze(x: torch.Tensor) -> torch.Tensor:
        rank = x.dim() + len(axes)
        for axis in sorted(axis % rank for axis in axes):
            x = x.unsqueeze(axis)
        return x
    return unsqueeze


@_op("Expand", static=(1,))
def _build_expand(ctx: _BuildContext) -> OpFunction:
    """Bidirectional broadcast to a constant shape (a stride-0 view, as ONNX allows)."""
    shape = tuple(int(dim) for dim in ctx.required(1))
    return lambda x: x.expand(torch.broadcast_shapes(x.shape, shape))


@_op("Gather")
def _build_gather(ctx: _BuildContext) -> OpFunction:
    """``data`` indexed along ``axis`` by an index tensor of any rank (negative indices wrap)."""
    axis = ctx.attr("axis", 0)

    def gather(data: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        dim = axis % data.dim()
        picked = data.index_select(dim, (indices % data.shape[dim]).reshape(-1))
        return picked.reshape(data.shape[:dim] + indices.shape + data.shape[dim + 1:])
    return gather


@_op("GatherElements")
def _build_gather_elements(ctx: _BuildContext) -> OpFunction:
    axis = ctx.attr("axis", 0)
    return lambda data, indices: torch.gather(data, axis, indices % data.shape[axis])


@_op("TopK", static=(1,))
def _build_top_k(ctx: _BuildContext) -> OpFunction:
    k = int(ctx.required(1).reshape(-1)[0])
    return functools.partial(torch.topk, k=k, dim=ctx.attr("axis", -1),
                             largest=bool(ctx.attr("largest", 1)), sorted=bool(ctx.attr("sorted", 1)))


@_op("ReduceMean")
def _build_reduce_mean(ctx: _BuildContext) -> OpFunction:
    axes, keep = ctx.attr("axes"), bool(ctx.attr("keepdims", 1))

    def reduce_mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(axes) if axes is not None else tuple(range(x.dim())), keepdim=keep)
    return reduce_mean


@_op("Cast")
def _build_cast(ctx: _BuildContext) -> OpFunction:
    dtype = torch_dtype(ctx.attr("to"), ctx.float_dtype)
    return lambda x: x.to(dtype)


@_op("Constant")
def _build_constant(ctx: _BuildContext) -> OpFunction:
    if "value" not in ctx.attrs:
        raise ctx.error(f"only the 'value' attribute is supported, got {sorted(ctx.attrs)}")
    value = torch.from_numpy(numpy_helper.to_array(ctx.attrs["value"]).copy())
    return lambda: value


@_op("ConstantOfShape", static=(0,))
def _build_constant_of_shape(ctx: _BuildContext) -> OpFunction:
    shape = tuple(int(dim) for dim in ctx.required(0))
    tensor = ctx.attr("value")
    fill = numpy_helper.to_array(tensor) if tensor is not None else np.zeros(1, np.float32)
    value = torch.from_numpy(fill.copy()).reshape(())
    return lambda: value.expand(shape).clone()


def _along_axis(values: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """A per-axis (1-D) scale or zero point shaped to broadcast along ``axis``; scalars as is."""
    if values.dim() == 0:
        return values
    shape = [1] * rank
    shape[axis % rank] = -1
    return values.reshape(shape)


@_op("QuantizeLinear", float32=(1, 2))
def _build_quantize(ctx: _BuildContext) -> OpFunction:
    """ONNX QuantizeLinear in float32: round half to even, add the zero point, saturate."""
    zero_point = ctx.constant(2)
    zero_type = zero_point.dtype if zero_point is not None else np.dtype(np.uint8)
    if zero_type not in _QUANTIZED_TYPES:
        raise ctx.error(f"quantized type {zero_type} is not supported")
    out_dtype, low, high = _QUANTIZED_TYPES[zero_type]
    axis = ctx.attr("axis", 1)

    def quantize(x: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None = None) -> torch.Tensor:
        rank = x.dim()
        q = torch.round(x.float() / _along_axis(scale, axis, rank))
        if zero is not None:
            q = q + _along_axis(zero, axis, rank)
        return q.clamp(low, high).to(out_dtype)
    return quantize


@_op("DequantizeLinear", float32=(1, 2))
def _build_dequantize(ctx: _BuildContext) -> OpFunction:
    """ONNX DequantizeLinear in float32, then cast to the module's float dtype."""
    axis, dtype = ctx.attr("axis", 1), ctx.float_dtype

    def dequantize(q: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor | None = None) -> torch.Tensor:
        rank = q.dim()
        x = q.float()
        if zero is not None:
            x = x - _along_axis(zero, axis, rank)
        return (x * _along_axis(scale, axis, rank)).to(dtype)
    return dequantize


# --------------------------------------------------------------------------------------------
# Graph -> module
# --------------------------------------------------------------------------------------------

def check_opset(model: onnx.ModelProto, file_name: str) -> None:
    """Raise :class:`EngineError` unless the default-domain opset is in :data:`SUPPORTED_OPSETS`."""
    versions = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    if not versions or versions[0] not in SUPPORTED_OPSETS:
        raise EngineError(f"{file_name}: opset {versions} is not supported "
                          f"(the interpreter implements opset {SUPPORTED_OPSETS.start}-"
                          f"{SUPPORTED_OPSETS.stop - 1} semantics)")


def value_shape(value: onnx.ValueInfoProto) -> Shape:
    """Shape of a graph value; symbolic or unknown dims are ``None``."""
    return tuple(dim.dim_value if dim.HasField("dim_value") else None
                 for dim in value.type.tensor_type.shape.dim)


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every value whose shape ONNX shape inference fixes completely."""
    inferred = shape_inference.infer_shapes(model).graph
    values = [*inferred.input, *inferred.value_info, *inferred.output]
    shapes = {}
    for value in values:
        shape = value_shape(value)
        if value.type.tensor_type.HasField("shape") and all(dim is not None for dim in shape):
            shapes[value.name] = tuple(int(dim or 0) for dim in shape)
    return shapes


def _fold_shape(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    """Value of a ``Shape`` node from the inferred static shape of its input."""
    if node.input[0] not in shapes:
        raise EngineError(f"Shape node '{node.name}': the shape of '{node.input[0]}' is not static")
    attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
    return np.array(shapes[node.input[0]][attrs.get("start", 0):attrs.get("end")], dtype=np.int64)


@dataclass(frozen=True)
class _Step:
    """One compiled node: ``args`` are ``("env" | "buffer" | "none", name)`` in call order."""

    op_type: str
    fn: OpFunction
    args: tuple[tuple[str, str], ...]
    outputs: tuple[str, ...]
    release: tuple[str, ...] = ()


class OnnxModule(torch.nn.Module):
    """An ONNX graph as a module: ``forward(*inputs)`` -> tuple of outputs, in the file's order.

    Built directly on ``device`` (do not move it with ``.to``: op closures keep host
    constants). ``dtype`` is the float dtype of every tensor; ``channels_last`` stores 4-D
    conv weights channels-last.
    """

    def __init__(self, model: onnx.ModelProto, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", channels_last: bool = False,
                 file_name: str = "model.onnx", fuse_conv_activations: bool = True):
        super().__init__()
        check_opset(model, file_name)
        self.dtype, self.device, self.channels_last = dtype, torch.device(device), channels_last
        graph = model.graph
        constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        self.input_names = [value.name for value in graph.input if value.name not in constants]
        self.output_names = [value.name for value in graph.output]
        shapes = _static_shapes(model)
        self._buffer_names: dict[tuple[str, str], str] = {}
        steps = [self._compile(node, constants) for node in graph.node
                 if not _fold(node, constants, shapes)]
        if fuse_conv_activations and self.device.type == "cuda":
            steps = _fuse_conv_activations(steps, self.output_names, shapes)
        constant_outputs = [name for name in self.output_names if name in constants]
        if constant_outputs:
            raise EngineError(f"{file_name}: outputs {constant_outputs} are constants")
        self._steps = _with_releases(steps, self.input_names, self.output_names)

    def _compile(self, node: onnx.NodeProto, constants: Mapping[str, np.ndarray]) -> _Step:
        """A run-time step; its constant tensor inputs become buffers."""
        definition = _OPS[node.op_type]
        fn = definition.build(_BuildContext(node, constants, self.dtype))
        args = []
        for position, name in enumerate(node.input):
            if position in definition.static:
                continue
            if not name:
                args.append(("none", ""))
            elif name in constants:
                args.append(("buffer", self._buffer(name, constants[name], definition, position)))
            else:
                args.append(("env", name))
        return _Step(node.op_type, fn, tuple(args), tuple(node.output))

    def _buffer(self, name: str, value: np.ndarray, definition: _OpDef, position: int) -> str:
        """Register constant ``name`` (once per storage form) and return its buffer name."""
        form = "float32" if position in definition.float32 else (
            "weight" if position == definition.weight else "plain")
        key = (name, form)
        if key not in self._buffer_names:
            tensor = constant_tensor(value, form, self.dtype, self.channels_last)
            buffer_name = f"const{len(self._buffer_names)}"
            self.register_buffer(buffer_name, tensor.to(self.device), persistent=False)
            self._buffer_names[key] = buffer_name
        return self._buffer_names[key]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = dict(zip(self.input_names, inputs))
        for step in self._steps:
            env.update(self._call(step, env))
            for name in step.release:
                del env[name]
        return tuple(env[name].contiguous() for name in self.output_names)

    @property
    def runtime_ops(self) -> collections.Counter[str]:
        """How many nodes of each op type run per forward (what constant folding left)."""
        return collections.Counter(step.op_type for step in self._steps)

    def node_outputs(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every run-time node evaluated on ``values`` (its inputs by name, e.g. another
        runtime's intermediate tensors) rather than on its predecessors' results.

        Compares op by op with a reference runtime: a difference is then the op's own, not
        one propagated from earlier nodes. Nodes whose inputs are missing from ``values`` are
        skipped.
        """
        results: dict[str, torch.Tensor] = {}
        for step in self._steps:
            if all(kind != "env" or name in values for kind, name in step.args):
                results.update(self._call(step, values))
        return results

    def _call(self, step: _Step, env: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one step on values from ``env`` (and the buffers) -> its outputs by name."""
        args = [env[key] if kind == "env" else self._buffers[key] if kind == "buffer" else None
                for kind, key in step.args]
        result = step.fn(*args)
        values = (result,) if len(step.outputs) == 1 else tuple(result)
        return {name: value for name, value in zip(step.outputs, values) if name}


def constant_tensor(value: np.ndarray, form: str, dtype: torch.dtype,
                    channels_last: bool) -> torch.Tensor:
    """A constant in its storage form: ``float32`` (always float32), ``weight`` (float
    ``dtype``, channels-last if 4-D and requested) or ``plain`` (floats in ``dtype``, others as is)."""
    tensor = torch.from_numpy(np.array(value))
    if form == "float32":
        return tensor.float()
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if form == "weight" and channels_last and tensor.dim() == 4:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def _fold(node: onnx.NodeProto, constants: dict[str, np.ndarray],
          shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Evaluate ``node`` now (CPU, float32) if its value is known; store its outputs in
    ``constants``. Raises :class:`EngineError` for an unsupported op."""
    if node.op_type == "Shape":
        constants[node.output[0]] = _fold_shape(node, shapes)
        return True
    if node.op_type not in _OPS or node.domain not in ("", "ai.onnx"):
        raise EngineError(f"op {node.domain + '::' if node.domain else ''}{node.op_type} "
                          f"(node '{node.name}') is not supported by the torch interpreter")
    if not all(name in constants for name in node.input if name):
        return False
    definition = _OPS[node.op_type]
    fn = definition.build(_BuildContext(node, constants, torch.float32))
    forms = ["float32" if position in definition.float32 else "plain"
             for position in range(len(node.input))]
    args = [constant_tensor(constants[name], forms[position], torch.float32, False) if name else None
            for position, name in enumerate(node.input) if position not in definition.static]
    result = fn(*args)
    values = result if isinstance(result, tuple) else (result,)
    for name, value in zip(node.output, values):
        constants[name] = value.numpy()
    return True


def _conv2d_keywords(step: _Step) -> dict[str, Any] | None:
    """stride/padding/dilation/groups of a 2-D Conv step with constant weight (and bias), else None."""
    fn = step.fn
    if step.op_type != "Conv" or not isinstance(fn, functools.partial) or fn.func is not F.conv2d:
        return None
    if step.args[0][0] != "env" or any(kind != "buffer" for kind, _ in step.args[1:]):
        return None
    return dict(fn.keywords)


def _conv_relu(stride: tuple, padding: tuple, dilation: tuple, groups: int) -> OpFunction:
    def conv_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
    return conv_relu


def _conv_add_relu(stride: tuple, padding: tuple, dilation: tuple, groups: int) -> OpFunction:
    def conv_add_relu(x: torch.Tensor, weight: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        *bias, residual = rest
        return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias[0] if bias else None,
                                                stride, padding, dilation, groups)
    return conv_add_relu


def _fuse_conv_activations(steps: Sequence[_Step], outputs: Sequence[str],
                           shapes: Mapping[str, tuple[int, ...]]) -> list[_Step]:
    """Replace Conv -> Relu and Conv -> Add(residual) -> Relu chains, whose intermediate values
    have no other consumer, by one fused step placed where the Relu was (the residual is
    computed by then)."""
    consumers: dict[str, list[int]] = collections.defaultdict(list)
    for index, step in enumerate(steps):
        for kind, name in step.args:
            if kind == "env":
                consumers[name].append(index)
    for name in outputs:
        consumers[name].append(-1)

    def only_consumer(name: str, op_type: str) -> int | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0] >= 0 and steps[users[0]].op_type == op_type else None

    replaced: dict[int, _Step] = {}
    removed: set[int] = set()
    for index, step in enumerate(steps):
        keywords = _conv2d_keywords(step)
        if keywords is None or len(step.outputs) != 1:
            continue
        conv_out = step.outputs[0]
        relu = only_consumer(conv_out, "Relu")
        if relu is not None:
            fused = _Step("Conv+Relu", _conv_relu(**keywords), step.args, steps[relu].outputs)
        else:
            add = only_consumer(conv_out, "Add")
            relu = None if add is None else only_consumer(steps[add].outputs[0], "Relu")
            if add is None or relu is None or add in removed:   # its other operand claimed it
                continue
            residual = [arg for arg in steps[add].args if arg != ("env", conv_out)]
            if len(residual) != 1 or residual[0][0] != "env" or \
                    shapes.get(residual[0][1]) != shapes.get(conv_out) or shapes.get(conv_out) is None:
                continue
            fused = _Step("Conv+Add+Relu", _conv_add_relu(**keywords), step.args + tuple(residual),
                          steps[relu].outputs)
            removed.add(add)
        removed.add(index)
        replaced[relu] = fused
    return [replaced.get(index, step) for index, step in enumerate(steps) if index not in removed]


def _with_releases(steps: Sequence[_Step], inputs: Sequence[str],
                   outputs: Sequence[str]) -> list[_Step]:
    """Attach to each step the values to drop after it (their last use), keeping outputs."""
    last_use = {name: -1 for name in inputs}
    for index, step in enumerate(steps):
        for kind, name in step.args:
            if kind == "env":
                last_use[name] = index
        for name in step.outputs:
            last_use.setdefault(name, index)
    released: dict[int, list[str]] = {}
    for name, index in last_use.items():
        if name and name not in outputs and index >= 0:
            released.setdefault(index, []).append(name)
    return [dataclasses.replace(step, release=tuple(released.get(index, ())))
            for index, step in enumerate(steps)]


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------

class _CudaGraphRunner:
    """A module captured as one CUDA graph with static input and output tensors.

    Warm-up runs on a side stream (cuDNN autotuning, allocator), then one capture; each call
    copies the feeds into the static inputs and replays on the current torch stream. The
    returned tensors are the static outputs themselves: the next call overwrites them.
    """

    WARMUP_RUNS = 3

    def __init__(self, module: OnnxModule, inputs: Sequence[tuple[tuple[int, ...], torch.dtype]]):
        device = module.device
        self.inputs = [_static_input(shape, dtype, device, module.channels_last) for shape, dtype in inputs]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_RUNS):
                module(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = module(*self.inputs)

    def __call__(self, feeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for static, feed in zip(self.inputs, feeds):
            static.copy_(feed)
        self.graph.replay()
        return self.outputs


def _static_input(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                  channels_last: bool) -> torch.Tensor:
    """A graph's static input; 4-D ones channels-last in a channels-last module, so that a
    channels-last feed (another engine's output) is copied in without a transpose."""
    tensor = torch.zeros(shape, dtype=dtype, device=device)
    if channels_last and len(shape) == 4:
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor


@contextlib.contextmanager
def _cudnn_benchmark(dtype: torch.dtype) -> Iterator[None]:
    """cuDNN autotuning on (static shapes: each conv is tuned once) and, for float32 engines,
    TF32 off in cuDNN and cuBLAS (PyTorch allows TF32 convolutions by default: a relative error
    near 1e-3, which would make float32 no more exact than float16); restored afterwards."""
    previous = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
                torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark = True
    if dtype == torch.float32:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = previous


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(str(dtype).removeprefix("torch."))


def _array_kind(feeds: Mapping[str, Any]) -> str:
    """``cupy`` if any feed is a CuPy array, else ``torch`` if any is a tensor, else ``numpy``."""
    values = list(feeds.values())
    if any(is_cupy(value) for value in values):
        return "cupy"
    return "torch" if any(isinstance(value, torch.Tensor) for value in values) else "numpy"


class TorchEngine(FileEngine):
    """One ``.onnx`` file run by :class:`OnnxModule` on ``device`` in ``dtype``.

    ``cuda_graph`` (CUDA only) captures the module once at construction, after warm-up,
    and replays it per run; ``channels_last`` stores conv weights (and 4-D static inputs)
    channels-last; ``fuse_conv_activations`` see :class:`OnnxModule`.

    :meth:`run` takes NumPy arrays, torch tensors or CuPy arrays (any float dtype; converted
    to :attr:`inputs`' dtype) and returns the same kind: CuPy in -> CuPy out (zero-copy through
    DLPack), torch in -> torch out, NumPy in -> NumPy out (a host copy). Float bindings have
    the engine's dtype (float16 by default, like TensorRT's fp16 I/O). With CuPy feeds the
    work is queued on CuPy's current stream (no synchronization); otherwise on torch's current
    stream, and NumPy results are synchronized copies.

    Aliasing: with ``cuda_graph`` the returned CuPy arrays and tensors are views of the
    graph's static outputs (the same device memory every run): they are valid until the next
    :meth:`run` of this engine, which overwrites them. Copy what must outlive that. Without
    graphs every run returns fresh arrays.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cuda",
                 dtype: torch.dtype = torch.float16, cuda_graph: bool = True,
                 channels_last: bool = True, fuse_conv_activations: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise EngineError(f"model file not found: {self.path}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if cuda_graph and self.device.type != "cuda":
            raise EngineError(f"{self.path.name}: CUDA graphs need a CUDA device, not {self.device}")
        self.dtype = dtype
        try:
            model = onnx.load(str(self.path))
        except Exception as error:  # onnx raises DecodeError, OSError, ValueError, ...
            raise EngineError(f"cannot load model file {self.path}: {error}") from error
        self._feed_dtypes = self._value_dtypes(model.graph.input, model)
        self._inputs = self._specs(model.graph.input, self._feed_dtypes)
        self._outputs = self._specs(model.graph.output, self._value_dtypes(model.graph.output, model))
        with torch.no_grad():
            self.module = OnnxModule(model, dtype, self.device, channels_last, self.path.name,
                                     fuse_conv_activations)
            self._graph = self._capture() if cuda_graph else None

    def _value_dtypes(self, values: Sequence[onnx.ValueInfoProto], model: onnx.ModelProto
                      ) -> dict[str, torch.dtype]:
        """Binding name -> torch dtype (floats in the engine's dtype); initializers skipped."""
        initializers = {init.name for init in model.graph.initializer}
        return {value.name: torch_dtype(value.type.tensor_type.elem_type, self.dtype)
                for value in values if value.name not in initializers}

    @staticmethod
    def _specs(values: Sequence[onnx.ValueInfoProto], dtypes: Mapping[str, torch.dtype]
               ) -> dict[str, TensorSpec]:
        return {value.name: TensorSpec(value.name, value_shape(value), _numpy_dtype(dtypes[value.name]))
                for value in values if value.name in dtypes}

    def _capture(self) -> _CudaGraphRunner:
        dynamic = [spec.name for spec in self._inputs.values() if None in spec.shape]
        if dynamic:
            raise EngineError(f"{self.name}: CUDA graphs need static input shapes ({dynamic} are dynamic)")
        inputs = [(tuple(int(dim or 0) for dim in spec.shape), self._feed_dtypes[name])
                  for name, spec in self._inputs.items()]
        with _cudnn_benchmark(self.dtype):
            return _CudaGraphRunner(self.module, inputs)

    @property
    def backend(self) -> str:
        graph = ":cudagraph" if self._graph is not None else ""
        return f"torch:{self.device}:{str(self.dtype).removeprefix('torch.')}{graph}"

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Feeds by name (NumPy, torch or CuPy) -> outputs by name, of the same kind."""
        self.check_feeds(feeds)
        kind = _array_kind(feeds)
        with self._stream(kind), torch.no_grad(), _cudnn_benchmark(self.dtype):
            tensors = [self._tensor(feeds[name], dtype) for name, dtype in self._feed_dtypes.items()]
            outputs = self._graph(tensors) if self._graph is not None else self.module(*tensors)
            return {name: _export(value, kind) for name, value in zip(self._outputs, outputs)}

    def _stream(self, kind: str) -> contextlib.AbstractContextManager[Any]:
        """CuPy feeds: make CuPy's current stream torch's current stream for this run."""
        if kind != "cupy" or self.device.type != "cuda":
            return contextlib.nullcontext()
        import cupy
        pointer = cupy.cuda.get_current_stream().ptr
        return torch.cuda.stream(torch.cuda.ExternalStream(pointer, device=self.device))

    def _tensor(self, value: Any, dtype: torch.dtype) -> torch.Tensor:
        """A feed as a tensor on the device; CuPy arrays are wrapped without a copy."""
        if is_cupy(value):
            tensor = torch.from_dlpack(value)
        elif isinstance(value, torch.Tensor):
            tensor = value
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(value))
        if self._graph is not None:                   # the static copy converts dtype and device
            return tensor
        return tensor.to(device=self.device, dtype=dtype)


def _export(tensor: torch.Tensor, kind: str) -> Any:
    """An output tensor as the caller's array kind (CuPy: zero-copy view)."""
    if kind == "cupy":
        import cupy
        return cupy.from_dlpack(tensor)
    if kind == "torch":
        return tensor
    return tensor.cpu().numpy()
