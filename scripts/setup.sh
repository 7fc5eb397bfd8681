#!/usr/bin/env bash
# One-command, idempotent setup of a development machine (Python 3.11, x86_64 Linux, no ROS install):
#
#   bash scripts/setup.sh
#
# 1. creates .venv (python3.11) if absent, with an up-to-date pip;
# 2. installs ROS 2 Kilted from PyPI wheels: requirements/ros.txt + requirements/ros-build.txt;
# 3. rewrites the include paths of the machine that built those wheels, found in their exported
#    *.cmake files, to this venv's Python and numpy include dirs (only where still foreign);
# 4. builds the interface packages under msg/ (vision_msgs, tf2_msgs, bevfusion_ros_msgs) with plain
#    cmake + ninja straight into .venv, skipping a package whose sources did not change;
# 5. installs this repository in editable mode with its dev, model and bag extras, and
#    nuscenes-devkit (bevfusion-make-bag on a nuScenes data root; requirements/nuscenes.txt);
# 6. installs the tensorrt-stubs used by the TensorRT backend's type check (build/typecheck-stubs).
#
# Nothing outside the repository is touched (no sudo, no ~/.bashrc); the only network used is PyPI.
# Afterwards .venv/bin/python imports rclpy and all messages with no environment setup.
# Environment: PYTHON (interpreter used to create .venv, default python3.11).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
BUILD="$ROOT/build/setup"
STAMPS="$BUILD/stamps"
PYTHON="${PYTHON:-python3.11}"
# Used only when the machine lacks cmake or ninja: pinned wheels from PyPI, installed into .venv.
CMAKE_WHEEL="cmake==3.31.10"
NINJA_WHEEL="ninja==1.13.2"
# Interface packages, in build order (each may depend only on those before it and on the wheels).
MSG_PACKAGES=(msg/vendor/vision_msgs msg/vendor/tf2_msgs msg/bevfusion_ros_msgs)

cd "$ROOT"

log() { printf '[setup] %s\n' "$*"; }

# Prints the sha256 of the given files' contents and names (missing files are skipped).
hash_files() {
  local f
  for f in "$@"; do
    if [ -f "$f" ]; then printf '%s\n' "$f"; cat "$f"; fi
  done | sha256sum | cut -d' ' -f1
}

