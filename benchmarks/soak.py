"""Soak benchmark of bevfusion_node (see bevfusion_ros/ros/soak.py): a long run at sensor rate
with faulty frames mixed in; prints a summary, writes the report as JSON, exits 1 if a check
failed (2 if the soak could not run).

    python benchmarks/soak.py --model models/tiny-synthetic --duration 600 --rate 10 \
        --fault-every 10 --json out/soak.json

The node's log and parameter file go beside the JSON (``--out`` to choose another folder).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bevfusion_ros.ros.soak import SoakError, SoakOptions, format_report, run_soak, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model folder (bevfusion.yaml + ONNX)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of publishing")
    parser.add_argument("--rate", type=float, default=10.0, help="frames per second")
    parser.add_argument("--fault-every", type=int, default=10, help="every n-th frame is faulty; 0: none")
    parser.add_argument("--sweeps", type=int, default=3, help="node.num_sweeps")
    parser.add_argument("--json", type=Path, default=Path("out/soak.json"), help="report file")
    parser.add_argument("--out", type=Path, help="folder for the node log and parameters "
                        "(default: the JSON's folder)")
    parser.add_argument("--domain-id", type=int, help="ROS domain id (default: from the process id)")
    parser.add_argument("--settle-timeout", type=float, default=120.0,
                        help="seconds to wait for the node to account for every frame")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = args.out or args.json.parent
    options = SoakOptions(model_dir=args.model, out_dir=out_dir, duration_s=args.duration, rate_hz=args.rate,
                          fault_every=args.fault_every, num_sweeps=args.sweeps, domain_id=args.domain_id,
                          settle_timeout_s=args.settle_timeout)
    try:
        report = run_soak(options)
    except SoakError as error:
        print(f"soak could not run: {error}", file=sys.stderr)
        return 2
    if args.json.resolve() != (out_dir / "soak.json").resolve():
        write_report(report, args.json)
    print(format_report(report))
    print(f"report: {args.json}; node log: {report.log_path}")
    return 1 if report.failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
