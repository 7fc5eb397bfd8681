"""bevfusion_ros.ros.environment: the settings that keep DDS traffic on this machine."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from bevfusion_ros.ros.environment import fastdds_profile_path, safe_ros_environment

REPO_PROFILE = Path(__file__).resolve().parents[2] / "config" / "fastdds-large-data.xml"


def test_sets_localhost_domain_home_rmw_and_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("BEVFUSION_UNRELATED", "kept")
    env = safe_ros_environment(17, str(tmp_path))

    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert env["ROS_DOMAIN_ID"] == "17"
    assert env["ROS_HOME"] == str(tmp_path)
    assert env["RMW_IMPLEMENTATION"] == "rmw_fastrtps_cpp"
    assert Path(env["FASTDDS_DEFAULT_PROFILES_FILE"]) == REPO_PROFILE
    assert env["BEVFUSION_UNRELATED"] == "kept"
    assert env["PATH"] == os.environ["PATH"]


def test_removes_settings_that_could_leave_the_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("ROS_LOCALHOST_ONLY", "1")
    monkeypatch.setenv("ROS_STATIC_PEERS", "192.0.2.1")
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "SUBNET")

    env = safe_ros_environment(5, str(tmp_path))

    assert "ROS_LOCALHOST_ONLY" not in env and "ROS_STATIC_PEERS" not in env
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert os.environ["ROS_STATIC_PEERS"] == "192.0.2.1"  # the caller's environment is not modified


@pytest.mark.parametrize("bad", [-1, 102, 232, "3", 3.0, True])
def test_rejects_domain_ids_outside_0_to_101(bad, tmp_path):
    with pytest.raises(ValueError, match="domain id"):
        safe_ros_environment(bad, str(tmp_path))


@pytest.mark.parametrize("good", [0, 1, 101])
def test_accepts_domain_id_bounds(good, tmp_path):
    assert safe_ros_environment(good, str(tmp_path))["ROS_DOMAIN_ID"] == str(good)


def test_profile_keeps_udp_on_loopback():
    """The shipped profile disables builtin transports and allows UDP only on 127.0.0.1."""
    text = fastdds_profile_path().read_text()
    assert fastdds_profile_path() == REPO_PROFILE
    assert "<useBuiltinTransports>false</useBuiltinTransports>" in text
    assert "<interfaceWhiteList><address>127.0.0.1</address></interfaceWhiteList>" in text
