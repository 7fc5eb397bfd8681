"""Replay a bag into ``bevfusion_node`` (a child process) and record what it publishes: the demo
and ``bevfusion-eval --through-node`` run the product this way, as a user would.

    result = replay_through_node(model_dir, bag, out_dir, backend="cpu", lockstep=True)
    result.detections    # {lidar stamp ns: Detections} from the recorded Detection3DArray
    result.in_order(stamps)   # one Detections per stamp, empty where the node did not answer

* The node gets a parameter file (:func:`node_params`): the model's pipeline config (optionally
  with ``head.score_threshold`` replaced) plus the node section for bags (reliable input QoS,
  clouds with ``time_lag``, one sweep).
* While it runs, this process's environment is the safe ROS one (localhost discovery, its own
  domain id and a temporary ROS_HOME, :func:`bevfusion_ros.ros.environment.safe_ros_process`;
  restored afterwards), which the node inherits; this process records ``/bevfusion/detections``,
  ``/bevfusion/frame_info``, ``/bevfusion/markers`` and
  ``/diagnostics`` into ``out_dir/detections.mcap``, and plays the bag (``bevfusion-play``).
* ``lockstep``: after each cloud the player waits until the node has answered it (a FrameInfo
  for every cloud so far, at most ``frame_timeout`` seconds), so that no frame is dropped
  however slow the backend; without it the bag plays in real time and a slow node drops frames
  (its latest-frame queue), as on a vehicle.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bevfusion_ros.config import PipelineConfig, load_config, save_config
from bevfusion_ros.detections import BOX_COLUMNS, Detections
from bevfusion_ros.ros.environment import safe_ros_process

DETECTIONS_TOPIC = "/bevfusion/detections"
FRAME_INFO_TOPIC = "/bevfusion/frame_info"
MARKERS_TOPIC = "/bevfusion/markers"
OUTPUT_TOPICS = (DETECTIONS_TOPIC, FRAME_INFO_TOPIC, MARKERS_TOPIC, "/diagnostics")
NODE_START_TIMEOUT_S = 120.0
RECORDED_FILE = "detections.mcap"


class NodeRunError(RuntimeError):
    """The node did not start, or exited while the bag was playing (see its log)."""


@dataclass
class NodeReplay:
    """What :func:`replay_through_node` saw: clouds played, the node's answers by lidar stamp."""

    frames: int                                  # clouds in the bag
    class_names: tuple[str, ...]                 # of the model
    detections: dict[int, Detections] = field(default_factory=dict)  # lidar stamp (ns) -> boxes
    frame_infos: dict[int, Any] = field(default_factory=dict)   # stamp -> FrameInfo
    diagnostics: list[Any] = field(default_factory=list)
    recorded: Path | None = None
    seconds: float = 0.0

    def in_order(self, stamps: Sequence[int]) -> list[Detections]:
        """The node's boxes for each of ``stamps``; no boxes for a frame it did not answer."""
        empty = Detections(boxes=np.zeros((0, len(BOX_COLUMNS)), np.float32),
                           class_names=self.class_names)
        return [self.detections.get(stamp, empty) for stamp in stamps]


def node_params(model: Path, config: PipelineConfig, path: Path, backend: str,
                score_threshold: float | None = None) -> Path:
    """The node's parameter file: the model's pipeline ``config`` (``score_threshold`` replacing
    ``head.score_threshold`` when given) + the node section for bags."""
    if score_threshold is not None:
        config = dataclasses.replace(config, head=dataclasses.replace(
            config.head, score_threshold=score_threshold)).validate()
    node = {"model_dir": str(model.resolve()), "backend": backend, "input_qos": "reliable",
            "time_lag_field": "time_lag", "num_sweeps": 1, "diagnostics_period_s": 0.5}
    save_config(config, path, node=node)
    return path


