"""package.xml declares exactly the ROS packages the code imports: every ``exec_depend`` (other
than rosdep's ``python3-*`` keys) is imported by bevfusion_ros or the launch file, and every ROS
package they import is declared; the tests' own ROS imports are exec or test dependencies.

A top-level module counts as a ROS package when this ROS installation's ament index lists it
(the venv's prefix and AMENT_PREFIX_PATH), or when it is one of the ROS packages PyPI does not
publish (:data:`ROS_NOT_ON_PYPI`, ../shared/ros-from-pypi.md).
"""
from __future__ import annotations

import ast
import os
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ROS_NOT_ON_PYPI = {"launch", "launch_ros", "sensor_msgs_py", "tf2_ros", "message_filters", "rosbag2_py"}


def ament_packages() -> set[str]:
    prefixes = [sys.prefix, *filter(None, os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep))]
    names = set()
    for prefix in prefixes:
        index = Path(prefix) / "share" / "ament_index" / "resource_index" / "packages"
        if index.is_dir():
            names.update(path.name for path in index.iterdir())
    return names


def imported_modules(paths) -> set[str]:
    """Top-level names of every absolute import in these Python files."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def declared(kind: str) -> set[str]:
    root = ElementTree.parse(REPO_ROOT / "package.xml").getroot()
    return {element.text.strip() for element in root.iter(kind) if not element.text.strip().startswith("python3-")}


def test_exec_depends_are_exactly_the_ros_packages_the_code_imports():
    ros = ament_packages() | ROS_NOT_ON_PYPI
    assert {"rclpy", "vision_msgs", "autoware_perception_msgs"} <= ros       # the index was found
    code = [*(REPO_ROOT / "bevfusion_ros").rglob("*.py"), *(REPO_ROOT / "launch").glob("*.py")]
    imported = (imported_modules(code) & ros) - {"bevfusion_ros"}
    assert declared("exec_depend") | declared("depend") == imported
    assert not {"message_filters", "tf2_ros"} & imported


def test_the_tests_ros_imports_are_declared():
    ros = ament_packages() | ROS_NOT_ON_PYPI
    imported = imported_modules((REPO_ROOT / "test").rglob("*.py")) & ros
    assert imported <= declared("exec_depend") | declared("test_depend")
    assert declared("test_depend") <= imported
