"""Scaling of ``bevfusion-batch`` with its workers on this machine, beside one pipeline in one
process (no Ray) over the same bags.

    PYTHONPATH=. python benchmarks/batch_scaling.py [--model models/tiny-synthetic] [--bags 4]
        [--frames 3] [--workers 1 2] [--backend cpu] [--cpus-per-worker 1] [--out DIR]
        [--bag-dir DIR] [--json OUT]

Writes ``--bags`` bags of ``--frames`` generated scenes each (``bevfusion-make-bag --seeds``;
kept in ``--bag-dir`` when given, reused when already there), then

* sequential: one pipeline with one worker's ONNX Runtime threads (``--cpus-per-worker``), every
  bag through ``BagFrames`` and ``forward`` in this process: frames/s;
* for each worker count: ``bevfusion-batch --rerun`` on one embedded Ray instance (``workers *
  cpus-per-worker`` CPUs): frames/s over the whole command (Ray's start-up excluded: the
  instance is shared; the workers' start-up and model load included) and once the workers were
  ready (``frames_per_s_running``).

The machine's load average is printed with the figures: other processes share its cores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE_OPTIONS = ["--time-lag-field", "time_lag", "--num-sweeps", "1"]
FIRST_SEED = 200_000


def make_bags(folder: Path, bags: int, frames: int) -> list[Path]:
    """``bags`` bags of ``frames`` generated scenes each (reused when present)."""
    from bevfusion_ros.sim.scene import generate_scene
    from bevfusion_ros.tools.make_bag import write_scenes_bag
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(bags):
        path = folder / f"bench{index}.mcap"
        if not path.is_file():
            seeds = range(FIRST_SEED + index * frames, FIRST_SEED + (index + 1) * frames)
            write_scenes_bag((generate_scene(seed) for seed in seeds), path)
        paths.append(path)
    return paths


def sequential(model: Path, bags: list[Path], backend: str, threads: int) -> dict:
    """One pipeline in this process over every bag, with one worker's ONNX Runtime threads:
    frames and seconds (model load excluded)."""
    from bevfusion_ros.batch.settings import load_settings
    from bevfusion_ros.pipeline import BEVFusionPipeline
    from bevfusion_ros.ros.bag_frames import BagFrames
    settings = load_settings(model, [], {"node.backend": backend, "node.time_lag_field": "time_lag",
                                         "node.num_sweeps": 1})
    pipeline = BEVFusionPipeline.from_model_dir(model, settings.config, backend, threads=threads)
    start, frames = time.perf_counter(), 0
    for bag in bags:
        for assembled in BagFrames(bag, settings.config, settings.node):
            pipeline.forward(assembled.frame, assembled.cameras_used)
            frames += 1
    seconds = time.perf_counter() - start
    return {"frames": frames, "seconds": seconds, "frames_per_s": frames / seconds}


def batch(model: Path, bag_dir: Path, out: Path, workers: int, backend: str, cpus_per_worker: float) -> dict:
    """``bevfusion-batch`` with ``workers`` workers: its batch.json figures and the wall time."""
    from bevfusion_ros.tools import batch as batch_tool
    start = time.perf_counter()
    code = batch_tool.main(["--model", str(model), "--bags", str(bag_dir), "--out", str(out), "--rerun",
                            "--backend", backend, "--workers", str(workers), "--cpus-per-worker",
                            str(cpus_per_worker), "--no-markers", *NODE_OPTIONS])
    seconds = time.perf_counter() - start
    summary = json.loads((out / "batch.json").read_text())
    return {"exit": code, "workers": workers, "frames": summary["frames_run"], "seconds": seconds,
            "frames_per_s": summary["frames_run"] / seconds, "frames_per_s_running": summary["frames_per_s_running"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "tiny-synthetic")
    parser.add_argument("--bags", type=int, default=4)
    parser.add_argument("--frames", type=int, default=3, help="frames (scenes) per bag")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--bag-dir", type=Path, help="keep (and reuse) the bags here")
    parser.add_argument("--out", type=Path, help="outputs of the batch runs (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    from bevfusion_ros.batch.ray_runner import embedded_ray
    with tempfile.TemporaryDirectory(prefix="batch-scaling-") as scratch:
        bag_dir = args.bag_dir or Path(scratch) / "bags"
        out = args.out or Path(scratch) / "out"
        bags = make_bags(bag_dir, args.bags, args.frames)
        results = {"cpus": os.cpu_count(), "model": str(args.model), "backend": args.backend,
                   "sequential": sequential(args.model, bags, args.backend, max(1, int(args.cpus_per_worker))),
                   "batch": []}
        print(f"sequential: {results['sequential']}", flush=True)
        cpus = math.ceil(max(args.workers) * args.cpus_per_worker)
        with embedded_ray(cpus):
            for workers in args.workers:
                result = batch(args.model, bag_dir, out / f"workers{workers}", workers, args.backend,
                               args.cpus_per_worker)
                results["batch"].append(result)
                print(f"batch, {workers} workers: {result}", flush=True)
    results["load_average"] = os.getloadavg()
    print(f"\nmachine: {results['cpus']} CPUs, load average {results['load_average']}")
    print(f"{'run':<22}{'frames':>7}{'seconds':>9}{'frames/s':>10}{'frames/s (workers up)':>23}")
    seq = results["sequential"]
    print(f"{'sequential (no Ray)':<22}{seq['frames']:>7}{seq['seconds']:>9.1f}{seq['frames_per_s']:>10.3f}{'':>23}")
    for result in results["batch"]:
        print(f"{'batch, ' + str(result['workers']) + ' workers':<22}{result['frames']:>7}{result['seconds']:>9.1f}"
              f"{result['frames_per_s']:>10.3f}{result['frames_per_s_running']:>23.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(result["exit"] == 0 for result in results["batch"]) else 1


if __name__ == "__main__":
    sys.exit(main())
