"""ROS 2 tests (real rclpy over Fast DDS). Skipped as a whole when rclpy cannot be imported.

Before rclpy is imported anywhere in this process, the environment is made safe: discovery on
localhost only, a domain id of this run, a temporary ROS_HOME and the project's Fast DDS profile
(bevfusion_ros.ros.environment). Each test then gets its own domain id and ROS_HOME (fixture
``ros_env``), which are also what child processes must be started with.
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bevfusion_ros.ros.environment import safe_ros_environment

REPO_ROOT = Path(__file__).resolve().parents[2]
_DOMAIN_COUNTER = itertools.count()
_FIRST_DOMAIN = os.getpid() % 101  # spreads concurrent runs over the domain ids


def next_domain_id() -> int:
    """A domain id in 1..101, different for each call in this run."""
    return 1 + (_FIRST_DOMAIN + next(_DOMAIN_COUNTER)) % 101


# The whole process runs with safe settings from here on, before any rclpy import.
_SESSION_ROS_HOME = tempfile.mkdtemp(prefix="bevfusion-ros-home-")
os.environ.update(safe_ros_environment(next_domain_id(), _SESSION_ROS_HOME))
os.environ.pop("ROS_LOCALHOST_ONLY", None)
os.environ.pop("ROS_STATIC_PEERS", None)

try:
    import rclpy  # noqa: F401
    import sensor_msgs.msg  # noqa: F401
    import vision_msgs.msg  # noqa: F401
except ImportError as error:
    ROS_MISSING: str | None = (
        f"ROS 2 Python packages not importable ({error}); run `bash scripts/setup.sh` and use "
        ".venv/bin/python"
    )
else:
    ROS_MISSING = None

if ROS_MISSING:
    # Without ROS the test modules cannot even be imported: each one is collected as a single
    # test that skips with the reason. (A module-level pytest.skip() in this conftest would crash
    # `pytest test/ros`, where pytest loads it before collection.)

    class _RosMissingModule(pytest.File):
        """Replaces a test module of this folder when ROS is missing."""

        def collect(self):
            yield _RosMissingItem.from_parent(self, name="ros_tests")

    class _RosMissingItem(pytest.Item):
        """Skips with the reason ROS is missing."""

        def runtest(self) -> None:
            pytest.skip(ROS_MISSING)

        def reportinfo(self):
            return self.path, None, "ROS 2 tests"

    def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector):
        """Collects a test module of this folder without importing it."""
        return _RosMissingModule.from_parent(parent, path=module_path)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Removes the session's temporary ROS_HOME."""
    shutil.rmtree(_SESSION_ROS_HOME, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks every test of this folder with the ``ros`` marker."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.ros)


@dataclass(frozen=True)
class RosEnv:
    """The ROS settings of one test: use ``env`` for child processes."""

    domain_id: int
    ros_home: Path
    env: dict[str, str]


@pytest.fixture
def ros_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RosEnv:
    """A fresh domain id and ROS_HOME, applied to os.environ for this test."""
    ros_home = tmp_path / "ros_home"
    ros_home.mkdir()
    env = safe_ros_environment(next_domain_id(), str(ros_home))
    pythonpath = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), pythonpath) if p)
    for key in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_DOMAIN_ID", "ROS_HOME", "RMW_IMPLEMENTATION",
                "FASTDDS_DEFAULT_PROFILES_FILE"):
        monkeypatch.setenv(key, env[key])
    for key in ("ROS_LOCALHOST_ONLY", "ROS_STATIC_PEERS"):
        monkeypatch.delenv(key, raising=False)
    return RosEnv(domain_id=int(env["ROS_DOMAIN_ID"]), ros_home=ros_home, env=env)


@pytest.fixture
def rclpy_context(ros_env: RosEnv) -> Iterator["rclpy.context.Context"]:
    """An initialised rclpy context on the test's own domain id, shut down afterwards."""
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context, domain_id=ros_env.domain_id)
    try:
        yield context
    finally:
        rclpy.shutdown(context=context)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset exported with seed 3 (what the node tests run), once per session."""
    from bevfusion_ros.model.export import export_model_set
    from bevfusion_ros.model.presets import TINY
    return export_model_set(TINY, "fp16", tmp_path_factory.mktemp("tiny"), seed=3).out_dir


@pytest.fixture(scope="session")
def tiny_core(tiny_model_dir: Path):
    """The core pipeline of :func:`tiny_model_dir`, run in this process as the reference."""
    from bevfusion_ros.pipeline import BEVFusionPipeline
    return BEVFusionPipeline.from_model_dir(tiny_model_dir)


def as_the_node_rebuilds(frame, image):
    """``frame`` with its calibration rebuilt as the node rebuilds it from CameraInfo K and TF
    (camera2lidar through a unit quaternion) for the model's ``image`` pre-processing."""
    import numpy as np

    from bevfusion_ros.io.calibration import Calibration
    from bevfusion_ros.io.frame import Frame
    from bevfusion_ros.ros import convert
    calibration = frame.calibration
    camera2lidar = np.stack([convert.transform_to_matrix(convert.matrix_to_transform(matrix))
                             for matrix in calibration.camera2lidar])
    rebuilt = Calibration.from_camera2lidar(calibration.camera_intrinsics[:, :3, :3], camera2lidar,
                                            image, calibration.camera_names)
    return Frame(frame.images, frame.points, rebuilt)


@pytest.fixture(scope="session")
def node_example(example_data_dir: Path):
    """The example frame with its calibration rebuilt as the node rebuilds it (TINY's images)."""
    from bevfusion_ros.io.frame import load_example_data
    from bevfusion_ros.model.presets import TINY
    return as_the_node_rebuilds(load_example_data(example_data_dir), TINY.pipeline.image)
