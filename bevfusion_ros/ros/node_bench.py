"""Node benchmark: ``bevfusion_node`` fed over ROS 2 at sensor rate, timed from publish to answer.

    bevfusion-bench --through-node --model DIR --data EXAMPLE_DATA --backend gpu \\
                    --rates 12 25 --duration 60 [--compressed] [--sweeps N] [--json OUT]

Three processes, as on a vehicle: the node, a publisher (:func:`publish`) and this process, the
recorder. Latency of a frame = ``Detection3DArray`` received - the publisher's call to publish
the cloud. The processes, what each measures and how unanswered frames count:
docs/benchmarks.md, "Node benchmark".
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bevfusion_ros.ros.environment import safe_ros_process

NS_PER_S = 1_000_000_000
TOPIC_PREFIX = "/bench"
LIDAR_TOPIC = f"{TOPIC_PREFIX}/points"
NODE_NAME = "bevfusion"
DETECTIONS_TOPIC = f"/{NODE_NAME}/detections"
FRAME_INFO_TOPIC = f"/{NODE_NAME}/frame_info"
DIAGNOSTICS_TOPIC = "/diagnostics"
PIPELINE_STATUS = f"{NODE_NAME}: pipeline"
WORLD_FRAME = "odom"
PUBLISHED_FILE = "published.jsonl"
REPORT_FILE = "node_bench.json"
PHASE_GAP_S = 1.0           # pause between two rates: the node's queue drains
ANSWER_GRACE_S = 3.0        # after the last frame, wait this long for late answers
COUNTERS_GRACE_S = 10.0     # then this long for a diagnostic that accounts for every frame sent
POLL_S = 0.05
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class NodeBenchOptions:
    """What to run. Rates in Hz, durations in seconds."""

    model_dir: Path
    data_dir: Path
    out_dir: Path
    backend: str = "auto"
    precision: str = "fp16"
    rates_hz: tuple[float, ...] = (12.0,)
    duration_s: float = 60.0            # each rate
    warmup_s: float = 5.0               # at the first rate, not measured
    compressed: bool = False
    num_sweeps: int = 1                 # > 1: past sweeps from /tf odometry instead of the cloud's time_lag
    ego_speed_mps: float = 5.0          # odometry of the sweeps mode: the ego drives along +x
    domain_id: int | None = None
    startup_timeout_s: float = 300.0    # node start (model load, GPU warm-up) until its topics match
    check_boxes: bool = False           # compare the node's boxes with the library path's (same backend)
    node_source: Path | None = None     # run the node of another checkout (e.g. a baseline); None: this one
    input_qos: str = "sensor_data"      # the node's node.input_qos (tests: reliable, nothing lost)
    score_threshold: float | None = None  # head.score_threshold of node and library path (None: the model's)

    def validate(self) -> "NodeBenchOptions":
        if not self.rates_hz or min(self.rates_hz) <= 0 or self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("rates and duration must be positive, warm-up not negative")
        if self.num_sweeps < 1:
            raise ValueError("num_sweeps must be at least 1")
        from bevfusion_ros.streaming.node_config import INPUT_QOS
        if self.input_qos not in INPUT_QOS:
            raise ValueError(f"input_qos must be one of {list(INPUT_QOS)}, got {self.input_qos!r}")
        return self

    def schedule(self) -> list[tuple[int, float, float]]:
        """(window, rate, seconds after the start) of every frame: window -1 is the warm-up,
        window i the i-th rate of ``rates_hz``."""
        frames, start = [], 0.0
        phases = [(-1, self.rates_hz[0], self.warmup_s)] + [(i, rate, self.duration_s)
                                                             for i, rate in enumerate(self.rates_hz)]
        for window, rate, seconds in phases:
            count = int(round(seconds * rate))
            frames += [(window, rate, start + k / rate) for k in range(count)]
            start += count / rate + (PHASE_GAP_S if count else 0.0)
        return frames


# ------------------------------------------------------------------------------- node
def camera_topics(camera_names: Sequence[str]) -> list[str]:
    return [f"{TOPIC_PREFIX}/{name}/image_raw" for name in camera_names]


def pipeline_config(options: NodeBenchOptions) -> Any:
    """The model's pipeline config, with ``score_threshold`` when given."""
    from bevfusion_ros.config import load_config
    config = load_config(options.model_dir / "bevfusion.yaml")
    if options.score_threshold is None:
        return config
    return dataclasses.replace(config, head=dataclasses.replace(
        config.head, score_threshold=options.score_threshold)).validate()


