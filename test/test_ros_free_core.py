"""The core imports without ROS: every module outside bevfusion_ros.ros, with ROS blocked."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import bevfusion_ros

ROS_MODULES = ("rclpy", "sensor_msgs", "vision_msgs", "visualization_msgs", "geometry_msgs",
               "std_msgs", "message_filters", "sensor_msgs_py", "tf2_ros", "tf2_msgs",
               "diagnostic_msgs", "builtin_interfaces", "bevfusion_ros_msgs")


def core_modules() -> list[str]:
    names = [info.name for info in pkgutil.walk_packages(bevfusion_ros.__path__, "bevfusion_ros.")]
    return ["bevfusion_ros"] + [name for name in names if not name.startswith("bevfusion_ros.ros")]


def test_core_modules_import_with_ros_blocked():
    modules = core_modules()
    assert {"bevfusion_ros.config", "bevfusion_ros.io.tensor", "bevfusion_ros.io.calibration"} <= set(modules)
    # sys.modules[name] = None makes any `import name` raise ImportError in that process.
    script = "\n".join([
        "import sys",
        *(f"sys.modules[{name!r}] = None" for name in ROS_MODULES),
        "import importlib",
        f"for name in {modules!r}: importlib.import_module(name)",
        "loaded = [m for m in sys.modules if m.split('.')[0] in "
        f"{ROS_MODULES!r} and sys.modules[m] is not None]",
        "assert not loaded, loaded",
    ])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_blocking_really_blocks():
    script = "import sys; sys.modules['rclpy'] = None; import bevfusion_ros.ros.environment; import rclpy"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "import of rclpy halted" in result.stderr


def test_every_module_imports_without_ray():
    """Ray (the 'batch' extra) is imported inside the batch functions only: with ray blocked every
    module of the package, ROS layer included, still imports, and bevfusion-batch says what is missing."""
    names = ["bevfusion_ros"] + [info.name for info in pkgutil.walk_packages(bevfusion_ros.__path__, "bevfusion_ros.")]
    assert {"bevfusion_ros.tools.batch", "bevfusion_ros.batch.ray_runner",
            "bevfusion_ros.ros.bag_inference"} <= set(names)
    script = "\n".join([
        "import sys",
        "sys.modules['ray'] = None",
        "import importlib",
        f"for name in {names!r}: importlib.import_module(name)",
        "from bevfusion_ros.batch.ray_runner import RayOptions, run_jobs",
        "from bevfusion_ros.batch.outputs import BagJob, BatchError",
        "from pathlib import Path",
        "try:",
        "    run_jobs([BagJob(Path('a.mcap'), 'a', Path('out'), (Path('a.mcap'),))], None, RayOptions(), None)",
        "except BatchError as error:",
        "    assert 'ray==2.60.0' in str(error), error",
        "else:",
        "    raise AssertionError('no error without ray')",
    ])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
