#!/usr/bin/env bash
# Run the whole test suite in the project's venv (made by scripts/setup.sh).
# ROS 2 traffic stays on this machine: localhost discovery, a private domain id and ROS_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( ($$ % 90) + 10 ))}"
ROS_HOME="$(mktemp -d)"
export ROS_HOME
export FASTDDS_DEFAULT_PROFILES_FILE="$PWD/config/fastdds-large-data.xml"
trap 'rm -rf "$ROS_HOME"' EXIT
if [ "$#" -eq 0 ]; then                 # the whole suite: lint the whole tree first (ruff.toml)
  .venv/bin/ruff check .
fi
.venv/bin/python -m pytest -q "$@"
