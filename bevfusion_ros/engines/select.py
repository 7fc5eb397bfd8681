"""Engine backends by name, ``auto`` selection, and loading the four dense networks of a folder.

* ``tensorrt``: :class:`~bevfusion_ros.engines.tensorrt.TensorRTEngine` (TensorRT 10 + CuPy;
  plans cached, by default in :func:`~bevfusion_ros.engines.plan_cache.default_cache_dir`);
* ``gpu``: :class:`~bevfusion_ros.engines.torch_gpu.TorchEngine` (PyTorch with CUDA: float16,
  channels-last, CUDA graphs);
* ``cpu``: :class:`~bevfusion_ros.engines.onnxruntime.OnnxRuntimeEngine` (ONNX Runtime);
* ``auto``: the first of those that can run here, logged with the reason.

An explicitly requested GPU backend that cannot run raises :class:`EngineError` saying why
instead of silently falling back. PyTorch and TensorRT are imported only when probed or used.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Callable

from bevfusion_ros.config import PipelineConfig
from bevfusion_ros.engines.base import DENSE_MODEL_FILES, Engine, EngineError, check_dense_engines
from bevfusion_ros.engines.onnxruntime import OnnxRuntimeEngine
from bevfusion_ros.engines.plan_cache import PlanCache
from bevfusion_ros.runtime.array_module import gpu_available

LOGGER = logging.getLogger(__name__)
BACKENDS = ("auto", "tensorrt", "gpu", "cpu")
GPU_BACKENDS = ("tensorrt", "gpu")
"""In ``auto``'s order of preference."""

Problem = Callable[[str], "str | None"]
"""Backend name -> why it cannot run here, or ``None`` when it can."""


class UnknownBackendError(EngineError, ValueError):
    """A backend name that is not one of :data:`BACKENDS`."""

    def __init__(self, requested: str):
        super().__init__(f"unknown engine backend {requested!r}; known: {list(BACKENDS)}")


def tensorrt_problem() -> str | None:
    """Why TensorRT cannot run here (not installed, no CuPy GPU), or ``None``."""
    from bevfusion_ros.engines.tensorrt import tensorrt_version

    try:
        tensorrt_version()
    except EngineError as error:
        return str(error)
    return None if gpu_available() else "CuPy is not installed or sees no CUDA GPU"


def torch_cuda_problem() -> str | None:
    """Why the PyTorch backend cannot run here (no torch, a CPU-only build, no GPU), or ``None``."""
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed"
    import torch

    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} is a CPU-only build"
    return None if torch.cuda.is_available() else "PyTorch sees no CUDA GPU"


def backend_problem(backend: str) -> str | None:
    """Why ``backend`` (``tensorrt``, ``gpu`` or ``cpu``) cannot run here, or ``None``."""
    return {"tensorrt": tensorrt_problem, "gpu": torch_cuda_problem}.get(backend, lambda: None)()


def choose_backend(requested: str, problem: Problem) -> tuple[str, str]:
    """(backend, reason) for ``requested`` given ``problem`` (pure: no probing of its own).

    Raises :class:`UnknownBackendError` for an unknown name and :class:`EngineError` when an
    explicitly requested backend cannot run.
    """
    if requested not in BACKENDS:
        raise UnknownBackendError(requested)
    if requested != "auto":
        reason = problem(requested)
        if reason is not None:
            raise EngineError(f"engine backend {requested!r} cannot run here: {reason}")
        return requested, "requested"
    reasons: list[str] = []
    for candidate in GPU_BACKENDS:
        reason = problem(candidate)
        if reason is None:
            skipped = f" ({'; '.join(reasons)})" if reasons else ""
            return candidate, f"{candidate} is available{skipped}"
        reasons.append(f"{candidate}: {reason}")
    return "cpu", f"no GPU backend can run ({'; '.join(reasons)})"


def resolve_backend(requested: str) -> str:
    """The backend to use for ``requested`` (``auto``, ``tensorrt``, ``gpu`` or ``cpu``); logs
    the choice and its reason. See :func:`choose_backend` for the errors."""
    backend, reason = choose_backend(requested, backend_problem)
    LOGGER.info("engine backend %s (requested %s): %s", backend, requested, reason)
    return backend


GPU_PRECISIONS = ("fp16", "fp32")
"""Arithmetic of the ``gpu`` backend: float16 (the fast path) or float32 (for parity checks)."""


def engine_factory(backend: str, threads: int | None = None, plan_cache: PlanCache | None = None,
                   precision: str = "fp16") -> Callable[[Path], Engine]:
    """``path -> Engine`` for a resolved backend with its default settings (``threads``:
    ONNX Runtime intra-op threads; ``plan_cache``: TensorRT plan folder; ``precision``: the
    ``gpu`` backend's float type, see :data:`GPU_PRECISIONS`)."""
    if precision not in GPU_PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; known: {list(GPU_PRECISIONS)}")
    if backend == "cpu":
        return lambda path: OnnxRuntimeEngine(path, ("CPUExecutionProvider",), threads)
    if backend == "gpu":
        import torch

        from bevfusion_ros.engines.torch_gpu import TorchEngine
        dtype = torch.float16 if precision == "fp16" else torch.float32
        return lambda path: TorchEngine(path, dtype=dtype)
    if backend == "tensorrt":
        from bevfusion_ros.engines.tensorrt import TensorRTEngine
        return lambda path: TensorRTEngine(path, cache=plan_cache)
    raise UnknownBackendError(backend)


def load_dense_engines(model_dir: str | Path, config: PipelineConfig, backend: str = "cpu",
                       threads: int | None = None, plan_cache: PlanCache | None = None,
                       precision: str = "fp16") -> dict[str, Engine]:
    """Load the four dense files of a model folder on ``backend`` (``auto`` resolved first) and
    check them against ``config``.

    Returns file name -> engine in pipeline order (camera backbone, vtransform, fuser, head).
    Raises :class:`EngineError` for an unknown or unusable backend or a missing/corrupt file,
    and :class:`EngineInterfaceError` when a file does not fit ``config`` or the fuser's output
    does not fit the head's input.
    """
    make = engine_factory(resolve_backend(backend), threads, plan_cache, precision)
    engines = {name: make(Path(model_dir) / name) for name in DENSE_MODEL_FILES}
    check_dense_engines(engines, config)
    return engines
