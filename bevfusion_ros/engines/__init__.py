"""Network engines behind one interface (:class:`Engine`): ONNX Runtime (``cpu``), PyTorch
(``gpu``, imported on use: ``engines.torch_gpu``) and TensorRT (``tensorrt``); backend choice
and model-folder loading in :mod:`bevfusion_ros.engines.select`."""
from bevfusion_ros.engines.base import (
                                        DENSE_MODEL_FILES,
                                        Engine,
                                        EngineError,
                                        EngineInterfaceError,
                                        TensorSpec,
                                        check_dense_engines,
                                        check_interface,
                                        expected_interfaces,
)
from bevfusion_ros.engines.onnxruntime import OnnxRuntimeEngine
from bevfusion_ros.engines.plan_cache import PlanCache
from bevfusion_ros.engines.select import BACKENDS, load_dense_engines, resolve_backend
from bevfusion_ros.engines.tensorrt import TensorRTEngine

__all__ = ["BACKENDS", "DENSE_MODEL_FILES", "Engine", "EngineError", "EngineInterfaceError",
           "OnnxRuntimeEngine", "PlanCache", "TensorRTEngine", "TensorSpec", "check_dense_engines",
           "check_interface", "expected_interfaces", "load_dense_engines", "resolve_backend"]