# Prints the sha256 of every file under a folder, names included, in a stable order.
hash_tree() {
  (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1
}

# True when the stamp file $1 holds exactly the value $2.
stamp_matches() {
  [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]
}

create_venv() {
  if [ -x "$VPY" ] && "$VPY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
    log "skip: .venv exists ($("$VPY" -V))"
    return
  fi
  command -v "$PYTHON" >/dev/null || { log "error: $PYTHON not found (set PYTHON=...)"; exit 1; }
  if [ -e "$VENV" ]; then
    log "recreating .venv: it has no working Python 3.11"
  else
    log "creating .venv with $PYTHON"
  fi
  rm -rf "$VENV" "$STAMPS"       # stamps describe what is inside a venv: a new venv has nothing
  "$PYTHON" -m venv "$VENV"
  "$VPY" -m pip install --quiet --upgrade pip
  log "done: .venv created ($("$VPY" -V), pip $("$VPY" -m pip --version | cut -d' ' -f2))"
}

install_ros_wheels() {
  local key
  key="$(hash_files requirements/ros.txt requirements/ros-build.txt requirements/ros-constraints.txt)"
  if stamp_matches "$STAMPS/ros-wheels" "$key" && "$VPY" -c 'import rclpy' 2>/dev/null; then
    log "skip: ROS wheels already installed from these requirements"
    return
  fi
  log "installing ROS 2 wheels (requirements/ros.txt, requirements/ros-build.txt)"
  "$VPY" -m pip install --quiet -r requirements/ros.txt -r requirements/ros-build.txt
  mkdir -p "$STAMPS"
  printf '%s' "$key" > "$STAMPS/ros-wheels"
  log "done: ROS wheels installed"
}

# The wheels' exported CMake targets name include dirs of the machine that built them
# (/opt/python/cp311-cp311/include/python3.11 and .../site-packages/numpy/_core/include).
# Rewrites every such path that does not exist here to this venv's equivalent.
fix_cmake_include_paths() {
  "$VPY" - "$VENV/share" <<'PY'
import pathlib, re, sys, sysconfig
import numpy

share = pathlib.Path(sys.argv[1])
replacements = (
    (re.compile(r'/[^";\s]*/include/python3\.\d+'), sysconfig.get_paths()["include"]),
    (re.compile(r'/[^";\s]*/site-packages/numpy/(?:_core|core)/include'), numpy.get_include()),
)
changed = []
for path in sorted(share.rglob("*.cmake")):
    text = path.read_text()
    new = text
    for pattern, local in replacements:
        new = pattern.sub(lambda m: m.group(0) if pathlib.Path(m.group(0)).exists() else local, new)
    if new != text:
        path.write_text(new)
        changed.append(path)
if changed:
    print(f"[setup] done: rewrote foreign include paths in {len(changed)} *.cmake files")
else:
    print("[setup] skip: no foreign include paths left in .venv/share/**/*.cmake")
PY
}

# Makes cmake and ninja available, from the machine or else as pinned wheels inside .venv
# (main puts .venv/bin first on PATH).
ensure_build_tools() {
  local missing=()
  command -v cmake >/dev/null || [ -x "$VENV/bin/cmake" ] || missing+=("$CMAKE_WHEEL")
  command -v ninja >/dev/null || [ -x "$VENV/bin/ninja" ] || missing+=("$NINJA_WHEEL")
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing build tools into .venv: ${missing[*]}"
    "$VPY" -m pip install --quiet "${missing[@]}"
  fi
}

# Builds and installs one ament_cmake interface package into .venv, unless its sources and the
# ROS wheels are unchanged since its last successful build and its install is still there.
build_msg_package() {
  local src="$1" name key stamp bdir start
  name="$(basename "$src")"
  key="$(hash_tree "$src")-$(cat "$STAMPS/ros-wheels")"
  stamp="$STAMPS/msg-$name"
  if stamp_matches "$stamp" "$key" && [ -f "$VENV/share/$name/package.xml" ]; then
    log "skip: $name unchanged since its last build"
    return
  fi
  bdir="$BUILD/$name"
  start=$SECONDS
  log "building $name ($src -> .venv)"
  rm -f "$stamp"
  cmake -S "$src" -B "$bdir" -G Ninja --log-level=WARNING \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$VENV" \
    -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DPython3_EXECUTABLE="$VPY" \
    -DBUILD_TESTING=OFF > "$bdir.configure.log" 2>&1 \
    || { cat "$bdir.configure.log"; log "error: configuring $name failed"; exit 1; }
  cmake --build "$bdir" -j "$(nproc)" > "$bdir.build.log" 2>&1 \
    || { tail -n 60 "$bdir.build.log"; log "error: building $name failed (log: $bdir.build.log)"; exit 1; }
  cmake --install "$bdir" > "$bdir.install.log" 2>&1 \
    || { tail -n 30 "$bdir.install.log"; log "error: installing $name failed"; exit 1; }
  printf '%s' "$key" > "$stamp"
  log "done: $name built and installed in $((SECONDS - start)) s"
}

install_project() {
  local key
  key="$(hash_files setup.py setup.cfg pyproject.toml requirements/bag.txt requirements/nuscenes.txt)-$(cat "$STAMPS/ros-wheels")"
  if stamp_matches "$STAMPS/project" "$key" && "$VPY" -c 'import bevfusion_ros, mcap_ros2, nuscenes' 2>/dev/null; then
    log "skip: bevfusion_ros already installed (editable, [dev,model,bag]) from this setup.py"
    return
  fi
  log "installing bevfusion_ros in editable mode with [dev,model,bag] (torch pinned to the CPU wheel)"
  "$VPY" -m pip install --quiet -e ".[dev,model,bag]" -r requirements/bag.txt
  # nuscenes-devkit without its declared deps (it pins numpy<2): requirements/nuscenes.txt says why
  "$VPY" -m pip install --quiet --no-deps nuscenes-devkit==1.2.0
  "$VPY" -m pip install --quiet -r requirements/nuscenes.txt
  printf '%s' "$key" > "$STAMPS/project"
  log "done: bevfusion_ros installed"
}

# tensorrt-stubs for the strict mypy check of the TensorRT backend (requirements/typecheck.txt):
# without their dependencies (the real TensorRT wheels cannot be fetched here), into their own
# folder so that `import tensorrt` keeps failing in .venv, then repaired so mypy can parse them.
install_typecheck_stubs() {
  local key dest="$ROOT/build/typecheck-stubs"
  key="$(hash_files requirements/typecheck.txt scripts/repair_tensorrt_stubs.py)"
  if stamp_matches "$STAMPS/typecheck-stubs" "$key" && [ -f "$dest/tensorrt/__init__.pyi" ]; then
    log "skip: tensorrt-stubs already in build/typecheck-stubs"
    return
  fi
  log "installing tensorrt-stubs (no deps) into build/typecheck-stubs"
  rm -rf "$dest"
  "$VPY" -m pip install --quiet --no-deps --target "$dest" -r requirements/typecheck.txt
  "$VPY" scripts/repair_tensorrt_stubs.py "$dest"
  printf '%s' "$key" > "$STAMPS/typecheck-stubs"
  log "done: tensorrt-stubs installed and repaired"
}

main() {
  local start=$SECONDS pkg
  mkdir -p "$BUILD"
  create_venv
  mkdir -p "$STAMPS"
  # The venv's bin first (for this script only): ament/rosidl find their Python tools and the
  # venv's python there, and cmake/ninja wheels if the machine lacks them.
  export PATH="$VENV/bin:$PATH"
  install_ros_wheels
  fix_cmake_include_paths
  ensure_build_tools
  for pkg in "${MSG_PACKAGES[@]}"; do
    build_msg_package "$pkg"
  done
  install_project
  install_typecheck_stubs
  "$VPY" -c 'import rclpy, vision_msgs.msg, tf2_msgs.msg, bevfusion_ros_msgs.msg, sensor_msgs.msg' \
    || { log "error: the venv cannot import rclpy and the messages"; exit 1; }
  log "ready in $((SECONDS - start)) s: use .venv/bin/python (rclpy and all messages import directly)"
}

main "$@"
