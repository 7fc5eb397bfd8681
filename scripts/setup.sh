#!/usr/bin/env bash
# One-command, idempotent setup of a development machine (Python 3.11, x86_64 Linux, no ROS install):
#
#   bash scripts/setup.sh
#
# 1. creates .venv (python3.11) if absent, with an up-to-date pip;
# 2. installs ROS 2 Kilted from PyPI wheels: requirements/ros.txt + requirements/ros-build.txt;
# 3. rewrites the include paths of the machine that built those wheels, found in their exported
#    *.cmake files, to this venv's Python and numpy include dirs (only where still foreign);
# 4. builds the interface packages under msg/ (vision_msgs, tf2_msgs, autoware_perception_msgs,
#    bevfusion_ros_msgs) with plain cmake + ninja straight into .venv, skipping a package whose
#    sources did not change;
# 5. installs this repository in editable mode with its extras (setup.py: their pins), then
#    nuscenes-devkit without its dependencies (requirements/nuscenes.txt says why);
# 6. installs the tensorrt-stubs used by the TensorRT backend's type check (build/typecheck-stubs).
#
# Nothing outside the repository (and VENV, below) is touched (no sudo, no ~/.bashrc); the only
# network used is PyPI.
# Afterwards .venv/bin/python imports rclpy and all messages with no environment setup.
#
#   bash scripts/setup.sh --ros-only
#
# does steps 1-4 only (ROS wheels and interface packages), then the rclpy + messages import check:
# for a machine that runs the node with its own Python packages (e.g. a GPU machine's torch venv).
#
# Environment:
#   PYTHON  interpreter that creates the venv when one must be made (default python3.11). Naming
#           another one (e.g. PYTHON=python3.12) makes its version the one .venv must have.
#   VENV    an existing venv (or prefix with bin/python) to install into instead of .venv, e.g.
#           /opt/torch/.venv: used as it is (any Python the wheels exist for), never recreated;
#           created with $PYTHON only when the path does not exist. Its CMake builds and stamps
#           go to build/setup-<hash of the path> (those of .venv stay in build/setup).
#   ROS_WHEELS_DIR  a folder of wheels (e.g. .whl): the ROS wheels come from it alone
#           (pip --no-index --find-links); what the venv already has (numpy, PyYAML, ...) is kept,
#           since no requirement pins it. pip also reads its own PIP_* variables (PIP_NO_INDEX,
#           PIP_FIND_LINKS, ...), which work the same way.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${VENV:-$ROOT/.venv}")"
if [ "$VENV" = "$(realpath -m "$ROOT/.venv")" ]; then
  VENV_GIVEN=0
  VENV_NAME=.venv                 # how messages name it
  BUILD="$ROOT/build/setup"
else
  VENV_GIVEN=1
  VENV_NAME="$VENV"
  BUILD="$ROOT/build/setup-$(printf '%s' "$VENV" | sha256sum | cut -c1-12)"
fi
VPY="$VENV/bin/python"
if [ ! -x "$VPY" ] && [ -x "$VENV/bin/python3" ]; then VPY="$VENV/bin/python3"; fi
STAMPS="$BUILD/stamps"
PYTHON_GIVEN="${PYTHON:+1}"
PYTHON="${PYTHON:-python3.11}"
ROS_ONLY=0
# pip's options for the ROS and build-tool wheels: PyPI, or ROS_WHEELS_DIR alone.
PIP_SOURCE=()
if [ -n "${ROS_WHEELS_DIR:-}" ]; then
  [ -d "$ROS_WHEELS_DIR" ] || { echo "[setup] error: ROS_WHEELS_DIR=$ROS_WHEELS_DIR is no folder" >&2; exit 1; }
  PIP_SOURCE=(--no-index --find-links "$(realpath "$ROS_WHEELS_DIR")")
fi
# Used only when the machine lacks cmake or ninja: pinned wheels from PyPI, installed into .venv.
CMAKE_WHEEL="cmake==3.31.10"
NINJA_WHEEL="ninja==1.13.2"
# The extras of setup.py that the project install brings (the "nuscenes" one: what nuscenes-devkit's
# modules import; "batch": Ray for bevfusion-batch).
EXTRAS="dev,model,bag,nuscenes,batch"
# Interface packages, in build order (each may depend only on those before it and on the wheels).
MSG_PACKAGES=(msg/vendor/vision_msgs msg/vendor/tf2_msgs msg/vendor/autoware_perception_msgs msg/bevfusion_ros_msgs)

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

# Prints the major.minor version of the Python interpreter $1 (nothing if it does not run).
python_version() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

# Makes sure pip runs in the venv (one made by uv has none): ensurepip needs no network.
ensure_pip() {
  "$VPY" -m pip --version >/dev/null 2>&1 && return
  log "installing pip into $VENV_NAME (ensurepip)"
  "$VPY" -m ensurepip --upgrade >/dev/null
}

