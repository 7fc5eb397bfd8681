"""``bevfusion_node``: 6 cameras + 1 lidar in, 3D detections, RViz markers and diagnostics out
(optionally Autoware's DetectedObjects on ``~/objects``; all in ``node.output_frame`` when set).

    bevfusion_node --ros-args --params-file config/nuscenes.yaml -p node.model_dir:=DIR

The callbacks read each message (:mod:`~bevfusion_ros.ros.cdr`), convert it at the edge
(:mod:`~bevfusion_ros.ros.edge`) and feed the :class:`~bevfusion_ros.streaming.assembler.FrameAssembler`;
a :class:`~bevfusion_ros.streaming.worker.FrameWorker` thread assembles each synchronised frame,
runs the pipeline and publishes. Bad input costs at most its own frame and is reported on
``/diagnostics``. Data flow, outputs and the handling of bad input: ``docs/node.md``.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bevfusion_ros_msgs.msg import FrameInfo
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.publisher import Publisher
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.subscription import Subscription
from rclpy.timer import Timer
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage
from vision_msgs.msg import Detection3DArray
from visualization_msgs.msg import MarkerArray

from bevfusion_ros.camera.jpeg import ImageDecoder
from bevfusion_ros.config import ConfigError, PipelineConfig, load_config
from bevfusion_ros.detections import Detections
from bevfusion_ros.pipeline import CONFIG_FILE, BEVFusionPipeline, InputError, ModelDirError
from bevfusion_ros.ros import autoware, cdr, convert, edge, parameters
from bevfusion_ros.streaming.assembler import FrameAssembler, Ingest, Sweep, output_warnings, settings_calibration
from bevfusion_ros.streaming.node_config import (
    NodeConfig,
    command_line_parameters,
    configs_from_parameters,
    nest_dotted,
)
from bevfusion_ros.streaming.score_thresholds import ScoreThresholds
from bevfusion_ros.streaming.sync import DROP_REASONS, MISSING_CAMERA_POLICIES, SyncedFrame
from bevfusion_ros.streaming.worker import FrameWorker

NODE_NAME = "bevfusion"
RCLPY_PARAMETERS = {"use_sim_time", "start_type_description_service"}   # declared by rclpy itself
POLL_PERIOD_S = 0.02
FLUSH_TIMEOUT_S = 10.0      # deactivation: longest wait for the frames already queued
#: Diagnostic levels as ints (DiagnosticStatus.OK/WARN/ERROR are bytes).
OK, WARN, ERROR = (ord(level) for level in (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR))
#: Frames dropped by the worker's queue (newer frames arrived while it was busy).
DROP_QUEUE_FULL = "queue_full"
RELIABLE_INPUTS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5,
                             reliability=ReliabilityPolicy.RELIABLE)
OUTPUT_FRAME_PROBLEM = (
    "no transform from the lidar frame {source!r} to node.output_frame {target!r} at {stamp} ns ({error}): "
    "the frame is not published (its boxes are never published in another frame than node.output_frame)")
TF_STATIC_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                           reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.TRANSIENT_LOCAL)


class OutputFrameError(LookupError):
    """A frame whose boxes cannot be moved into ``node.output_frame`` (no TF at its stamp)."""


@dataclass(frozen=True)
class CloudArrival:
    """When a sweep reached the node: ``monotonic_s`` of its callback, and ``transport_ms`` from
    the publisher's write (the DDS source timestamp, same host clock) to that callback."""

    monotonic_s: float
    transport_ms: float


class FramePhases:
    """Consecutive phases of one frame, milliseconds by name in order: :meth:`lap` closes the
    phase that ran since the previous lap (or since ``start_s``, a ``time.monotonic()``)."""

    def __init__(self, start_s: float, **earlier_ms: float) -> None:
        self.ms: dict[str, float] = dict(earlier_ms)
        self._last_s = start_s

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.ms[name] = self.ms.get(name, 0.0) + (now - self._last_s) * 1e3
        self._last_s = now


