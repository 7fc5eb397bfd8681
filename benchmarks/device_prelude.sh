# Sourced by the GPU machine's one-call scripts (node_device.sh, batch_device.sh) after they set
# OUT and WORK: the environment, the machine's description, the full-size model exported in the
# background into MODEL_DIR (default /tmp/r50-fp16; `export_pid` to wait for) and ROS 2 from the
# carried wheels (device_ros_setup.sh). Sets `data` (the carried example data) and `model`.
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=8
data="$PWD/.device/data/cuda-bevfusion-example"
model="${MODEL_DIR:-/tmp/r50-fp16}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "CPU: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
if [ ! -f "$model/export.yaml" ]; then
  python3 -m bevfusion_ros.tools.export --preset nuscenes-r50 --out "$model" > "$WORK/export.log" 2>&1 &
  export_pid=$!
fi
OUT="$WORK" bash benchmarks/device_ros_setup.sh || exit 1
