"""Environment for every process of this project that starts ROS 2: DDS stays on this machine.

``safe_ros_environment`` returns a copy of ``os.environ`` with discovery limited to localhost, a
given domain id and ROS_HOME, Fast DDS as the middleware, and the project's Fast DDS profile
(``config/fastdds-large-data.xml``: big shared-memory segment, UDP only on 127.0.0.1).
Pass it as ``env=`` to subprocesses, or apply it to ``os.environ`` before rclpy is imported.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "bevfusion_ros"
PROFILE_NAME = "fastdds-large-data.xml"
#: Domain ids that Fast DDS can use with its default port mapping on Linux.
DOMAIN_ID_RANGE = range(0, 102)
#: Variables that could widen discovery beyond localhost or conflict with the range setting.
_REMOVED = ("ROS_LOCALHOST_ONLY", "ROS_STATIC_PEERS")


def _profile_candidates():
    """Yields where the profile may be, in order of preference."""
    yield Path(__file__).resolve().parents[2] / "config" / PROFILE_NAME
    try:
        from ament_index_python.packages import get_package_share_directory

        yield Path(get_package_share_directory(PACKAGE)) / "config" / PROFILE_NAME
    except (ImportError, LookupError, OSError):  # no ament index, or package not registered in it
        pass
    yield Path(sys.prefix) / "share" / PACKAGE / "config" / PROFILE_NAME


def fastdds_profile_path() -> Path:
    """Path of the project's Fast DDS profile.

    Looks in the source tree (a checkout or an editable install), then in the ament share folder
    of an installed package, then in ``<sys.prefix>/share/bevfusion_ros/config``.
    """
    tried = []
    for candidate in _profile_candidates():
        if candidate.is_file():
            return candidate
        tried.append(str(candidate))
    raise FileNotFoundError(f"{PROFILE_NAME} not found; looked at: {', '.join(tried)}")


def safe_ros_environment(domain_id: int, ros_home: str) -> dict[str, str]:
    """``os.environ`` plus the settings that keep ROS 2 traffic on this machine.

    Sets ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, ROS_DOMAIN_ID, ROS_HOME,
    RMW_IMPLEMENTATION=rmw_fastrtps_cpp and FASTDDS_DEFAULT_PROFILES_FILE; removes
    ROS_LOCALHOST_ONLY (deprecated, conflicts with the range) and ROS_STATIC_PEERS (peers are
    contacted whatever the range). ``domain_id`` must be in 0..101.
    """
    if isinstance(domain_id, bool) or not isinstance(domain_id, int) or domain_id not in DOMAIN_ID_RANGE:
        raise ValueError(f"ROS domain id must be an int in 0..101, got {domain_id!r}")
    env = {key: value for key, value in os.environ.items() if key not in _REMOVED}
    env.update(
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        ROS_DOMAIN_ID=str(domain_id),
        ROS_HOME=str(ros_home),
        RMW_IMPLEMENTATION="rmw_fastrtps_cpp",
        FASTDDS_DEFAULT_PROFILES_FILE=str(fastdds_profile_path()),
    )
    return env


@contextlib.contextmanager
def safe_ros_process(domain_id: int) -> Iterator[dict[str, str]]:
    """This process's ``os.environ`` made safe (:func:`safe_ros_environment` with ``domain_id`` and
    a temporary ROS_HOME, removed afterwards) while the block runs: rcl reads it when a context
    starts, child processes inherit it. Yields that environment; the old one is restored after."""
    saved = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="bevfusion-ros-home-") as ros_home:
        env = safe_ros_environment(domain_id, ros_home)
        os.environ.clear()
        os.environ.update(env)
        try:
            yield dict(env)
        finally:
            os.environ.clear()
            os.environ.update(saved)