def node_parameters(options: NodeBenchOptions, path: Path) -> Path:
    """The node's parameter file: the model's pipeline config + the benchmark's node section."""
    from bevfusion_ros.config import save_config
    config = pipeline_config(options)
    sweeps = options.num_sweeps > 1
    node = {"model_dir": str(options.model_dir.resolve()), "backend": options.backend,
            "precision": options.precision, "lidar_topic": LIDAR_TOPIC,
            "camera_topics": camera_topics(config.camera_names), "compressed_images": options.compressed,
            "input_qos": options.input_qos, "time_lag_field": "" if sweeps else "time_lag",
            "num_sweeps": options.num_sweeps, "world_frame": WORLD_FRAME, "diagnostics_period_s": 0.5,
            "sync": {"slop_s": min(0.05, 0.4 / max(options.rates_hz))}}
    save_config(config, path, node=node)
    return path


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (all its threads), seconds; None once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------- publisher
def frame_bundle(options: NodeBenchOptions) -> tuple[Any, tuple[str, ...]]:
    """The example frame's messages (FrameMessages with the images as ``Image`` rgb8 or, with
    ``compressed``, the folder's JPEG files as ``CompressedImage``; a 4-column cloud with sweeps)
    and its camera names."""
    from sensor_msgs.msg import CompressedImage

    from bevfusion_ros.io import load_example_data
    from bevfusion_ros.ros.frame_messages import cloud_message, frame_messages
    frame = load_example_data(options.data_dir)
    messages = frame_messages(frame, time.time_ns())
    if options.compressed:
        names = frame.calibration.camera_names
        messages.images = [CompressedImage(header=image.header, format="jpeg",
                                           data=(options.data_dir / f"{i}-{name}.jpg").read_bytes())
                           for i, (image, name) in enumerate(zip(messages.images, names))]
    if options.num_sweeps > 1:
        messages.cloud = cloud_message(frame.points[:, :4], time.time_ns(), messages.cloud.header.frame_id,
                                       ("x", "y", "z", "intensity"))
    return messages, frame.calibration.camera_names