create_venv() {
  local want=3.11
  if [ "$VENV_GIVEN" = 1 ] && [ -x "$VPY" ]; then
    # A given environment is used as it is, whatever its Python: never recreated.
    ensure_pip
    log "skip: using the existing environment $VENV ($("$VPY" -V))"
    return
  fi
  if [ "$VENV_GIVEN" = 1 ] && [ -e "$VENV" ]; then
    log "error: VENV=$VENV exists but has no bin/python (it is never deleted: point VENV elsewhere)"
    exit 1
  fi
  if [ -n "$PYTHON_GIVEN" ]; then
    command -v "$PYTHON" >/dev/null || { log "error: PYTHON=$PYTHON not found"; exit 1; }
    want="$(python_version "$PYTHON")"
  fi
  if [ -x "$VPY" ] && [ "$(python_version "$VPY")" = "$want" ]; then
    log "skip: $VENV_NAME exists ($("$VPY" -V))"
    return
  fi
  command -v "$PYTHON" >/dev/null || { log "error: $PYTHON not found (set PYTHON=...)"; exit 1; }
  if [ -e "$VENV" ]; then
    log "recreating $VENV_NAME: it has no working Python $want"
  else
    log "creating $VENV_NAME with $PYTHON"
  fi
  rm -rf "$VENV" "$STAMPS"       # stamps describe what is inside a venv: a new venv has nothing
  "$PYTHON" -m venv "$VENV"
  VPY="$VENV/bin/python"
  "$VPY" -m pip install --quiet --upgrade pip
  log "done: $VENV_NAME created ($("$VPY" -V), pip $("$VPY" -m pip --version | cut -d' ' -f2))"
}

install_ros_wheels() {
  local key
  key="$(hash_files requirements/ros.txt requirements/ros-build.txt requirements/ros-constraints.txt)"
  if stamp_matches "$STAMPS/ros-wheels" "$key" && "$VPY" -c 'import rclpy' 2>/dev/null; then
    log "skip: ROS wheels already installed from these requirements"
    return
  fi
  log "installing ROS 2 wheels (requirements/ros.txt, requirements/ros-build.txt)"
  "$VPY" -m pip install --quiet "${PIP_SOURCE[@]}" -r requirements/ros.txt -r requirements/ros-build.txt
  mkdir -p "$STAMPS"
  printf '%s' "$key" > "$STAMPS/ros-wheels"
  log "done: ROS wheels installed"
}

# The wheels' exported CMake targets name include dirs of the machine that built them
# (/opt/python/cp311-cp311/include/python3.11 and .../site-packages/numpy/_core/include).
# Rewrites every such path that does not exist here to this venv's equivalent.
fix_cmake_include_paths() {
  "$VPY" - "$VENV/share" "$VENV_NAME" <<'PY'
import pathlib, re, sys, sysconfig
import numpy

share = pathlib.Path(sys.argv[1])
if not pathlib.Path(sysconfig.get_paths()["include"], "Python.h").is_file():
    sys.exit(f"[setup] error: no Python.h in {sysconfig.get_paths()['include']}: the interface "
             "packages' Python bindings need this Python's headers (e.g. the python3-dev package)")
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
    print(f"[setup] skip: no foreign include paths left in {sys.argv[2]}/share/**/*.cmake")
PY
}

# Makes cmake and ninja available, from the machine or else as pinned wheels inside .venv
# (main puts .venv/bin first on PATH).
ensure_build_tools() {
  local missing=()
  command -v cmake >/dev/null || [ -x "$VENV/bin/cmake" ] || missing+=("$CMAKE_WHEEL")
  command -v ninja >/dev/null || [ -x "$VENV/bin/ninja" ] || missing+=("$NINJA_WHEEL")
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing build tools into $VENV_NAME: ${missing[*]}"
    "$VPY" -m pip install --quiet "${PIP_SOURCE[@]}" "${missing[@]}"
  fi
}

# Builds and installs one ament_cmake interface package into the venv, unless its sources and the
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
  log "building $name ($src -> $VENV_NAME)"
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
  key="$(hash_files setup.py setup.cfg pyproject.toml requirements/nuscenes.txt)-$EXTRAS-$(cat "$STAMPS/ros-wheels")"
  if stamp_matches "$STAMPS/project" "$key" && "$VPY" -c 'import bevfusion_ros, mcap_ros2, nuscenes, ray' 2>/dev/null; then
    log "skip: bevfusion_ros already installed (editable, [$EXTRAS]) from this setup.py"
    return
  fi
  log "installing bevfusion_ros in editable mode with [$EXTRAS] (torch pinned to the CPU wheel)"
  "$VPY" -m pip install --quiet -e ".[$EXTRAS]"
  # Last, without its declared deps (it pins numpy<2): requirements/nuscenes.txt says why
  "$VPY" -m pip install --quiet --no-deps -r requirements/nuscenes.txt
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
  case "${1:-}" in
    "") ;;
    --ros-only) ROS_ONLY=1 ;;
    *) log "usage: bash scripts/setup.sh [--ros-only]  (unknown argument: $1)"; exit 2 ;;
  esac
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
  if [ "$ROS_ONLY" = 0 ]; then
    install_project
    install_typecheck_stubs
  fi
  "$VPY" -c 'import rclpy, vision_msgs.msg, tf2_msgs.msg, autoware_perception_msgs.msg, bevfusion_ros_msgs.msg, sensor_msgs.msg' \
    || { log "error: the venv cannot import rclpy and the messages"; exit 1; }
  if [ "$ROS_ONLY" = 1 ]; then
    log "ready (ROS only) in $((SECONDS - start)) s: $VPY imports rclpy and all messages directly"
  else
    log "ready in $((SECONDS - start)) s: use .venv/bin/python (rclpy and all messages import directly)"
  fi
}

main "$@"
