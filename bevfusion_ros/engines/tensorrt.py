"""TensorRT backend (production GPU path): build like NVIDIA's ``build_trt_engine.sh``, cache
the plan, bind CuPy buffers by name and enqueue on the pipeline's CuPy stream.

Build settings (spec 2.8): ONNX parser (TensorRT 10 networks are always explicit-batch),
``BuilderFlag.FP16`` for every file plus ``BuilderFlag.INT8`` for files carrying Q/DQ nodes
(int8 comes only from them: no calibrator, no forced layer precisions), every float network
input and output as fp16 linear (``--inputIOFormats=fp16:chw --outputIOFormats=fp16:chw``),
a 2048 MiB workspace pool, static shapes. The TensorRT timing cache is loaded before and saved
after each build. Plans are kept in a :class:`PlanCache` keyed by the ONNX bytes, TensorRT
version, GPU and these settings.

``tensorrt`` and ``cupy`` are imported only when an engine is built; without a working
TensorRT the constructor raises :class:`EngineError` saying so (the ``tensorrt-stubs`` package
used for type checking installs a ``tensorrt`` folder without the library: that is reported
as "not installed" too).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import onnx

from bevfusion_ros.engines.base import EngineError, FileEngine, TensorSpec
from bevfusion_ros.engines.plan_cache import PlanCache, PlanKey, atomic_write, default_cache_dir, sha256_hex

if TYPE_CHECKING:
    import tensorrt as trt

LOGGER = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp16", "int8")
"""``auto``: int8 for a file with Q/DQ nodes, else fp16; ``fp16``/``int8`` assert which."""
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
DEFAULT_WORKSPACE_MIB = 2048
# TensorRT DataType names -> NumPy element types of the bindings our graphs can have.
_NUMPY_TYPES = {"HALF": np.float16, "FLOAT": np.float32, "INT8": np.int8, "UINT8": np.uint8,
                "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}


def tensorrt_version() -> str:
    """Version of the installed TensorRT; :class:`EngineError` when it cannot be used."""
    try:
        import tensorrt as trt
    except ImportError as error:
        raise EngineError(f"TensorRT is not installed ({error})") from error
    if not hasattr(trt, "Builder"):
        raise EngineError(f"TensorRT is not installed: 'tensorrt' at {list(trt.__path__)} has no "
                          "Builder (type stubs only?)")
    return str(trt.__version__)


@dataclass(frozen=True)
class GpuIdentity:
    """What a plan is specific to besides TensorRT: the GPU model and compute capability."""

    name: str
    compute_capability: str

    @classmethod
    def current(cls) -> GpuIdentity:
        """The current CuPy device."""
        try:
            import cupy
        except ImportError as error:
            raise EngineError("the TensorRT backend needs CuPy for its device buffers") from error
        device = cupy.cuda.Device()
        properties = cupy.cuda.runtime.getDeviceProperties(device.id)
        return cls(properties["name"].decode(), f"{properties['major']}.{properties['minor']}")


@dataclass(frozen=True)
class BuildSettings:
    """The builder options of one file; :meth:`flags` names them for the plan key."""

    int8: bool
    workspace_mib: int = DEFAULT_WORKSPACE_MIB

    @property
    def precision(self) -> str:
        return "int8" if self.int8 else "fp16"

    def flags(self) -> tuple[str, ...]:
        precision_flags = ("FP16", "INT8") if self.int8 else ("FP16",)
        return (*precision_flags, "io=fp16:chw", f"workspace_mib={self.workspace_mib}")


def has_qdq(onnx_bytes: bytes) -> bool:
    """True when the graph has QuantizeLinear/DequantizeLinear nodes (NVIDIA's int8 files)."""
    graph = onnx.load_model_from_string(onnx_bytes).graph
    return any(node.op_type in QDQ_OPS for node in graph.node)


def build_settings(file_name: str, onnx_bytes: bytes, precision: str,
                   workspace_mib: int = DEFAULT_WORKSPACE_MIB) -> BuildSettings:
    """Settings for one file: INT8 exactly when it carries Q/DQ (spec 2.7/2.8).

    ``precision`` ``fp16``/``int8`` must agree with the file: int8 without Q/DQ would only
    give TensorRT placeholder scales, and a Q/DQ file is an int8 model.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    quantized = has_qdq(onnx_bytes)
    if precision == "int8" and not quantized:
        raise EngineError(f"{file_name}: int8 needs Q/DQ nodes and this file has none; build it as fp16")
    if precision == "fp16" and quantized:
        raise EngineError(f"{file_name}: this file carries Q/DQ nodes (an int8 model); build it as int8")
    return BuildSettings(quantized, workspace_mib)


def build_plan(onnx_path: Path, onnx_bytes: bytes, settings: BuildSettings,
               timing_cache: bytes) -> tuple[bytes, bytes]:
    """Build a serialized engine -> (plan, updated timing cache). ``timing_cache`` may be empty."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)          # TensorRT 10: always explicit batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes, str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise EngineError(f"{onnx_path.name}: TensorRT cannot parse the ONNX file: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.set_flag(trt.BuilderFlag.FP16)
    if settings.int8:
        config.set_flag(trt.BuilderFlag.INT8)
    _half_precision_io(network)
    if not config.set_timing_cache(config.create_timing_cache(timing_cache), ignore_mismatch=False):
        LOGGER.warning("%s: the timing cache does not fit this TensorRT/GPU; starting a new one",
                       onnx_path.name)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{onnx_path.name}: TensorRT failed to build the engine (see its log)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def _half_precision_io(network: trt.INetworkDefinition) -> None:
    """Every float32 network input/output becomes fp16 in linear (CHW) layout."""
    import tensorrt as trt

    tensors = ([network.get_input(index) for index in range(network.num_inputs)]
               + [network.get_output(index) for index in range(network.num_outputs)])
    for tensor in tensors:
        if tensor.dtype == trt.float32:
            tensor.dtype = trt.float16
            tensor.allowed_formats = 1 << int(trt.TensorFormat.LINEAR)


def cached_plan(onnx_path: Path, onnx_bytes: bytes, settings: BuildSettings, cache: PlanCache,
                gpu: GpuIdentity, use_timing_cache: bool = True) -> tuple[bytes, PlanKey]:
    """The plan of ``onnx_bytes`` (read from ``onnx_path``) from ``cache``; built and stored,
    with the timing cache loaded and saved, on a miss."""
    key = cache.key(sha256_hex(onnx_bytes), tensorrt_version(), gpu.name, gpu.compute_capability,
                    settings.precision, settings.flags())
    plan = cache.load(key)
    if plan is not None:
        LOGGER.info("%s: TensorRT plan from cache %s", onnx_path.name, cache.plan_path(key))
        return plan, key
    LOGGER.info("%s: building TensorRT %s engine (%s); this takes minutes",
                onnx_path.name, settings.precision, ", ".join(settings.flags()))
    timing_path = cache.timing_cache_path(key.tensorrt_version, gpu.name, gpu.compute_capability)
    timing = timing_path.read_bytes() if use_timing_cache and timing_path.is_file() else b""
    plan, timing = build_plan(onnx_path, onnx_bytes, settings, timing)
    if use_timing_cache:
        atomic_write(timing_path, timing)
    LOGGER.info("%s: plan stored at %s", onnx_path.name,
                cache.store(key, plan, source=str(onnx_path.resolve())))
    return plan, key


class TensorRTEngine(FileEngine):
    """One ``.onnx`` file as a TensorRT engine (built once, then loaded from ``cache``).

    ``precision``: ``auto`` (int8 if the file has Q/DQ, else fp16), ``fp16`` or ``int8``
    (checked against the file). ``cache`` defaults to :func:`default_cache_dir`;
    ``timing_cache`` loads/saves TensorRT's timing cache there.

    :meth:`run` takes CuPy arrays (or anything ``cupy.asarray`` accepts, e.g. torch CUDA
    tensors) or NumPy arrays of any float dtype; feeds that are not C-contiguous fp16 are
    converted on the current CuPy stream. It binds every tensor by name and enqueues on CuPy's
    current stream without synchronizing, returning the engine's own fp16 output buffers as
    CuPy arrays (valid until the next :meth:`run`, which overwrites them), or NumPy copies
    when every feed was NumPy.
    """

    def __init__(self, path: str | Path, precision: str = "auto", cache: PlanCache | None = None,
                 workspace_mib: int = DEFAULT_WORKSPACE_MIB, timing_cache: bool = True):
        self.path = Path(path)
        tensorrt_version()
        if not self.path.is_file():
            raise EngineError(f"model file not found: {self.path}")
        self.cache = cache if cache is not None else PlanCache(default_cache_dir())
        onnx_bytes = self.path.read_bytes()
        settings = build_settings(self.path.name, onnx_bytes, precision, workspace_mib)
        self._engine = self._load_engine(onnx_bytes, settings, GpuIdentity.current(), timing_cache)
        self._context = self._engine.create_execution_context()
        self._inputs, self._outputs = self._bindings(self._engine)
        self._output_buffers = self._allocate_outputs()

    def _load_engine(self, onnx_bytes: bytes, settings: BuildSettings, gpu: GpuIdentity,
                     timing_cache: bool) -> trt.ICudaEngine:
        """Deserialize the cached (or newly built) plan. A cached plan that TensorRT rejects
        (e.g. after a driver change the key does not see) is deleted and rebuilt once."""
        import tensorrt as trt

        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))   # must outlive the engine
        for _ in range(2):
            plan, self.key = cached_plan(self.path, onnx_bytes, settings, self.cache, gpu, timing_cache)
            engine: trt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(plan)
            if engine is not None:
                return engine
            LOGGER.warning("%s: plan %s does not deserialize; deleting it", self.name,
                           self.cache.plan_path(self.key))
            self.cache.plan_path(self.key).unlink(missing_ok=True)
        raise EngineError(f"{self.name}: TensorRT cannot deserialize the plan it just built")

    def _bindings(self, engine: trt.ICudaEngine) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        """Input and output specs in the engine's I/O order (static shapes, binding dtypes)."""
        import tensorrt as trt

        inputs: dict[str, TensorSpec] = {}
        outputs: dict[str, TensorSpec] = {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            data_type = engine.get_tensor_dtype(name).name
            if data_type not in _NUMPY_TYPES:
                raise EngineError(f"{self.name}: tensor '{name}' has unsupported type {data_type}")
            dims = engine.get_tensor_shape(name)       # Dims: indexable, -1 for a dynamic dim
            shape = tuple(dims[axis] if dims[axis] >= 0 else None for axis in range(len(dims)))
            spec = TensorSpec(name, shape, np.dtype(_NUMPY_TYPES[data_type]))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs[name] = spec
            else:
                outputs[name] = spec
        dynamic = [spec.name for spec in (*inputs.values(), *outputs.values()) if None in spec.shape]
        if dynamic:
            raise EngineError(f"{self.name}: dynamic shapes are not supported ({dynamic})")
        return inputs, outputs

    def _allocate_outputs(self) -> dict[str, Any]:
        """One CuPy buffer per output, bound to the context once."""
        import cupy

        buffers = {}
        for name, spec in self._outputs.items():
            buffers[name] = cupy.empty(spec.shape, dtype=spec.dtype)
            self._bind(name, buffers[name])
        return buffers

    def _bind(self, name: str, array: Any) -> None:
        if not self._context.set_tensor_address(name, array.data.ptr):
            raise EngineError(f"{self.name}: TensorRT rejected the address of tensor '{name}'")

    @property
    def backend(self) -> str:
        return f"tensorrt:{self.key.tensorrt_version}:{self.key.precision}"

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Bind the feeds by name, enqueue on CuPy's current stream -> output buffers by name."""
        import cupy

        self.check_feeds(feeds)
        host = all(isinstance(value, np.ndarray) for value in feeds.values())
        bound = {name: cupy.ascontiguousarray(cupy.asarray(feeds[name]), dtype=spec.dtype)
                 for name, spec in self._inputs.items()}
        for name, array in bound.items():
            self._bind(name, array)
        if not self._context.execute_async_v3(cupy.cuda.get_current_stream().ptr):
            raise EngineError(f"{self.name}: TensorRT execution failed to enqueue")
        if host:
            return {name: buffer.get() for name, buffer in self._output_buffers.items()}
        return dict(self._output_buffers)
