"""bevfusion-record: record ROS 2 topics into an MCAP bag (:mod:`bevfusion_ros.ros.record`)."""
from __future__ import annotations

import argparse
import math
import sys
import threading
import time


def _parser() -> argparse.ArgumentParser:
    from bevfusion_ros.ros.record import DEFAULT_TOPICS
    parser = argparse.ArgumentParser(
        prog="bevfusion-record", description="Record ROS 2 topics into an MCAP bag (rosbag2 layout, CDR).",
        epilog="ROS arguments may follow --ros-args.")
    parser.add_argument("--out", required=True, help="the .mcap file to write")
    parser.add_argument("--topics", nargs="+", default=list(DEFAULT_TOPICS), metavar="T",
                        help=f"topics to record (default: {' '.join(DEFAULT_TOPICS)})")
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    parser.add_argument("--count", type=int, metavar="N", help="stop after N messages on the first topic")
    parser.add_argument("--json", metavar="DIR",
                        help="also write each Detection3DArray as DIR/detections_<stamp_ns>.json")
    parser.add_argument("--use-sim-time", action="store_true", help="log times from /clock")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.signals import SignalHandlerOptions
    from rclpy.utilities import remove_ros_args

    from bevfusion_ros.ros.bag import BagError
    from bevfusion_ros.ros.play import install_stop_handlers
    from bevfusion_ros.ros.record import Recorder
    full = list(sys.argv) if argv is None else ["bevfusion-record", *argv]
    parser = _parser()
    args = parser.parse_args(remove_ros_args(full)[1:])
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        parser.error(f"--duration must be > 0, got {args.duration}")
    if args.count is not None and args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")

    stop = threading.Event()
    restore_handlers = install_stop_handlers(stop)
    context = Context()
    rclpy.init(args=full, context=context, signal_handler_options=SignalHandlerOptions.NO)
    overrides = [Parameter("use_sim_time", Parameter.Type.BOOL, True)] if args.use_sim_time else None
    node = rclpy.create_node("bevfusion_record", context=context, parameter_overrides=overrides)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    recorder = None
    try:
        try:
            recorder = Recorder(node, args.out, args.topics, json_dir=args.json)
        except (BagError, OSError) as error:
            print(f"bevfusion-record: error: {error}", file=sys.stderr, flush=True)
            return 1
        print(f"recording {', '.join(recorder.topics)} into {args.out}", flush=True)
        first = recorder.topics[0]
        start = time.monotonic()
        while not stop.is_set() and context.ok():
            executor.spin_once(timeout_sec=0.05)
            if args.duration is not None and time.monotonic() - start >= args.duration:
                break
            if args.count is not None and recorder.counts[first] >= args.count:
                break
    finally:
        if recorder is not None:
            recorder.close()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        restore_handlers()
    counts = ", ".join(f"{topic}: {n}" for topic, n in recorder.counts.items())
    print(f"wrote {args.out} ({counts}"
          + (f"; {recorder.json_files} JSON files in {args.json}" if args.json else "") + ")", flush=True)
    if recorder.pending:
        print(f"never seen: {', '.join(recorder.pending)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
