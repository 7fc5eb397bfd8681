"""Network engines behind one interface (:class:`Engine`); ONNX Runtime is the CPU backend."""
from bevfusion_ros.engines.base import (DENSE_MODEL_FILES, Engine, EngineError, EngineInterfaceError,
                                        TensorSpec, check_interface, expected_interfaces)
from bevfusion_ros.engines.onnxruntime import OnnxRuntimeEngine, load_dense_engines

__all__ = ["DENSE_MODEL_FILES", "Engine", "EngineError", "EngineInterfaceError", "OnnxRuntimeEngine",
           "TensorSpec", "check_interface", "expected_interfaces", "load_dense_engines"]