class BenchPublisher:
    """The publisher process's rclpy side: sensor publishers (best effort, as live drivers),
    ``/tf_static`` latched, ``/tf`` reliable."""

    def __init__(self, camera_names: Sequence[str], compressed: bool, input_qos: str = "sensor_data") -> None:
        import rclpy
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
        from tf2_msgs.msg import TFMessage
        rclpy.init()
        self.node = rclpy.create_node("bevfusion_bench_publisher")
        create = self.node.create_publisher
        image_type, suffix = (CompressedImage, "/compressed") if compressed else (Image, "")
        topics = camera_topics(camera_names)
        sensor = (qos_profile_sensor_data if input_qos == "sensor_data"
                  else QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
        self.images = [create(image_type, topic + suffix, sensor) for topic in topics]
        self.infos = [create(CameraInfo, topic.rsplit("/", 1)[0] + "/camera_info",
                             QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)) for topic in topics]
        self.cloud = create(PointCloud2, LIDAR_TOPIC, sensor)
        self.tf = create(TFMessage, "/tf", QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self.tf_static = create(TFMessage, "/tf_static", QoSProfile(
            depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))

    def matched(self) -> bool:
        return all(p.get_subscription_count() > 0 for p in (*self.images, *self.infos, self.cloud, self.tf_static))

    def close(self) -> None:
        import rclpy
        self.node.destroy_node()
        rclpy.try_shutdown()


def publish(options: NodeBenchOptions, timeout_s: float) -> int:
    """The publisher process (docs/benchmarks.md): wait until the node subscribes, then publish the
    schedule, one JSON line per frame into ``out_dir/published.jsonl``. Exit status 2 when the
    node never subscribed within ``timeout_s``."""
    from bevfusion_ros.ros.convert import ns_to_stamp
    from bevfusion_ros.ros.soak import odometry_message
    messages, camera_names = frame_bundle(options)
    ros = BenchPublisher(camera_names, options.compressed, options.input_qos)
    try:
        ros.tf_static.publish(messages.tf_static)
        deadline = time.monotonic() + timeout_s
        while not ros.matched():
            if time.monotonic() > deadline:
                return 2
            time.sleep(POLL_S)
        origin_ns = time.time_ns()
        start = time.monotonic()
        with (options.out_dir / PUBLISHED_FILE).open("w") as log:
            for index, (window, rate, offset) in enumerate(options.schedule()):
                delay = start + offset - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                lag_ms = (time.monotonic() - start - offset) * 1e3
                stamp_ns = time.time_ns()
                stamp = ns_to_stamp(stamp_ns)
                for message in (*messages.images, *messages.camera_infos, messages.cloud):
                    message.header.stamp = stamp
                images_ns = time.time_ns()
                for info, image, info_pub, image_pub in zip(messages.camera_infos, messages.images,
                                                            ros.infos, ros.images):
                    info_pub.publish(info)
                    image_pub.publish(image)
                if options.num_sweeps > 1:
                    ros.tf.publish(odometry_message(stamp_ns, origin_ns, options.ego_speed_mps,
                                                    messages.cloud.header.frame_id))
                cloud_ns = time.time_ns()
                ros.cloud.publish(messages.cloud)
                log.write(json.dumps({"index": index, "window": window, "rate": rate, "stamp_ns": stamp_ns,
                                      "images_ns": images_ns, "cloud_ns": cloud_ns,
                                      "published_ns": time.time_ns(), "lag_ms": round(lag_ms, 3)}) + "\n")
        return 0
    finally:
        ros.close()


# ------------------------------------------------------------------------------- recorder
@dataclass
class Answer:
    """One Detection3DArray as received, and the FrameInfo of the same stamp."""

    received_ns: int
    boxes: int
    timings: dict[str, float] = field(default_factory=dict)
    message: Any = None


class Recorder:
    """This process's rclpy side: the node's outputs with their receive times (own context and
    executor on a background thread)."""

    def __init__(self, domain_id: int) -> None:
        import rclpy
        from bevfusion_ros_msgs.msg import FrameInfo
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from vision_msgs.msg import Detection3DArray
        self.lock = threading.Lock()
        self.answers: dict[int, Answer] = {}
        self.frame_infos: dict[int, dict[str, float]] = {}
        self.velocities: dict[int, Any] = {}          # stamp -> FrameInfo.velocities
        self.cameras_used: dict[int, tuple[str, ...]] = {}     # stamp -> FrameInfo.cameras_used
        self.status: dict[str, str] = {}
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("bevfusion_bench_recorder", context=self.context)
        outputs = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(Detection3DArray, DETECTIONS_TOPIC, self._on_detections, outputs)
        self.node.create_subscription(FrameInfo, FRAME_INFO_TOPIC, self._on_frame_info, outputs)
        self.node.create_subscription(DiagnosticArray, DIAGNOSTICS_TOPIC, self._on_diagnostics, outputs)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, name="bench-recorder", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def _on_detections(self, msg: Any, info: Any) -> None:
        from bevfusion_ros.ros.convert import stamp_to_ns
        received_ns = info["received_timestamp"] or time.time_ns()
        with self.lock:
            self.answers[stamp_to_ns(msg.header.stamp)] = Answer(received_ns, len(msg.detections), message=msg)

    def _on_frame_info(self, msg: Any) -> None:
        from bevfusion_ros.ros.convert import stamp_to_ns
        with self.lock:
            stamp_ns = stamp_to_ns(msg.header.stamp)
            self.frame_infos[stamp_ns] = dict(zip(msg.timing_names, msg.timing_ms))
            self.velocities[stamp_ns] = msg.velocities
            self.cameras_used[stamp_ns] = tuple(msg.cameras_used)

    def _on_diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            if status.name == PIPELINE_STATUS:
                with self.lock:
                    self.status = {kv.key: kv.value for kv in status.values}

    def node_publishing(self) -> bool:
        return all(self.node.count_publishers(topic) > 0 for topic in (DETECTIONS_TOPIC, FRAME_INFO_TOPIC))

    def counters_settled(self, frames_sent: int) -> bool:
        """The node's last pipeline diagnostic counts ``frames_sent`` frames in, each one answered,
        dropped or failed (none still in flight)."""
        with self.lock:
            status = dict(self.status)
        try:
            frames_in, out, dropped, failed = (int(status[f"frames_{k}"]) for k in ("in", "out", "dropped", "failed"))
        except (KeyError, ValueError):
            return False
        return frames_in >= frames_sent and frames_in == out + dropped + failed

    def answered(self, stamps: Sequence[int]) -> int:
        with self.lock:
            return sum(stamp in self.answers for stamp in stamps)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5.0)
        self._thread.join(10.0)
        self.node.destroy_node()
        self.context.try_shutdown()


