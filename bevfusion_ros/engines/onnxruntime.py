"""ONNX Runtime backend: float32 graphs and int8 Q/DQ graphs (spec 2.7) on the CPU.

Feeds may be any float array (float16 included); they are converted to the input's element
type. Outputs come back as float32 NumPy arrays.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime

from bevfusion_ros.config import PipelineConfig
from bevfusion_ros.engines.base import (
    DENSE_MODEL_FILES,
    Engine,
    EngineError,
    FileEngine,
    TensorSpec,
    check_dense_engines,
)

# ONNX Runtime type strings of the element types our graphs use.
_ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64), "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64), "tensor(uint8)": np.dtype(np.uint8)}
# load_dense_engines backend name -> ONNX Runtime execution providers.
BACKEND_PROVIDERS = {"cpu": ("CPUExecutionProvider",)}


def _tensor_spec(node: Any, file_name: str) -> TensorSpec:
    """TensorSpec of an ORT NodeArg; symbolic or unknown dimensions become ``None``."""
    if node.type not in _ORT_DTYPES:
        raise EngineError(f"{file_name}: tensor '{node.name}' has unsupported type {node.type}")
    shape = tuple(dim if isinstance(dim, int) else None for dim in node.shape)
    return TensorSpec(node.name, shape, _ORT_DTYPES[node.type])


class OnnxRuntimeEngine(FileEngine):
    """One ``.onnx`` file in an ``onnxruntime.InferenceSession``.

    ``providers`` are ORT execution providers in priority order; ``threads`` sets the
    intra-op thread count (``None``: ORT's default, one per physical core).
    """

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise EngineError(f"model file not found: {self.path}")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self._session = onnxruntime.InferenceSession(str(self.path), options,
                                                         providers=list(providers))
        except Exception as error:  # ORT raises its own classes derived from Exception only
            raise EngineError(f"cannot load model file {self.path}: {error}") from error
        self._inputs = {node.name: _tensor_spec(node, self.name) for node in self._session.get_inputs()}
        self._outputs = {node.name: _tensor_spec(node, self.name)
                         for node in self._session.get_outputs()}

    @property
    def backend(self) -> str:
        return f"onnxruntime:{self._session.get_providers()[0]}"

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Feeds (any float dtype, shapes as :attr:`inputs`) -> float32 outputs by name."""
        self.check_feeds(feeds)
        converted = {name: np.ascontiguousarray(feeds[name], dtype=spec.dtype)
                     for name, spec in self._inputs.items()}
        try:
            values = self._session.run(list(self._outputs), converted)
        except Exception as error:  # same as above: ORT errors have no common base but Exception
            raise EngineError(f"{self.name}: inference failed: {error}") from error
        return {name: np.asarray(value, dtype=np.float32)
                for name, value in zip(self._outputs, values)}


def load_dense_engines(model_dir: str | Path, config: PipelineConfig, backend: str = "cpu",
                       threads: int | None = None) -> dict[str, Engine]:
    """Load the four dense files of a model folder and check them against ``config``.

    Returns file name -> engine in pipeline order (camera backbone, vtransform, fuser, head).
    Raises :class:`EngineError` for an unknown backend or a missing/corrupt file and
    :class:`EngineInterfaceError` when a file does not fit ``config`` or the fuser's output
    does not fit the head's input.
    """
    if backend not in BACKEND_PROVIDERS:
        raise EngineError(f"unknown engine backend {backend!r}; known: {sorted(BACKEND_PROVIDERS)}")
    model_dir = Path(model_dir)
    engines: dict[str, Engine] = {
        name: OnnxRuntimeEngine(model_dir / name, BACKEND_PROVIDERS[backend], threads)
        for name in DENSE_MODEL_FILES}
    check_dense_engines(engines, config)
    return engines
