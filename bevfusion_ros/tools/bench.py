"""``bevfusion-bench``: per-stage and end-to-end latency of the pipeline on one frame.

    bevfusion-bench --model DIR --data EXAMPLE_DATA_DIR --backend {cpu,gpu,tensorrt,auto}
                    [--precision {fp16,fp32}] [--iters N] [--warmup W] [--json OUT]
                    [--compare-cpu K] [--compare-reference K]

Stage times come from the pipeline (CUDA events on the GPU, wall clock on the CPU); the
end-to-end time is the host wall time of ``forward`` (upload, all stages, download of the
boxes). Statistics are taken after warm-up: median, p90, p99. ``--compare-cpu`` also times the
CPU pipeline, ``--compare-reference`` the PyTorch-eager float32 ``BEVFusionReference`` on the
same device as the benchmarked backend (needs the ``model`` extra), in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from bevfusion_ros.io import load_example_data
from bevfusion_ros.io.frame import Frame
from bevfusion_ros.pipeline import BEVFusionPipeline
from bevfusion_ros.runtime.memory import keep_large_buffers
from bevfusion_ros.tools.infer import STAGE_ORDER


def summarize(samples_ms: list[float]) -> dict[str, float]:
    """median / p90 / p99 / mean of a list of milliseconds."""
    values = np.asarray(samples_ms, dtype=np.float64)
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
            "p99": float(np.percentile(values, 99)), "mean": float(values.mean()), "n": len(values)}


def time_pipeline(pipeline: BEVFusionPipeline, frame: Frame, iters: int, warmup: int) -> dict:
    """Run ``warmup + iters`` forwards; statistics of every stage and of the whole call."""
    for _ in range(warmup):
        pipeline.forward(frame)
    stages: dict[str, list[float]] = {}
    total = []
    for _ in range(iters):
        start = time.perf_counter()
        detections = pipeline.forward(frame)
        total.append((time.perf_counter() - start) * 1e3)
        for name, value in detections.stage_ms.items():
            stages.setdefault(name, []).append(value)
    return {"stages": {name: summarize(values) for name, values in stages.items()},
            "end_to_end": summarize(total), "boxes": int(len(detections.boxes))}


def time_callable(run: Callable[[], object], iters: int, warmup: int,
                  synchronize: Callable[[], None]) -> dict:
    for _ in range(warmup):
        run()
    synchronize()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return {"end_to_end": summarize(samples)}


def reference_runner(model_dir: Path, frame: Frame, device: str) -> tuple[Callable[[], object], Callable[[], None]]:
    """The eager float32 BEVFusionReference with the folder's preset and seeded weights."""
    import torch
    import yaml

    from bevfusion_ros.model.bevfusion import build_model
    from bevfusion_ros.model.export import calibrate_random_weights
    from bevfusion_ros.model.presets import get_preset
    from bevfusion_ros.model.reference import BEVFusionReference

    info = yaml.safe_load((model_dir / "export.yaml").read_text())
    model = build_model(get_preset(info["preset"]), info.get("seed", 0))
    calibrate_random_weights(model, info.get("seed", 0))
    reference = BEVFusionReference(model, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return (lambda: reference(frame.images, frame.points, frame.calibration)), sync


def peak_gpu_memory_mib() -> dict[str, float]:
    """Peak device memory held by CuPy's pool and by PyTorch's allocator, MiB."""
    result = {}
    try:
        import cupy
        result["cupy_pool_mib"] = cupy.get_default_memory_pool().total_bytes() / 2**20
    except ImportError:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            result["torch_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    return result


def format_report(report: dict) -> str:
    main = report["pipeline"]
    lines = [f"backend {report['backend']}, {main['end_to_end']['n']} iterations, {main['boxes']} boxes",
             f"{'stage':<18}{'median':>10}{'p90':>10}{'p99':>10}  ms"]
    for name in [*STAGE_ORDER, *sorted(set(main["stages"]) - set(STAGE_ORDER))]:
        if name in main["stages"]:
            stats = main["stages"][name]
            lines.append(f"{name:<18}{stats['median']:10.3f}{stats['p90']:10.3f}{stats['p99']:10.3f}")
    stats = main["end_to_end"]
    lines.append(f"{'end-to-end':<18}{stats['median']:10.3f}{stats['p90']:10.3f}{stats['p99']:10.3f}")
    for name in ("cpu_pipeline", "eager_reference"):
        if name in report:
            other = report[name]["end_to_end"]
            lines.append(f"{name:<18}{other['median']:10.1f}{other['p90']:10.1f}{other['p99']:10.1f}"
                         f"   (x{other['median'] / stats['median']:.1f} slower)")
    for name, value in report.get("memory", {}).items():
        lines.append(f"{name}: {value:.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the BEVFusion pipeline on one frame.")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--precision", default="fp16", choices=("fp16", "fp32"),
                        help="arithmetic of the gpu backend (default fp16)")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--compare-cpu", type=int, default=0, metavar="K",
                        help="also time the CPU pipeline K times")
    parser.add_argument("--compare-reference", type=int, default=0, metavar="K",
                        help="also time the eager float32 PyTorch reference K times")
    parser.add_argument("--through-node", action="store_true",
                        help="time bevfusion_node fed over ROS 2 instead (bevfusion_ros.ros.node_bench)")
    add_node_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")   # e.g. the backend choice
    keep_large_buffers()                                            # as the node does
    if args.through_node:
        return bench_through_node(args)
    frame = load_example_data(args.data)
    pipeline = BEVFusionPipeline.from_model_dir(args.model, backend=args.backend,
                                                precision=args.precision)
    report = {"backend": pipeline.backend, "precision": args.precision, "model": str(args.model),
              "pipeline": time_pipeline(pipeline, frame, args.iters, args.warmup)}
    report["memory"] = peak_gpu_memory_mib()
    if args.compare_cpu:
        cpu = BEVFusionPipeline.from_model_dir(args.model, backend="cpu")
        report["cpu_pipeline"] = time_pipeline(cpu, frame, args.compare_cpu, 1)
    if args.compare_reference:
        device = "cuda" if pipeline.device == "cuda" else "cpu"
        run, sync = reference_runner(args.model, frame, device)
        report["eager_reference"] = time_callable(run, args.compare_reference, 2, sync)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--through-node`` options; they need only argparse, the benchmark needs ROS 2."""
    group = parser.add_argument_group("--through-node (publish -> detections over ROS 2)")
    group.add_argument("--rates", type=float, nargs="+", default=[12.0], help="Hz, each held for --duration")
    group.add_argument("--duration", type=float, default=60.0, help="seconds per rate")
    group.add_argument("--warmup-s", type=float, default=5.0, help="seconds at the first rate, not measured")
    group.add_argument("--compressed", action="store_true", help="CompressedImage input (the folder's JPEGs)")
    group.add_argument("--sweeps", type=int, default=1, help="> 1: past sweeps motion-compensated with /tf")
    group.add_argument("--out", type=Path, default=Path("out/node_bench"), help="node log, published.jsonl")
    group.add_argument("--check-boxes", action="store_true",
                       help="compare the node's boxes with the library path's on the same frame")
    group.add_argument("--node-source", type=Path, help="run the node of this checkout (e.g. a baseline)")
    group.add_argument("--score-threshold", type=float, help="head.score_threshold (default: the model's)")


def bench_through_node(args: argparse.Namespace) -> int:
    from bevfusion_ros.ros.node_bench import NodeBenchOptions, format_report, run_node_bench
    options = NodeBenchOptions(model_dir=args.model, data_dir=args.data, out_dir=args.out, backend=args.backend,
                               precision=args.precision, rates_hz=tuple(args.rates), duration_s=args.duration,
                               warmup_s=args.warmup_s, compressed=args.compressed, num_sweeps=args.sweeps,
                               check_boxes=args.check_boxes, node_source=args.node_source,
                               score_threshold=args.score_threshold)
    report = run_node_bench(options)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(report), indent=1))
    return 0 if report.windows and report.node_exit_code == 0 and not report.traceback_in_log else 1


if __name__ == "__main__":
    sys.exit(main())