# ------------------------------------------------------------------------------- analysis
def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 / max / mean (ms) of ``values``; empty: {}."""
    if not len(values):
        return {}
    array = np.asarray(values, dtype=np.float64)
    result = {f"p{p}": round(float(np.percentile(array, p)), 3) for p in PERCENTILES}
    result.update(max=round(float(array.max()), 3), mean=round(float(array.mean()), 3))
    return result


@dataclass
class WindowReport:
    """One rate held for ``duration_s``: what was published and answered, and how fast."""

    rate_hz: float
    published: int = 0
    answered: int = 0
    dropped: int = 0
    publisher_late: int = 0              # frames published more than one period late
    latency_ms: dict[str, float] = field(default_factory=dict)              # cloud published -> answer
    latency_from_images_ms: dict[str, float] = field(default_factory=dict)  # first image published -> answer
    overhead_ms: dict[str, float] = field(default_factory=dict)             # latency - forward
    phases_ms: dict[str, dict[str, float]] = field(default_factory=dict)    # node phase -> percentiles
    node_cpu_percent: float | None = None                                   # 100 = one core busy
    boxes: int = 0


def analyze_window(rate: float, frames: list[dict], answers: dict[int, Answer],
                   frame_infos: dict[int, dict[str, float]], cpu_percent: float | None) -> WindowReport:
    """Figures of one window from the publisher's lines ``frames`` and the recorder's answers."""
    report = WindowReport(rate_hz=rate, published=len(frames), node_cpu_percent=cpu_percent)
    answered = [(frame, answers[frame["stamp_ns"]]) for frame in frames if frame["stamp_ns"] in answers]
    report.answered = len(answered)
    report.dropped = report.published - report.answered
    report.publisher_late = sum(frame["lag_ms"] > 1e3 / rate for frame in frames)
    latency = [(answer.received_ns - frame["cloud_ns"]) / 1e6 for frame, answer in answered]
    report.latency_ms = percentiles(latency)
    report.latency_from_images_ms = percentiles([(a.received_ns - f["images_ns"]) / 1e6 for f, a in answered])
    timings = [frame_infos.get(frame["stamp_ns"], {}) for frame, _ in answered]
    report.overhead_ms = percentiles([ms - timing["forward"] for ms, timing in zip(latency, timings)
                                      if "forward" in timing])
    names = dict.fromkeys(name for timing in timings for name in timing)
    report.phases_ms = {name: percentiles([t[name] for t in timings if name in t]) for name in names}
    report.boxes = answered[-1][1].boxes if answered else 0
    return report


@dataclass
class NodeBenchReport:
    model_dir: str
    backend: str
    precision: str
    compressed: bool
    num_sweeps: int
    duration_s: float
    windows: list[WindowReport] = field(default_factory=list)
    highest_rate_without_drops: float | None = None
    node_counters: dict[str, str] = field(default_factory=dict)     # the last pipeline diagnostic
    node_rss_mib: dict[str, float] = field(default_factory=dict)
    node_backend: str = ""
    box_check: dict[str, Any] = field(default_factory=dict)
    node_exit_code: int | None = None
    traceback_in_log: bool = False
    log_path: str = ""
    wall_s: float = 0.0


def read_published(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class _NodeSampler:
    """CPU seconds and RSS of the node process, sampled every ``period_s`` on a daemon thread."""

    def __init__(self, pid: int, period_s: float = 0.5) -> None:
        from bevfusion_ros.ros.soak import read_rss_kib
        self.pid, self.samples = pid, []          # (wall ns, cpu s, rss KiB)
        self._read_rss, self._stop = read_rss_kib, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)
        self._thread.start()

    def _run(self, period_s: float) -> None:
        while not self._stop.is_set():
            cpu, rss = cpu_seconds(self.pid), self._read_rss(self.pid)
            if cpu is not None and rss is not None:
                self.samples.append((time.time_ns(), cpu, rss))
            self._stop.wait(period_s)

    def stop(self) -> list[tuple[int, float, int]]:
        self._stop.set()
        self._thread.join()
        return list(self.samples)


def cpu_percent(samples: list[tuple[int, float, int]], start_ns: int, end_ns: int) -> float | None:
    """The node's CPU use between two wall times (100 = one core), from the samples in between."""
    inside = [(t, cpu) for t, cpu, _ in samples if start_ns <= t <= end_ns]
    if len(inside) < 2 or inside[-1][0] == inside[0][0]:
        return None
    return round(100.0 * (inside[-1][1] - inside[0][1]) / ((inside[-1][0] - inside[0][0]) / NS_PER_S), 1)


