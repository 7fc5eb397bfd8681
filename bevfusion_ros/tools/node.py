"""``bevfusion_node``: run :class:`bevfusion_ros.ros.node.BEVFusionNode` until SIGINT/SIGTERM;
``bevfusion_lifecycle_node`` (or ``python -m bevfusion_ros.tools.node --managed``): the managed
:class:`~bevfusion_ros.ros.node.BEVFusionLifecycleNode`, unconfigured until a lifecycle manager
(or ``ros2 lifecycle set``) configures and activates it."""
from __future__ import annotations

import sys
import traceback
from typing import TYPE_CHECKING, Sequence

from bevfusion_ros.runtime.memory import keep_large_buffers

if TYPE_CHECKING:                          # rclpy only inside the functions: tools/ imports without ROS
    from bevfusion_ros.ros.node import BEVFusionNode


def start_node(command_line: Sequence[str], managed: bool = False) -> BEVFusionNode | None:
    """The node, or None after logging why it cannot start in one line (a bad model folder,
    parameter or calibration; the traceback too with ``--log-level debug``)."""
    import rclpy
    import rclpy.logging

    from bevfusion_ros.ros.node import NODE_NAME, BEVFusionLifecycleNode, BEVFusionNode
    from bevfusion_ros.tools.cli import USER_ERRORS
    try:
        return (BEVFusionLifecycleNode if managed else BEVFusionNode)(command_line=command_line)
    except USER_ERRORS as error:
        logger = rclpy.logging.get_logger(NODE_NAME)
        logger.fatal("cannot start: " + " ".join(str(error).split()))
        logger.debug("".join(traceback.format_exception(error)))
        return None


def main(args: list[str] | None = None, managed: bool = False) -> int:
    """Run the node until SIGINT/SIGTERM (at any time, start-up included: no traceback);
    exit status 1 when it cannot start. ``--managed`` (before ``--ros-args``): the lifecycle node."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    command_line = list(sys.argv if args is None else args)
    if "--managed" in command_line[:command_line.index("--ros-args") if "--ros-args" in command_line else None]:
        command_line.remove("--managed")
        managed = True
    keep_large_buffers()                   # images and clouds reuse heap blocks: no page faults per frame
    rclpy.init(args=command_line)
    executor = SingleThreadedExecutor()    # before the (slow) node: a SIGINT meanwhile shuts the
    node = None                            # context down, and an executor made then is half-built
    try:
        node = start_node(command_line, managed)
        if node is None:
            return 1
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:                      # start-up or a callback racing the shutdown of the context
        if rclpy.ok():
            raise
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


def managed_main(args: list[str] | None = None) -> int:
    """``bevfusion_lifecycle_node``: :func:`main` with the lifecycle node."""
    return main(args, managed=True)


if __name__ == "__main__":
    sys.exit(main())