@dataclass
class NodeStatus:
    """What /diagnostics reports; written by callbacks and the worker (under ``lock``).

    ``event_level``/``event``: the most severe event (failed frame, dropped sweep, calibration or
    TF error) since the last diagnostic, reported once; ``frame_warnings``: why the last frame
    out was degraded, empty once a clean frame followed.
    """

    frames_in: int = 0
    frames_out: int = 0
    frames_failed: int = 0
    dropped: collections.Counter = field(default_factory=collections.Counter)   # reason -> sweeps
    calibration_errors: int = 0
    tf_errors: int = 0
    event_level: int = 0
    event: str = ""
    frame_warnings: tuple[str, ...] = ()
    cameras_used: tuple[str, ...] = ()
    cameras_missing: dict[str, str] = field(default_factory=dict)
    stage_ms: dict[str, float] = field(default_factory=dict)
    phase_ms: dict[str, float] = field(default_factory=dict)
    latency_ms: float = 0.0
    input_age_ms: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class BEVFusionBehaviour:
    """What the plain and the managed node do, in lifecycle steps: :meth:`_configure` reads and
    declares the parameters and loads the model (slow, once), :meth:`_open_io` creates the
    subscriptions, publishers and timers, :meth:`_close_io` removes them (the calibration and
    the sweep history stay), :meth:`_unload` frees the model. Mixed into a ``Node``."""

    pipeline: BEVFusionPipeline | None = None
    worker: FrameWorker | None = None
    assembler: FrameAssembler | None = None
    _io: list[Any] = []                      # publishers, subscriptions, timers while active
    objects_pub: Publisher | None = None     # ~/objects, when node.publish_autoware_objects

    def _configure(self, command_line: Sequence[str]) -> None:
        model_dir, self.config, self.settings = self._read_parameters(command_line)
        if self.settings.publish_autoware_objects:
            autoware.objects_message_type()              # missing: a ConfigError before the slow load
        self.pipeline = BEVFusionPipeline.from_model_dir(model_dir, self.config, self.settings.backend,
                                                         self.settings.precision)
        self._set_score_thresholds(ScoreThresholds.from_entries(
            self.config.head.score_threshold, self.settings.class_score_thresholds, self.config.head.class_names))
        self.status = NodeStatus()
        decoder = None
        if self.settings.compressed_images:
            decoder, why = ImageDecoder.for_pipeline(self.pipeline.device)
            self.get_logger().info(f"CompressedImage decoding: {why}")
        self.assembler = FrameAssembler(self.config, self.settings,
                                         settings_calibration(self.settings, self.config), decoder)
        self.worker = FrameWorker(self._process, self._on_frame_error, self.settings.queue_size)
        self.get_logger().info(
            f"model {model_dir} on backend {self.pipeline.backend} "
            f"({self.pipeline.model_info.get('weights', 'weights?')}); "
            f"cameras {list(self.config.camera_names)}; lidar {self.settings.lidar_topic}; "
            f"missing_camera={self.settings.sync.missing_camera}; sweeps={self.settings.num_sweeps}")
        if self.pipeline.trained is False:
            self.get_logger().warning("the model's weights are UNTRAINED: boxes are meaningless")
        elif self.pipeline.weights_note:
            self.get_logger().info(self.pipeline.weights_note)

    def _read_parameters(self, command_line: Sequence[str]) -> tuple[Path, PipelineConfig, NodeConfig]:
        """The model folder and the validated configs from the parameters (declared from the
        overrides; ``-p`` values of a wrong type read again from ``command_line``); then every
        parameter is declared again with its descriptor (:mod:`bevfusion_ros.ros.parameters`)."""
        given = [name for name in self.list_parameters([], 0).names
                 if name not in RCLPY_PARAMETERS and not name.startswith("qos_overrides.")]
        flat = {name: self.get_parameter(name).value for name in given}
        flat.update((name, value) for name, value in command_line_parameters(command_line, NODE_NAME).items()
                    if name not in RCLPY_PARAMETERS)
        model_dir = Path(str(flat.get("node.model_dir", NodeConfig.model_dir)))
        if not model_dir.is_dir():
            raise ModelDirError(f"model folder {model_dir} (node.model_dir) does not exist")
        model_config_path = model_dir / CONFIG_FILE
        model_config = load_config(model_config_path) if model_config_path.is_file() else None
        config, settings = configs_from_parameters(nest_dotted(flat), model_config, model_config_path)
        values = parameters.parameter_values(config, settings)
        for name, descriptor in parameters.descriptors(config, settings).items():
            if self.has_parameter(name):
                if self.describe_parameter(name).read_only:      # described at an earlier configure
                    continue
                self.undeclare_parameter(name)
            self.declare_parameter(name, values[name], descriptor, ignore_override=True)
        if not getattr(self, "_parameter_callback_added", False):
            self.add_on_set_parameters_callback(self._on_set_parameters)
            self._parameter_callback_added = True
        return model_dir, config, settings

    def _on_set_parameters(self, changes: list[Parameter]) -> SetParametersResult:
        """Run-time changes (:data:`~bevfusion_ros.ros.parameters.RUNTIME_PARAMETERS`; rclpy
        refuses the read-only ones): checked, then used from the next frame on."""
        for change in changes:
            if change.name == "node.sync.missing_camera" and change.value not in MISSING_CAMERA_POLICIES:
                return SetParametersResult(successful=False, reason=(
                    f"node.sync.missing_camera must be one of {list(MISSING_CAMERA_POLICIES)}, got {change.value!r}"))
            if change.name == "node.class_score_thresholds":
                try:
                    self.score_thresholds.with_entries(change.value)
                except ConfigError as error:
                    return SetParametersResult(successful=False, reason=str(error))
        for change in changes:
            self._apply(change.name, change.value)
        return SetParametersResult(successful=True)

    def _apply(self, name: str, value: Any) -> None:
        if name == "head.score_threshold":
            self._set_score_thresholds(self.score_thresholds.with_default(value))
        elif name == "node.class_score_thresholds":
            self._set_score_thresholds(self.score_thresholds.with_entries(value))
        elif name == "node.sync.missing_camera" and self.assembler is not None:
            self.assembler.sync.missing_camera = value
            self.settings = dataclasses.replace(self.settings, sync=dataclasses.replace(self.settings.sync,
                                                                                          missing_camera=value))
        elif name == "node.publish_markers":
            self.settings = dataclasses.replace(self.settings, publish_markers=bool(value))
        self.get_logger().info(f"parameter {name} set to {value!r} (from the next frame on)")

    def _set_score_thresholds(self, thresholds: ScoreThresholds) -> None:
        """Per-class thresholds from the next frame on: the head keeps what the lowest one allows,
        :meth:`ScoreThresholds.apply` cuts each class (:mod:`~bevfusion_ros.streaming.score_thresholds`)."""
        self.score_thresholds = thresholds
        if self.pipeline is not None:
            self.pipeline.set_score_threshold(thresholds.decode_threshold)

    def _open_io(self) -> None:
        """Subscriptions, publishers and timers (:meth:`_close_io` removes them)."""
        settings = self.settings
        inputs = qos_profile_sensor_data if settings.input_qos == "sensor_data" else RELIABLE_INPUTS
        image_type = CompressedImage if settings.compressed_images else Image
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.detections_pub = self.create_publisher(Detection3DArray, "~/detections", reliable)
        self.frame_info_pub = self.create_publisher(FrameInfo, "~/frame_info", reliable)
        self.markers_pub = self.create_publisher(MarkerArray, "~/markers", reliable)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", reliable)
        io = [self.detections_pub, self.frame_info_pub, self.markers_pub, self.diagnostics_pub]
        self.objects_pub = None
        if settings.publish_autoware_objects:
            self.objects_pub = self.create_publisher(autoware.objects_message_type(), "~/objects", reliable)
            io.append(self.objects_pub)
        for camera, topic, info_topic in zip(self.config.camera_names, settings.camera_topics,
                                             settings.info_topics()):
            image_topic = f"{topic}/compressed" if settings.compressed_images else topic
            io.append(self.create_subscription(image_type, image_topic,    # serialized: cdr reads it without copies
                                               lambda raw, name=camera: self._on_image(name, raw), inputs, raw=True))
            io.append(self.create_subscription(CameraInfo, info_topic, lambda msg, name=camera:
                                               self._on_camera_info(name, msg), RELIABLE_INPUTS))
        io.append(self.create_subscription(PointCloud2, settings.lidar_topic, self._on_cloud, inputs, raw=True))
        io.append(self.create_subscription(TFMessage, "/tf", lambda msg: self._on_tf(msg, False), RELIABLE_INPUTS))
        io.append(self.create_subscription(TFMessage, "/tf_static", lambda msg: self._on_tf(msg, True), TF_STATIC_QOS))
        io.append(self.create_timer(POLL_PERIOD_S, self._poll_sync))
        io.append(self.create_timer(settings.diagnostics_period_s, self.publish_diagnostics))
        self._io = io

    def _close_io(self) -> None:
        """Remove what :meth:`_open_io` made: inputs first, then the frames already queued are
        finished and published, then the publishers go."""
        entities = self._io
        for entity in entities:
            if isinstance(entity, Subscription):
                self.destroy_subscription(entity)
            elif isinstance(entity, Timer):
                self.destroy_timer(entity)
        if self.worker is not None:
            self.worker.wait_idle(FLUSH_TIMEOUT_S)
        self._io = []
        for entity in entities:
            if isinstance(entity, Publisher):
                self.destroy_publisher(entity)

    def _unload(self) -> None:
        """Stop the worker, free the model (GPU memory) and the assembler."""
        if self.worker is not None:
            self.worker.close()
        if self.assembler is not None:
            self.assembler.close()
        self.worker = self.assembler = self.pipeline = None


    # ---------------------------------------------------------------- callbacks (never block)
    def _clock_ns(self) -> int | None:
        """The node's clock (ROS time) in ns, None before a simulated clock has started."""
        return self.get_clock().now().nanoseconds or None

    def _on_image(self, camera: str, raw: bytes) -> None:
        try:
            msg = (cdr.read_compressed_image if self.settings.compressed_images else cdr.read_image)(raw)
        except cdr.CdrError as error:
            self._report(WARN, f"camera {camera}: unreadable image message: {error}")
            return
        stamp_ns = convert.stamp_to_ns(msg.header.stamp)
        image = edge.image_input(msg, self.settings.compressed_images)
        ingest = self.assembler.add_image(camera, stamp_ns, msg.header.frame_id, image, self._clock_ns())
        if ingest.image_refused:
            self._report(WARN, f"image of camera {camera} dropped: stamp {stamp_ns} ns is more than "
                         f"node.sync.max_future_s = {self.settings.sync.max_future_s:g} s ahead of the node's clock")
        self._handle(ingest)

    def _on_camera_info(self, camera: str, msg: CameraInfo) -> None:
        problem = edge.set_camera_info(self.assembler, camera, msg)
        if problem:
            self._report(WARN, problem, "calibration_errors")

    def _on_tf(self, msg: TFMessage, static: bool) -> None:
        for error in edge.add_transforms(self.assembler, msg, static):
            self._report(WARN, error, "tf_errors")

    def _on_cloud(self, raw: bytes, info: Any) -> None:
        """Count the sweep, convert it and hand it to the assembler. ``raw`` is the serialized
        PointCloud2, ``info`` rclpy's MessageInfo (``source_timestamp``: when the publisher wrote it)."""
        arrival = CloudArrival(time.monotonic(), (time.time_ns() - info["source_timestamp"]) / 1e6)
        with self.status.lock:
            self.status.frames_in += 1
        topic = self.settings.lidar_topic
        try:
            msg = cdr.read_point_cloud(raw)
        except cdr.CdrError as error:
            self._fail_cloud(f"{topic}: unreadable PointCloud2 message: {error}")
            return
        try:
            sweep = edge.sweep_input(msg, self.settings, arrival.monotonic_s, arrival)
        except InputError as error:
            self._fail_cloud(f"frame at {convert.stamp_to_ns(msg.header.stamp)} ns skipped: {topic}: {error}")
            return
        self._handle(self.assembler.add_cloud(sweep, self._clock_ns()))

    def _fail_cloud(self, message: str) -> None:
        """A sweep that cannot be read: its frame fails (never kept as a past sweep either)."""
        with self.status.lock:
            self.status.frames_failed += 1
        self._report(ERROR, message)

    def _poll_sync(self) -> None:
        self._handle(self.assembler.poll())

    def _handle(self, ingest: Ingest) -> None:
        """Report a reset of the synchroniser (stamps going backwards) and every sweep it dropped,
        and hand the frames it completed to the worker."""
        if ingest.reset:
            self._report(WARN, f"input stamps went backwards ({ingest.reset}): buffers cleared (bag loop?)")
        for drop in ingest.drops:
            with self.status.lock:
                self.status.dropped[drop.reason] += 1
            self._report(WARN, f"sweep dropped: {drop.detail}")
        for synced in ingest.frames:
            self.worker.submit((synced, time.monotonic()))

    # ---------------------------------------------------------------- worker thread
    def _on_frame_error(self, item: tuple[SyncedFrame, float], error: BaseException) -> None:
        synced = item[0]
        with self.status.lock:
            self.status.frames_failed += 1
        if isinstance(error, (ValueError, LookupError)):          # InputError is a ValueError
            self._report(ERROR, f"frame at {synced.lidar_stamp_ns} ns skipped: {error}")
            return
        self._report(ERROR, f"frame at {synced.lidar_stamp_ns} ns failed: {error!r}")
        self.get_logger().error("".join(traceback.format_exception(error)))

    def _process(self, item: tuple[SyncedFrame, float]) -> None:
        """One synchronized frame (queued at monotonic ``item[1]``): assemble, infer, publish,
        each phase timed (:class:`FramePhases`)."""
        synced, queued_s = item
        arrival: CloudArrival = synced.lidar.context
        phases = FramePhases(arrival.monotonic_s, transport=arrival.transport_ms)
        phases.ms["sync"] = (queued_s - arrival.monotonic_s) * 1e3
        phases.lap("queue")
        assembled = self.assembler.assemble(synced, phases.lap)
        if assembled.calibration_error:
            self._report(WARN, assembled.calibration_error, "calibration_errors")
        detections = self.pipeline.forward(assembled.frame, assembled.cameras_used)
        phases.lap("forward")
        detections = self._in_output_frame(self.score_thresholds.apply(detections), assembled.sweep)
        header = Header(stamp=convert.ns_to_stamp(synced.lidar_stamp_ns), frame_id=detections.frame_id)
        self._publish(header, detections, assembled.missing, arrival.monotonic_s, phases,
                      output_warnings(assembled, detections.warnings))

    def _in_output_frame(self, detections: Detections, sweep: Sweep) -> Detections:
        """The boxes in ``node.output_frame`` (the sweep's frame when empty), moved by TF at the
        sweep's stamp, waited for until ``node.tf_timeout_s`` after the sweep arrived; raises
        :class:`OutputFrameError` without that TF (the frame then fails and is not published)."""
        target = self.settings.output_frame
        if not target or target.lstrip("/") == sweep.frame_id.lstrip("/"):
            return dataclasses.replace(detections, frame_id=sweep.frame_id)
        timeout_s = sweep.received_s + self.settings.tf_timeout_s - time.monotonic()
        try:
            matrix = self.assembler.transforms.wait_for_transform(target, sweep.frame_id, sweep.stamp_ns, timeout_s)
        except (LookupError, ValueError) as error:
            raise OutputFrameError(OUTPUT_FRAME_PROBLEM.format(source=sweep.frame_id, target=target,
                                                               stamp=sweep.stamp_ns, error=error)) from None
        return detections.transformed(matrix, target)

    # ---------------------------------------------------------------- outputs
    def _publish(self, header: Header, detections: Any, missing: dict[str, str], arrival_s: float,
                 phases: FramePhases, warnings: tuple[str, ...]) -> None:
        """Detections first (what latency is measured to), markers, then the FrameInfo that
        carries the frame's timings (``outputs``: the two before it)."""
        if not self.context.ok() or not self._io:
            return
        out_header = Header(stamp=header.stamp, frame_id=header.frame_id)
        self.detections_pub.publish(convert.serialize_detections(detections, out_header))
        latency_ms = (time.monotonic() - arrival_s) * 1e3
        if self.settings.publish_markers:
            self.markers_pub.publish(convert.serialize_markers(detections, out_header))
        if self.objects_pub is not None:
            self.objects_pub.publish(autoware.serialize_detected_objects(detections, out_header))
        phases.lap("outputs")
        info = convert.frame_info(out_header, detections, missing, self.pipeline.backend, latency_ms, warnings,
                                  phases.ms)
        self.frame_info_pub.publish(info)
        now_ns = self.get_clock().now().nanoseconds
        with self.status.lock:
            status = self.status
            state_changed = bool(status.frame_warnings) != bool(warnings)
            status.frames_out += 1
            status.cameras_used, status.cameras_missing = detections.cameras_used, dict(missing)
            status.stage_ms, status.latency_ms = dict(detections.stage_ms), latency_ms
            status.phase_ms = dict(phases.ms)
            status.input_age_ms = (now_ns - convert.stamp_to_ns(header.stamp)) / 1e6
            status.frame_warnings = warnings
        for warning in warnings:
            self.get_logger().warning(f"frame at {convert.stamp_to_ns(header.stamp)} ns degraded: {warning}")
        if state_changed:                                 # degraded <-> clean: say so at once
            self.publish_diagnostics()

    def _report(self, level: int, message: str, counter: str | None = None) -> None:
        """Log ``message``, count it in ``counter`` (a NodeStatus field), make it the event of the
        next diagnostic (unless a more severe one is pending) and publish that at once."""
        if level >= ERROR:                       # (rclpy wants one severity per call site)
            self.get_logger().error(message)
        else:
            self.get_logger().warning(message)
        with self.status.lock:
            if counter:
                setattr(self.status, counter, getattr(self.status, counter) + 1)
            if level >= self.status.event_level:
                self.status.event_level, self.status.event = level, message
        self.publish_diagnostics()

    def diagnostic_values(self) -> dict[str, Any]:
        """The counters and state /diagnostics carries (under ``status.lock``)."""
        status = self.status
        dropped = {reason: status.dropped[reason] for reason in DROP_REASONS}
        dropped[DROP_QUEUE_FULL] = self.worker.dropped
        frames_dropped = sum(dropped.values())
        return {"backend": self.pipeline.backend, "frames_in": status.frames_in,
                "frames_out": status.frames_out, "frames_dropped": frames_dropped,
                "frames_failed": status.frames_failed,
                "frames_in_progress": status.frames_in - status.frames_out - frames_dropped - status.frames_failed,
                **{f"dropped.{reason}": count for reason, count in dropped.items()},
                "sync_resets": self.assembler.sync.resets, "future_images": self.assembler.sync.future_images,
                "calibration_errors": status.calibration_errors, "tf_errors": status.tf_errors,
                "cameras_used": ",".join(status.cameras_used),
                "cameras_missing": "; ".join(f"{k}: {v}" for k, v in status.cameras_missing.items()),
                "frame_warnings": "; ".join(status.frame_warnings),
                "latency_ms": round(status.latency_ms, 3), "input_age_ms": round(status.input_age_ms, 3),
                "last_event": status.event,
                **{f"stage_ms.{name}": round(ms, 3) for name, ms in status.stage_ms.items()},
                **{f"phase_ms.{name}": round(ms, 3) for name, ms in status.phase_ms.items()}}

    def publish_diagnostics(self) -> None:
        """One DiagnosticStatus with the node's state: the pending event's level (ERROR for a
        failed frame, WARN for drops, resets and calibration/TF errors; reported once), at least
        WARN while the last frame out was degraded, else OK."""
        if not self.context.ok() or not self._io:         # shutting down (SIGINT/SIGTERM), inactive
            return
        with self.status.lock:
            status = self.status
            values = self.diagnostic_values()
            level, message = OK, "ok"
            if status.frame_warnings:
                level, message = WARN, "degraded: " + "; ".join(status.frame_warnings)
            if status.event and status.event_level >= level:
                level, message = status.event_level, status.event
            status.event_level, status.event = OK, ""     # reported once
        diagnostic = DiagnosticStatus(level=bytes([level]), name=f"{self.get_name()}: pipeline", message=message,
                                      hardware_id=self.pipeline.backend,
                                      values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        array = DiagnosticArray(status=[diagnostic])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_pub.publish(array)


class BEVFusionNode(BEVFusionBehaviour, Node):
    """The plain node: configured and active from construction. ``parameter_overrides`` (tests)
    add to the command line's parameters, and ``command_line`` (``sys.argv`` for ``main``) is
    read again for ``-p`` values of a wrong type."""

    def __init__(self, command_line: Sequence[str] = (), **node_options: Any) -> None:
        super().__init__(NODE_NAME, automatically_declare_parameters_from_overrides=True, **node_options)
        self._configure(command_line)
        self._open_io()

    def destroy_node(self) -> None:
        self._unload()
        super().destroy_node()


class BEVFusionLifecycleNode(BEVFusionBehaviour, LifecycleNode):
    """The managed node (``bevfusion_lifecycle_node``), unconfigured at start: ``configure``
    loads the model and builds its engines (slow, once), ``activate`` subscribes and publishes,
    ``deactivate`` stops both (the calibration and sweep history stay), ``cleanup`` and
    ``shutdown`` free the model and its GPU memory."""

    def __init__(self, command_line: Sequence[str] = (), **node_options: Any) -> None:
        super().__init__(NODE_NAME, automatically_declare_parameters_from_overrides=True, **node_options)
        self._command_line = tuple(command_line)

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        from bevfusion_ros.tools.cli import USER_ERRORS
        try:
            self._configure(self._command_line)
        except USER_ERRORS as error:
            self.get_logger().error("cannot configure: " + " ".join(str(error).split()))
            self._unload()
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._open_io()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._close_io()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._unload()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._close_io()
        self._unload()
        return TransitionCallbackReturn.SUCCESS

    def destroy_node(self) -> None:
        self._close_io()
        self._unload()
        super().destroy_node()
