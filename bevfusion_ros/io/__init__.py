"""ROS-free input/output: ``.tensor`` files, calibration, camera rigs and sensor frames."""
from bevfusion_ros.io.calibration import Calibration, CalibrationError
from bevfusion_ros.io.frame import Frame, FrameError, load_example_data
from bevfusion_ros.io.rig import Rig, RigError, load_rig
from bevfusion_ros.io.tensor import TensorFileError, read_tensor, write_tensor

__all__ = ["Calibration", "CalibrationError", "Frame", "FrameError", "Rig", "RigError", "TensorFileError",
           "load_example_data", "load_rig", "read_tensor", "write_tensor"]
