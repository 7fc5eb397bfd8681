"""``bevfusion-infer``: run one frame of a CUDA-BEVFusion example-data folder through the pipeline.

    bevfusion-infer --model DIR --data EXAMPLE_DATA_DIR [--out OUTDIR] [--backend auto]
                    [--score-threshold S]

Writes ``OUTDIR/detections.json`` (REP-103 boxes: label, score, centre, size [l, w, h], yaw,
velocity) and ``OUTDIR/visualization.png`` (six camera views with projected boxes and a
bird's-eye view), and prints the time of every stage.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from bevfusion_ros.analysis.visualize import save_visualization
from bevfusion_ros.config import load_config
from bevfusion_ros.engines.select import BACKENDS
from bevfusion_ros.io import load_example_data
from bevfusion_ros.pipeline import BEVFusionPipeline
from bevfusion_ros.tools.cli import run_reporting_errors

STAGE_ORDER = ("camera_geometry", "upload_points", "upload_images", "normalize", "depth",
               "camera_backbone", "bevpool", "vtransform", "voxelize", "lidar_backbone", "fuser", "head",
               "decode")


def format_timings(stage_ms: dict[str, float]) -> str:
    lines = [f"  {name:<16} {stage_ms[name]:9.1f} ms" for name in STAGE_ORDER if name in stage_ms]
    lines.append(f"  {'total':<16} {sum(stage_ms.values()):9.1f} ms")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    pipeline = BEVFusionPipeline.from_model_dir(
        args.model, load_config(args.config) if args.config else None, backend=args.backend)
    args.backend = pipeline.backend
    config = pipeline.config
    if args.score_threshold is not None:
        config = pipeline.config = dataclasses.replace(config, head=dataclasses.replace(
            config.head, score_threshold=args.score_threshold)).validate()
    frame = load_example_data(args.data, config.camera_names)
    print(f"loaded model {args.model} ({args.backend}) and frame {args.data} in "
          f"{time.perf_counter() - start:.1f} s")
    detections = pipeline.forward(frame)
    args.out.mkdir(parents=True, exist_ok=True)
    detections.to_json(args.out / "detections.json")
    note = "" if pipeline.trained else "UNTRAINED weights: boxes are meaningless"
    save_visualization(args.out / "visualization.png", frame, detections, config, note=note)
    print(f"{len(detections.boxes)} boxes (score >= {config.head.score_threshold}) -> "
          f"{args.out / 'detections.json'}, {args.out / 'visualization.png'}")
    if note:
        print(f"note: {note}")
    for warning in detections.warnings:
        print(f"warning: {warning}")
    print("per-stage time:\n" + format_timings(detections.stage_ms))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run BEVFusion on one example-data frame.")
    parser.add_argument("--model", type=Path, required=True, help="CUDA-BEVFusion model folder")
    parser.add_argument("--data", type=Path, required=True, help="example-data folder")
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="engine backend; auto picks tensorrt > gpu > cpu and logs why")
    parser.add_argument("--config", type=Path, help="parameter YAML (default: MODEL/bevfusion.yaml)")
    parser.add_argument("--score-threshold", type=float, help="override head.score_threshold")
    args = parser.parse_args(argv)
    return run_reporting_errors(run, args)


if __name__ == "__main__":
    sys.exit(main())
