"""bevfusion-play: publish an MCAP bag (rosbag2 layout, CDR) with rclpy (:mod:`bevfusion_ros.ros.play`)."""
from __future__ import annotations

import argparse
import sys
import threading


def _parser() -> argparse.ArgumentParser:
    from bevfusion_ros.ros.play import QOS_CHOICES
    parser = argparse.ArgumentParser(
        prog="bevfusion-play", description="Publish an MCAP bag (rosbag2 layout, CDR) with rclpy.",
        epilog="ROS arguments may follow --ros-args (e.g. --ros-args -r __node:=player).")
    parser.add_argument("bag", help="the .mcap file")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    parser.add_argument("--loop", action="store_true", help="play again from the start at the end")
    parser.add_argument("--clock", action="store_true", help="publish the bag time on /clock (100 Hz)")
    parser.add_argument("--start-delay", type=float, default=1.0, metavar="S",
                        help="seconds between creating the publishers and the first message (default 1.0)")
    parser.add_argument("--wait-for-subscribers", type=float, metavar="S",
                        help="before the start delay, wait (up to S seconds after creating the "
                             "publishers) until every played topic has a subscriber")
    parser.add_argument("--topics", nargs="+", metavar="T", help="play only these topics")
    parser.add_argument("--qos", choices=QOS_CHOICES, default="reliable",
                        help="QoS of the topics but /tf_static (default reliable, depth 10)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions
    from rclpy.utilities import remove_ros_args

    from bevfusion_ros.ros.bag import BagError
    from bevfusion_ros.ros.play import PlayResult, check_play_options, install_stop_handlers, play
    full = list(sys.argv) if argv is None else ["bevfusion-play", *argv]
    parser = _parser()
    args = parser.parse_args(remove_ros_args(full)[1:])
    try:
        check_play_options(args.rate, args.start_delay, args.qos, args.wait_for_subscribers)
    except ValueError as error:
        parser.error(str(error))

    stop = threading.Event()
    restore_handlers = install_stop_handlers(stop)
    context = Context()
    rclpy.init(args=full, context=context, signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("bevfusion_play", context=context)

    def report(result: PlayResult) -> None:
        print(f"published {result.published} messages, pass {result.passes + 1}, "
              f"elapsed {result.elapsed_s:.1f} s", flush=True)

    try:
        print(f"playing {args.bag} at rate {args.rate:g}" + (" (loop)" if args.loop else ""), flush=True)
        result = play(args.bag, node, rate=args.rate, loop=args.loop, clock=args.clock, topics=args.topics,
                      qos=args.qos, start_delay=args.start_delay, stop=stop, progress=report,
                      wait_for_subscribers=args.wait_for_subscribers)
    except (BagError, OSError, ValueError) as error:
        print(f"bevfusion-play: error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        restore_handlers()
    print(f"done: published {result.published} messages in {result.elapsed_s:.2f} s "
          f"({result.passes} complete pass{'es' if result.passes != 1 else ''}"
          f"{', stopped' if result.stopped else ''})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