def replay_through_node(model: Path, bag: Path, out_dir: Path, backend: str = "auto", *,
                        lockstep: bool = True, score_threshold: float | None = None,
                        frame_timeout: float = 60.0, timeout: float = 600.0,
                        domain_id: int | None = None,
                        log: Callable[[str], None] = print) -> NodeReplay:
    """Start the node on ``model``, play ``bag`` into it, record its outputs (module doc).
    ``domain_id``: the ROS domain of both processes (default: one derived from the pid)."""
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = load_config(model / "bevfusion.yaml")
    params = node_params(model, config, out_dir / "node_params.yaml", backend, score_threshold)
    domain = domain_id if domain_id is not None else 1 + os.getpid() % 101
    with safe_ros_process(domain), (out_dir / "node.log").open("w") as node_log:
        process = subprocess.Popen([sys.executable, "-m", "bevfusion_ros.tools.node", "--ros-args",
                                    "--params-file", str(params)],
                                   env=dict(os.environ), stdout=node_log, stderr=subprocess.STDOUT)
        try:
            frames = _play_and_record(bag, out_dir, process, lockstep, frame_timeout, timeout, log)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    replay = NodeReplay(frames, config.head.class_names, recorded=out_dir / RECORDED_FILE,
                        seconds=time.monotonic() - started)
    return _read_outputs(replay)


def _play_and_record(bag: Path, out_dir: Path, process: subprocess.Popen, lockstep: bool,
                     frame_timeout: float, timeout: float, log: Callable[[str], None]) -> int:
    """Play ``bag`` into the running node, recording its outputs; returns the clouds played."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from bevfusion_ros.ros.bag import bag_summary
    from bevfusion_ros.ros.play import play
    from bevfusion_ros.ros.record import Recorder
    from bevfusion_ros.streaming.node_config import NodeConfig

    lidar_topic = NodeConfig().lidar_topic
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("bevfusion_node_runner", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    recorder = Recorder(node, out_dir / RECORDED_FILE, list(OUTPUT_TOPICS))
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    frames = bag_summary(bag)[lidar_topic][1]
    try:
        _wait_for_node(node, process, lidar_topic, out_dir)
        log(f"node up; replaying {bag} ({frames} clouds{', lockstep' if lockstep else ''})")
        played = [0]

        def await_answer(message: Any) -> None:
            if message.topic != lidar_topic:
                return
            played[0] += 1
            if lockstep:
                _wait_for_answers(recorder, played[0], frame_timeout, process)
            if played[0] % 20 == 0:
                log(f"  {played[0]}/{frames} clouds played, "
                    f"{recorder.counts.get(FRAME_INFO_TOPIC, 0)} answered")

        play(bag, node, on_message=await_answer, wait_for_subscribers=60.0)
        _wait_for_answers(recorder, frames, timeout, process)
        time.sleep(1.0)                                  # the diagnostics published after the frame
    finally:
        executor.shutdown()
        spinner.join(timeout=10.0)              # no spin left on what is destroyed below
        recorder.close()                        # its subscriptions, no longer in a wait set
        node.destroy_node()
        context.try_shutdown()
    return frames


def _wait_for_node(node: Any, process: subprocess.Popen, lidar_topic: str, out_dir: Path) -> None:
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while node.count_subscribers(lidar_topic) == 0:
        if process.poll() is not None or time.monotonic() > deadline:
            raise NodeRunError(f"the node did not start: see {out_dir / 'node.log'}")
        time.sleep(0.2)


def _wait_for_answers(recorder: Any, count: int, timeout: float, process: subprocess.Popen) -> None:
    """Wait until ``count`` FrameInfo messages were recorded, at most ``timeout`` seconds (the
    frames left unanswered then show as missing in :meth:`NodeReplay.in_order`)."""
    deadline = time.monotonic() + timeout
    while recorder.counts.get(FRAME_INFO_TOPIC, 0) < count and time.monotonic() <= deadline:
        if process.poll() is not None:
            raise NodeRunError("the node exited while the bag was playing")
        time.sleep(0.01)


def _read_outputs(replay: NodeReplay) -> NodeReplay:
    """Detections (with the FrameInfo velocities) and diagnostics from the recorded bag."""
    from bevfusion_ros.ros.bag import read_bag
    from bevfusion_ros.ros.convert import msg_to_detections, stamp_to_ns
    assert replay.recorded is not None
    infos = {stamp_to_ns(m.message.header.stamp): m.message
             for m in read_bag(replay.recorded, [FRAME_INFO_TOPIC])}
    for bag_message in read_bag(replay.recorded, [DETECTIONS_TOPIC]):
        stamp = stamp_to_ns(bag_message.message.header.stamp)
        info = infos.get(stamp)
        replay.detections[stamp] = msg_to_detections(
            bag_message.message, replay.class_names,
            list(info.velocities) if info is not None else None)
    replay.frame_infos = infos
    replay.diagnostics = [m.message for m in read_bag(replay.recorded, ["/diagnostics"])]
    return replay
