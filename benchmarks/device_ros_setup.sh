#!/usr/bin/env bash
# ROS 2 on the GPU machine: installs the ROS 2 wheels carried in ./.whl (no index: the machine has
# no network; the device tool's carry: [".whl"]) and builds the interface packages under msg/
# into the environment of `python3` (its sys.prefix, e.g. /opt/torch/.venv), through
# `scripts/setup.sh --ros-only`. Run from the repository root:
#   bash benchmarks/device_ros_setup.sh
# What the environment already has (numpy, PyYAML, typing_extensions, setuptools, ...) is kept:
# .whl holds none of them and no requirement pins them. Idempotent: a second run only checks
# (stamps in build/setup-<hash of the prefix>). Prints one line (time, rclpy version, the import
# check, numpy before/after); the full log is $OUT/ros_setup.log (build/ros_setup.log without OUT),
# whose tail is printed too when a step fails. ROS_WHEELS_DIR overrides the wheel folder.
set -uo pipefail
wheels="${ROS_WHEELS_DIR:-$PWD/.whl}"
log_dir="${OUT:-build}"
mkdir -p "$log_dir"
log="$log_dir/ros_setup.log"
prefix="$(python3 -c 'import sys; print(sys.prefix)')"
numpy_version() { python3 -c 'import numpy; print(numpy.__version__)' 2>/dev/null || echo none; }
numpy_before="$(numpy_version)"
start=$(date +%s.%N)
PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 ROS_WHEELS_DIR="$wheels" VENV="$prefix" \
  bash scripts/setup.sh --ros-only > "$log" 2>&1
status=$?
seconds=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
check="$(python3 -c '
import importlib.metadata as md
import rclpy, vision_msgs.msg, tf2_msgs.msg, autoware_perception_msgs.msg, bevfusion_ros_msgs.msg, sensor_msgs.msg
import diagnostic_msgs.msg, visualization_msgs.msg
print("rclpy", md.version("ros-rclpy"), "+ messages import ok")' 2>&1 | tail -1)"
echo "ROS setup ($prefix, $(python3 -V)): setup.sh exit $status in $seconds s; $check;" \
  "numpy $numpy_before -> $(numpy_version)"
if [ "$status" != 0 ]; then tail -n 40 "$log"; fi
exit "$status"
