"""ROS-free input/output: ``.tensor`` files, calibration and sensor frames."""
from bevfusion_ros.io.calibration import Calibration, CalibrationError
from bevfusion_ros.io.frame import Frame, FrameError, load_example_data
from bevfusion_ros.io.tensor import TensorFileError, read_tensor, write_tensor

__all__ = ["Calibration", "CalibrationError", "Frame", "FrameError", "TensorFileError",
           "load_example_data", "read_tensor", "write_tensor"]
