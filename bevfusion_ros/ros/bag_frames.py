"""Frames of a rosbag2 MCAP bag, assembled exactly as the node assembles them.

A bag is one MCAP file or several, read one after the other as one recording (the files of a
rosbag2 recording split by size or duration: synchronisation, sweeps and TF, ``/tf_static`` from
the first file included, carry on across them).

:class:`BagFrames` reads the node's input topics (``Image`` or ``CompressedImage``, CameraInfo,
``PointCloud2``, ``/tf``, ``/tf_static``) in log-time order, converts them at the same edge as the
node (:mod:`bevfusion_ros.ros.edge`) and feeds one
:class:`~bevfusion_ros.streaming.assembler.FrameAssembler` with the same settings. The node's
clocks become the bag's log time: a ``wait`` for late cameras times out in log time, and a sweep
is assembled once the bag has passed its log time + ``node.tf_timeout_s`` (the odometry the node
would have waited for is then in the TF buffer). What the node would report (unreadable clouds,
drops, resets, refused transforms or CameraInfo) goes to :attr:`BagFrames.problems`.
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Iterator, Sequence

from bevfusion_ros.camera.jpeg import ImageDecoder
from bevfusion_ros.config import PipelineConfig
from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.pipeline import InputError
from bevfusion_ros.ros import convert, edge
from bevfusion_ros.ros.bag import read_bag
from bevfusion_ros.streaming.assembler import AssembledFrame, FrameAssembler, Ingest
from bevfusion_ros.streaming.node_config import NodeConfig
from bevfusion_ros.streaming.sync import SyncedFrame

#: Far beyond any bag: the time at which everything still pending is due.
_END_NS = 2 ** 62


class BagFrames:
    """Iterate over the :class:`AssembledFrame`\\ s of the bag at ``path``: one MCAP file, or a
    sequence of them read as one recording (module docstring).
    ``file_calibration`` and ``decoder`` (of CompressedImage data) as the node gives them to its
    :class:`FrameAssembler`."""

    def __init__(self, path: str | Path | Sequence[str | Path], config: PipelineConfig, settings: NodeConfig,
                 file_calibration: Calibration | None = None, decoder: ImageDecoder | None = None) -> None:
        self.paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(part) for part in path]
        self.config, self.settings = config, settings
        self.assembler = FrameAssembler(config, settings, file_calibration, decoder)
        self.problems: list[str] = []
        suffix = "/compressed" if settings.compressed_images else ""
        self._camera_of_topic = {f"{topic}{suffix}": name
                                 for name, topic in zip(config.camera_names, settings.camera_topics)}
        self._camera_of_info = dict(zip(settings.info_topics(), config.camera_names))
        self._pending: collections.deque[tuple[int, SyncedFrame]] = collections.deque()

    def topics(self) -> list[str]:
        return [*self._camera_of_topic, *self._camera_of_info, self.settings.lidar_topic, "/tf", "/tf_static"]

    def __iter__(self) -> Iterator[AssembledFrame]:
        try:
            for bag_message in self._messages():
                now_ns = bag_message.log_time_ns
                yield from self._due(now_ns)
                self._queue(self._feed(bag_message.topic, bag_message.message, now_ns), now_ns)
                self._queue(self.assembler.poll(now_ns), now_ns)
            self._queue(self.assembler.poll(_END_NS), _END_NS)
            yield from self._due(_END_NS + 1)
        finally:
            self.assembler.close()

    def _messages(self) -> Iterator[Any]:
        for path in self.paths:
            yield from read_bag(path, self.topics())

    def _due(self, now_ns: int) -> Iterator[AssembledFrame]:
        while self._pending and self._pending[0][0] < now_ns:
            yield self.assembler.assemble(self._pending.popleft()[1])

    def _queue(self, ingest: Ingest, now_ns: int) -> None:
        if ingest.reset:
            self.problems.append(f"input stamps went backwards ({ingest.reset}): buffers cleared")
        self.problems.extend(f"sweep dropped: {drop.detail}" for drop in ingest.drops)
        due_ns = now_ns + int(self.settings.tf_timeout_s * 1e9)
        self._pending.extend((due_ns, synced) for synced in ingest.frames)

    def _feed(self, topic: str, msg: Any, now_ns: int) -> Ingest:
        """One message into the assembler, converted as the node converts it."""
        if topic in self._camera_of_topic:
            image = edge.image_input(msg, self.settings.compressed_images)
            return self.assembler.add_image(self._camera_of_topic[topic], convert.stamp_to_ns(msg.header.stamp),
                                            msg.header.frame_id, image)
        if topic == self.settings.lidar_topic:
            try:   # received_s 0: long ago, so assembly never waits in wall time (the bag's time did)
                sweep = edge.sweep_input(msg, self.settings, received_s=0.0)
            except InputError as error:
                self.problems.append(f"frame at {convert.stamp_to_ns(msg.header.stamp)} ns skipped: {topic}: {error}")
                return Ingest()
            return self.assembler.add_cloud(sweep, now_ns=now_ns)
        if topic in self._camera_of_info:
            problem = edge.set_camera_info(self.assembler, self._camera_of_info[topic], msg)
            self.problems.extend([problem] if problem else [])
        else:
            self.problems.extend(edge.add_transforms(self.assembler, msg, topic == "/tf_static"))
        return Ingest()