def check_boxes(options: NodeBenchOptions, answer: Answer, velocities: Any,
                cameras_used: Sequence[str] | None = None) -> dict[str, Any]:
    """The node's boxes of one frame against the library path's on the same frame with the same
    cameras (a camera whose image came too late for the node's sync is left out of both), same
    backend and precision (:func:`bevfusion_ros.tools.parity.match_boxes`)."""
    from bevfusion_ros.io import load_example_data
    from bevfusion_ros.io.calibration import Calibration
    from bevfusion_ros.pipeline import BEVFusionPipeline
    from bevfusion_ros.ros.convert import msg_to_detections
    from bevfusion_ros.tools.parity import match_boxes
    pipeline = BEVFusionPipeline.from_model_dir(options.model_dir, pipeline_config(options), options.backend,
                                                options.precision)
    frame = load_example_data(options.data_dir)
    calibration = frame.calibration       # as the node builds it: K + camera2lidar, the model's image aug
    frame = dataclasses.replace(frame, calibration=Calibration.from_camera2lidar(
        calibration.camera_intrinsics[:, :3, :3], calibration.camera2lidar, pipeline.config.image,
        calibration.camera_names))
    if options.num_sweeps > 1:
        frame = dataclasses.replace(frame, points=np.concatenate(
            [frame.points[:, :4], np.zeros((len(frame.points), 1), np.float32)], axis=1))
    library = pipeline.forward(frame, cameras_used).boxes
    node = msg_to_detections(answer.message, pipeline.config.head.class_names, velocities).boxes
    match = match_boxes(node, library) if len(node) and len(library) else None
    used = pipeline.config.camera_names if cameras_used is None else cameras_used
    return {"library_boxes": int(len(library)), "node_boxes": int(len(node)), "cameras_used": len(used),
            "paired_within_1mm": None if match is None else round(match.fraction_within(1e-3), 4),
            "max_difference": None if match is None else float(match.max_difference(node, library, 1e-3))}


