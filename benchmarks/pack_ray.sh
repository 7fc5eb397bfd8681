#!/usr/bin/env bash
# Packs Ray (the `batch` extra's pin) for the GPU machine, which has no network and takes at most
# 64 MiB per call: Ray's wheel alone is 79 MB, so this keeps what an embedded or joined Ray
# instance with tasks and actors runs on (the core, its servers, the runtime-env and dashboard
# agents) and leaves out the Java jar, the dashboard's web client and the libraries bevfusion-batch
# does not use (Data, Train, Tune, Serve, RLlib, LLM, AIR), with the servers' symbols stripped:
# 24 MiB as tar.xz. Also the wheels the GPU machine lacks for it and for bevfusion-make-bag's bags
# (mcap, zstandard, lz4, jsonschema and its needs). Run here, in the repository root:
#   bash benchmarks/pack_ray.sh [DEST (default .ray)]
# then carry DEST; benchmarks/batch_device.sh unpacks it. PYTHON_VERSION (default 3.12, the GPU
# machine's) picks the wheels; with this machine's version the packed Ray can be checked here
# (PYTHONPATH=SITE before the environment's own Ray).
set -euo pipefail
dest="${1:-.ray}"
python_version="${PYTHON_VERSION:-3.12}"
ray_pin="$(python3 -c 'import re; print(re.search(r"\"(ray==[^\"]+)\"", open("setup.py").read()).group(1))')"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
download() {   # folder, then requirements
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$@"
}
download "$scratch" "$ray_pin"
mkdir -p "$scratch/site" "$dest/wheels"
unzip -q "$scratch"/ray-*.whl -d "$scratch/site"
ray_root="$scratch/site/ray"
rm -rf "$ray_root"/{jars,dashboard/client,data,train,tune,serve,rllib,llm,air}
find "$scratch/site" -name '*.map' -delete
strip --strip-unneeded "$ray_root/_raylet.so" "$ray_root/core/src/ray/gcs/gcs_server" \
  "$ray_root/core/src/ray/raylet/raylet"
tar -C "$scratch/site" -cJf "$dest/ray-slim.tar.xz" .
download "$dest/wheels" mcap==1.6.0 zstandard==0.25.0 lz4==4.4.5 jsonschema==4.26.0 referencing==0.37.0 \
  jsonschema-specifications==2025.9.1 rpds-py==2026.9.1
du -sh "$dest"/ray-slim.tar.xz "$dest"/wheels