def run_node_bench(options: NodeBenchOptions, log: Any = print) -> NodeBenchReport:
    """Run the benchmark (docs/benchmarks.md); the report is also written to ``out_dir/node_bench.json``."""
    from bevfusion_ros.ros.soak import REPO_ROOT, NodeProcess, default_domain_id, wait_for
    options.validate()
    started = time.monotonic()
    out = options.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / PUBLISHED_FILE).unlink(missing_ok=True)
    report = NodeBenchReport(model_dir=str(options.model_dir), backend=options.backend, precision=options.precision,
                             compressed=options.compressed, num_sweeps=options.num_sweeps,
                             duration_s=options.duration_s, log_path=str(out / "node.log"))
    params = node_parameters(options, out / "node_params.yaml")
    domain_id = options.domain_id if options.domain_id is not None else default_domain_id()
    with safe_ros_process(domain_id) as env:
        node = NodeProcess(params, out / "node.log", env, options.node_source or REPO_ROOT)
        sampler = _NodeSampler(node.pid)
        recorder = publisher = None
        try:
            recorder = Recorder(domain_id)
            if not wait_for(recorder.node_publishing, options.startup_timeout_s, lambda: not node.alive()):
                raise RuntimeError(f"the node did not start within {options.startup_timeout_s} s; log tail:\n"
                                   f"{node.log_tail()}")
            log(f"node pid {node.pid} up on domain {domain_id} after {time.monotonic() - started:.1f} s; "
                f"publishing {len(options.schedule())} frames (rates {list(options.rates_hz)} Hz)")
            publisher = subprocess.Popen([sys.executable, "-m", "bevfusion_ros.ros.node_bench", "publish",
                                          json.dumps(_options_json(options)), str(options.startup_timeout_s)],
                                         env=node_env(env))
            publisher.wait()
            if publisher.returncode:
                raise RuntimeError(f"the publisher failed (exit status {publisher.returncode}); node log tail:\n"
                                   f"{node.log_tail()}")
            frames = read_published(out / PUBLISHED_FILE)
            stamps = [frame["stamp_ns"] for frame in frames]
            wait_for(lambda: recorder.answered(stamps) == len(stamps), ANSWER_GRACE_S, lambda: not node.alive())
            wait_for(lambda: recorder.counters_settled(len(frames)), COUNTERS_GRACE_S, lambda: not node.alive())
            samples = sampler.stop()
            with recorder.lock:
                answers, infos = dict(recorder.answers), dict(recorder.frame_infos)
                report.node_counters = dict(recorder.status)
                velocities, cameras_used = dict(recorder.velocities), dict(recorder.cameras_used)
            report.windows = [_window(options, i, rate, frames, answers, infos, samples)
                              for i, rate in enumerate(options.rates_hz)]
            held = [w.rate_hz for w in report.windows if w.published and w.dropped == 0]
            report.highest_rate_without_drops = max(held, default=None)
            report.node_rss_mib = _rss(samples)
            report.node_backend = report.node_counters.get("backend", "")
        finally:
            sampler.stop()
            report.node_exit_code = node.stop(20.0)
            if recorder is not None:
                recorder.close()
            if publisher is not None and publisher.poll() is None:
                publisher.kill()
    report.traceback_in_log = "Traceback" in node.log_text()
    if options.check_boxes and answers:
        last = max(answers)
        report.box_check = check_boxes(options, answers[last], velocities.get(last), cameras_used.get(last))
    report.wall_s = round(time.monotonic() - started, 1)
    (out / REPORT_FILE).write_text(json.dumps(dataclasses.asdict(report), indent=1))
    return report


def node_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this checkout first on PYTHONPATH (the child processes import it)."""
    from bevfusion_ros.ros.soak import REPO_ROOT
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)}


def _window(options: NodeBenchOptions, index: int, rate: float, frames: list[dict], answers: dict[int, Answer],
            infos: dict[int, dict[str, float]], samples: list) -> WindowReport:
    inside = [frame for frame in frames if frame["window"] == index]
    cpu = cpu_percent(samples, inside[0]["images_ns"], inside[-1]["published_ns"]) if inside else None
    return analyze_window(rate, inside, answers, infos, cpu)


def _rss(samples: list[tuple[int, float, int]]) -> dict[str, float]:
    if not samples:
        return {}
    rss = [kib / 1024 for _, _, kib in samples]
    return {"start": round(rss[0], 1), "end": round(rss[-1], 1), "max": round(max(rss), 1)}


def _options_json(options: NodeBenchOptions) -> dict:
    return {key: (str(value) if isinstance(value, Path) else value)
            for key, value in dataclasses.asdict(options).items() if key != "node_source"}


def options_from_json(text: str) -> NodeBenchOptions:
    values = json.loads(text)
    for key in ("model_dir", "data_dir", "out_dir"):
        values[key] = Path(values[key])
    values["rates_hz"] = tuple(values["rates_hz"])
    return NodeBenchOptions(**values)


# ------------------------------------------------------------------------------- output
PHASE_ORDER = ("transport", "sync", "queue", "points", "images", "calibration", "forward", "outputs")


def format_report(report: NodeBenchReport) -> str:
    """A readable table: one block per rate (latency, drops, CPU, the node's phases)."""
    lines = [f"node benchmark: {report.model_dir}, backend {report.node_backend or report.backend} "
             f"{report.precision}, {'CompressedImage' if report.compressed else 'Image'} input, "
             f"{'cloud time_lag' if report.num_sweeps == 1 else f'{report.num_sweeps} sweeps from /tf'}, "
             f"{report.duration_s:g} s per rate"]
    for w in report.windows:
        lat, over = w.latency_ms, w.overhead_ms
        lines.append(f"{w.rate_hz:g} Hz: {w.answered}/{w.published} answered, {w.dropped} dropped, "
                     f"publisher late {w.publisher_late}; node CPU {w.node_cpu_percent} %; {w.boxes} boxes")
        if lat:
            lines.append(f"  publish -> detections ms: p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  "
                         f"p99 {lat['p99']:.1f}  max {lat['max']:.1f}   (from the first image: p50 "
                         f"{w.latency_from_images_ms['p50']:.1f})")
        if over:
            lines.append(f"  node overhead (latency - forward) ms: p50 {over['p50']:.1f}  p99 {over['p99']:.1f}")
        for name in [*PHASE_ORDER, *sorted(set(w.phases_ms) - set(PHASE_ORDER))]:
            stats = w.phases_ms.get(name)
            if stats:
                lines.append(f"    {name:<28}p50 {stats['p50']:8.2f}  p90 {stats['p90']:8.2f}  p99 {stats['p99']:8.2f}")
    lines.append(f"highest rate with zero drops: {report.highest_rate_without_drops} Hz; node RSS MiB "
                 f"{report.node_rss_mib}; exit code {report.node_exit_code}, "
                 f"Traceback in log {report.traceback_in_log}")
    counters = {k: v for k, v in report.node_counters.items() if k.startswith(("frames_", "dropped."))}
    lines.append(f"node counters: {counters}")
    if report.box_check:
        lines.append(f"boxes, node vs library path: {report.box_check}")
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:2] == ["publish"]:
    from bevfusion_ros.runtime.memory import keep_large_buffers
    keep_large_buffers()                 # a driver's buffers are reused, as the node's are
    sys.exit(publish(options_from_json(sys.argv[2]), float(sys.argv[3])))
