"""Soak benchmark of ``bevfusion_node``: a long run at sensor rate with malformed frames mixed
in, checking that the node survives, accounts for every frame and does not leak memory.

    report = run_soak(SoakOptions(model_dir=Path("models/tiny-synthetic"), out_dir=Path("out/soak"),
                                  duration_s=600, rate_hz=10, fault_every=10))
    report.failed_checks          # [] when the node met every acceptance criterion

(``benchmarks/soak.py`` is the command line.) What happens, step by step, and how answers are
matched to frames: docs/benchmarks.md, "Soak test".
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from bevfusion_ros.ros.environment import safe_ros_process

NS_PER_S = 1_000_000_000
REPO_ROOT = Path(__file__).resolve().parents[2]
TOPIC_PREFIX = "/soak"
LIDAR_TOPIC = f"{TOPIC_PREFIX}/points"
DETECTIONS_TOPIC = "/bevfusion/detections"
FRAME_INFO_TOPIC = "/bevfusion/frame_info"
DIAGNOSTICS_TOPIC = "/diagnostics"
NODE_NAME = "bevfusion"                          # bevfusion_node's name (its topics are /bevfusion/...)
PIPELINE_STATUS = f"{NODE_NAME}: pipeline"       # the node's DiagnosticStatus
DRIVER_NAME = "bevfusion_soak"
WORLD_FRAME = "odom"
SCENE_SEEDS = (11, 12, 13)
SENSOR_QUEUE_DEPTH = 5                           # keep-last depth of the input publishers
WARMUP_MAX_S = 60.0                              # RSS warm-up: at most this long ...
WARMUP_FRACTION = 0.1                            # ... or this fraction of the duration
POLL_S = 0.05                                    # period of the condition polls
PRIME_ANSWER_S = 3.0                             # wait for the answer to one priming frame
LOG_TAIL_CHARS = 4000
#: How the node logs a frame it gave up on (best effort: only used to name good frames lost).
FRAME_ERROR_LOG = re.compile(r"frame at (\d+) ns (?:skipped|failed)")


class SoakError(RuntimeError):
    """The soak could not run (the node did not start, its subscriptions never matched)."""


@dataclass(frozen=True)
class SoakOptions:
    """What to run. Durations in seconds, rates in Hz, speeds in m/s."""

    model_dir: Path
    out_dir: Path
    duration_s: float = 600.0
    rate_hz: float = 10.0
    fault_every: int = 10                # every n-th frame is faulty (frame n-1, 2n-1, ...); 0: none
    num_sweeps: int = 3
    ego_speed_mps: float = 5.0
    scene_seeds: tuple[int, ...] = SCENE_SEEDS
    domain_id: int | None = None         # default: derived from the process id
    startup_timeout_s: float = 120.0     # node start until its subscriptions match
    settle_timeout_s: float = 120.0      # after the last frame, until the diagnostics settle
    shutdown_timeout_s: float = 20.0     # SIGINT until the node must have exited (then SIGKILL)
    rss_period_s: float = 1.0
    rss_growth_limit_pct: float = 5.0
    diagnostics_period_s: float = 0.5

    @property
    def frame_count(self) -> int:
        return int(round(self.duration_s * self.rate_hz))

    @property
    def warmup_s(self) -> float:
        """RSS warm-up after the first frame: the first 60 s or 10 % of the duration."""
        return min(WARMUP_MAX_S, WARMUP_FRACTION * self.duration_s)

    def validate(self) -> "SoakOptions":
        if self.duration_s <= 0 or self.rate_hz <= 0:
            raise ValueError("duration and rate must be positive")
        if self.fault_every < 0 or self.num_sweeps < 1 or not self.scene_seeds:
            raise ValueError("fault_every >= 0, num_sweeps >= 1 and at least one scene are required")
        return self


@dataclass
class SentFrame:
    """One published frame: its cloud's stamp (ns), the fault (None: good) and its outcome."""

    index: int
    stamp_ns: int
    fault: str | None = None
    outcome: str | None = None
    lag_ms: float = 0.0                  # how late it was published against the schedule
    answered: bool = False               # filled in by evaluate()


@dataclass
class FaultTally:
    outcome: str
    sent: int = 0
    answered: int = 0


@dataclass
class RssSummary:
    """Resident memory of the node process, MiB."""

    samples: int = 0
    warmup_mib: float = 0.0              # first sample after the warm-up
    end_mib: float = 0.0                 # last sample before the node is stopped
    max_mib: float = 0.0
    growth_pct: float = 0.0              # warm-up -> end
    series: list[tuple[float, float]] = field(default_factory=list)  # (s since the first frame, MiB)


@dataclass
class SoakReport:
    """Figures of one soak and the acceptance checks that failed (empty: all passed)."""

    model_dir: str
    duration_s: float
    rate_hz: float
    fault_every: int
    num_sweeps: int
    priming_frames: int = 0              # good frames before the soak (until the node answered)
    baseline: dict[str, int] = field(default_factory=dict)  # node counters after the priming
    frames_published: int = 0            # clouds published by the soak (good + faulty)
    good_frames: int = 0
    fault_frames: int = 0
    publish_s: float = 0.0               # first to last frame, wall time
    max_lag_ms: float = 0.0              # worst lateness of a frame against the schedule
    late_frames: int = 0                 # frames published more than one period late
    node_alive: bool = False
    node_exit_code: int | None = None
    traceback_in_log: bool = False
    settled: bool = False
    settle_s: float = 0.0
    diagnostics: dict[str, str] = field(default_factory=dict)   # the last pipeline status
    diagnostics_received: int = 0
    # the node's counters during the soak (the last status minus the baseline)
    frames_in: int | None = None
    frames_out: int | None = None
    frames_dropped: int | None = None
    frames_failed: int | None = None     # None: the node does not report it
    frames_in_progress: int | None = None
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    detection_messages: int = 0
    detection_stamps: int = 0            # distinct
    unexpected_detection_stamps: int = 0  # stamps never published
    frame_infos: int = 0
    good_answered: int = 0
    good_unanswered: int = 0
    good_after_fault_answered: int = 0
    good_after_fault_unanswered: int = 0
    degraded_unanswered: int = 0
    good_failed_in_log: list[int] = field(default_factory=list)  # good stamps the node logs as failed
    queue_drops: int | None = None       # dropped.queue_full, else frames_dropped
    faults: dict[str, FaultTally] = field(default_factory=dict)
    rss: RssSummary = field(default_factory=RssSummary)
    failed_checks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    foreign_nodes: list[str] = field(default_factory=list)  # other nodes seen in the domain at the end
    log_path: str = ""
    wall_s: float = 0.0
    frames: list[SentFrame] = field(default_factory=list)


# ------------------------------------------------------------------------------- environment
def default_domain_id() -> int:
    """A domain id in 1..101 derived from this process's id."""
    return 1 + os.getpid() % 101


# ------------------------------------------------------------------------------- node process
def node_parameters(options: SoakOptions, path: Path) -> Path:
    """Write the node's parameter file (the model's pipeline config + the soak's node section)."""
    from bevfusion_ros.config import load_config, save_config
    config = load_config(options.model_dir / "bevfusion.yaml")
    slop_s = min(0.05, 0.4 / options.rate_hz)            # less than half a period: no neighbour
    node = {"model_dir": str(options.model_dir.resolve()), "backend": "cpu", "input_qos": "reliable",
            "lidar_topic": LIDAR_TOPIC, "camera_topics": list(camera_topics(config.camera_names)),
            "time_lag_field": "", "num_sweeps": options.num_sweeps, "world_frame": WORLD_FRAME,
            "diagnostics_period_s": options.diagnostics_period_s,
            "sync": {"slop_s": slop_s, "missing_camera": "wait", "wait_timeout_s": 0.2}}
    save_config(config, path, node=node)
    return path


def camera_topics(camera_names: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{TOPIC_PREFIX}/{name}/image" for name in camera_names)


def camera_info_topics(camera_names: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{TOPIC_PREFIX}/{name}/camera_info" for name in camera_names)


def read_rss_kib(pid: int) -> int | None:
    """VmRSS of process ``pid`` in KiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """Samples the RSS of ``pid`` every ``period_s`` seconds on a daemon thread:
    ``samples`` holds (monotonic time s, RSS KiB)."""

    def __init__(self, pid: int, period_s: float) -> None:
        self.pid, self.period_s = pid, period_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = read_rss_kib(self.pid)
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self._stop.wait(self.period_s)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return list(self.samples)


class NodeProcess:
    """``bevfusion_node`` as a child process with ``params``, stdout and stderr in ``log_path``,
    running the ``bevfusion_ros`` of ``source_root`` (default: this checkout)."""

    def __init__(self, params: Path, log_path: Path, env: dict[str, str], source_root: Path = REPO_ROOT) -> None:
        env = dict(env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source_root), env.get("PYTHONPATH", "")) if p)
        self.log_path = log_path
        self._log = log_path.open("wb")
        # A baseline checkout from before the console scripts moved to tools/ has the node's main in ros/.
        module = "tools" if (source_root / "bevfusion_ros" / "tools" / "node.py").is_file() else "ros"
        self.process = subprocess.Popen(
            # -P: the working directory does not go first on sys.path (its bevfusion_ros would win over source_root's)
            [sys.executable, "-P", "-m", f"bevfusion_ros.{module}.node", "--ros-args", "--params-file", str(params)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float) -> int:
        """SIGINT, wait at most ``timeout_s``, then SIGKILL; returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def log_tail(self) -> str:
        return self.log_text()[-LOG_TAIL_CHARS:]


# ------------------------------------------------------------------------------- messages
def scene_messages(seeds: Sequence[int], stamp_ns: int) -> list[Any]:
    """The :class:`~bevfusion_ros.ros.frame_messages.FrameMessages` of generated scenes (built
    once: about a second per scene), the cloud with x, y, z, intensity only (a raw sweep)."""
    from bevfusion_ros.ros.frame_messages import cloud_message, frame_messages
    from bevfusion_ros.sim.scene import generate_scene
    scenes = []
    for seed in seeds:
        frame = generate_scene(seed).to_frame()
        messages = frame_messages(frame, stamp_ns)
        cloud = cloud_message(frame.points[:, :4], stamp_ns, messages.cloud.header.frame_id,
                              ("x", "y", "z", "intensity"))
        scenes.append(dataclasses.replace(messages, cloud=cloud))
    return scenes


def stamp_messages(messages: Any, stamp_ns: int) -> None:
    """Set every header stamp of the images, CameraInfos and cloud in place (``data`` is not
    touched: the messages are built once and re-published)."""
    from bevfusion_ros.ros.convert import ns_to_stamp
    stamp = ns_to_stamp(stamp_ns)
    for message in (*messages.images, *messages.camera_infos, messages.cloud):
        message.header.stamp = stamp


def odometry_message(stamp_ns: int, base_ns: int, speed_mps: float, lidar_frame: str) -> Any:
    """``odom -> lidar_frame`` at ``stamp_ns``: the ego ``speed_mps * (stamp - base)`` metres
    along +x of odom, no rotation."""
    from geometry_msgs.msg import Transform, TransformStamped, Vector3
    from tf2_msgs.msg import TFMessage

    from bevfusion_ros.ros.frame_messages import header
    x = speed_mps * (stamp_ns - base_ns) / NS_PER_S
    transform = TransformStamped(header=header(stamp_ns, WORLD_FRAME), child_frame_id=lidar_frame,
                                 transform=Transform(translation=Vector3(x=float(x))))
    return TFMessage(transforms=[transform])


def is_fault_frame(index: int, fault_every: int) -> bool:
    """Frame ``index`` (0-based) is faulty: the ``fault_every``-th, 2x-th, ... frame."""
    return fault_every > 0 and (index + 1) % fault_every == 0


# ------------------------------------------------------------------------------- ROS side
class _Receiver:
    """The node's outputs as this process receives them (callbacks on the spin thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.detections: collections.Counter[int] = collections.Counter()   # stamp -> messages
        self.frame_infos: collections.Counter[int] = collections.Counter()
        self.last_detection_s = 0.0                   # monotonic receive time
        self.statuses: collections.deque = collections.deque(maxlen=1)
        self.diagnostics_received = 0

    def on_detections(self, msg: Any) -> None:
        from bevfusion_ros.ros.convert import stamp_to_ns
        with self.lock:
            self.detections[stamp_to_ns(msg.header.stamp)] += 1
            self.last_detection_s = time.monotonic()

    def on_frame_info(self, msg: Any) -> None:
        from bevfusion_ros.ros.convert import stamp_to_ns
        with self.lock:
            self.frame_infos[stamp_to_ns(msg.header.stamp)] += 1

    def on_diagnostics(self, msg: Any) -> None:
        received = time.monotonic()
        for status in msg.status:
            if status.name == PIPELINE_STATUS:
                with self.lock:
                    self.statuses.append((received, {kv.key: kv.value for kv in status.values}))
                    self.diagnostics_received += 1

    def latest_values(self) -> dict[str, str]:
        with self.lock:
            return dict(self.statuses[-1][1]) if self.statuses else {}

    def settled(self, frames_in: int | None) -> bool:
        """The latest pipeline status, received after the last detections, has ``frames_in``
        (None: any) and ``frames_in_progress == 0``: it accounts for every frame."""
        with self.lock:
            if not self.statuses:
                return False
            received, values = self.statuses[-1]
            last_detection_s = self.last_detection_s
        return (frames_in in (None, _int(values, "frames_in")) and _int(values, "frames_in_progress") == 0
                and received > last_detection_s)


class SoakDriver:
    """This process's rclpy side: one context on the soak's domain, the input publishers and the
    output subscriptions, spun on a background thread."""

    def __init__(self, domain_id: int, camera_names: Sequence[str]) -> None:
        import rclpy
        from bevfusion_ros_msgs.msg import FrameInfo
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2
        from tf2_msgs.msg import TFMessage
        from vision_msgs.msg import Detection3DArray
        sensors = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=SENSOR_QUEUE_DEPTH,
                             reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        outputs = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(DRIVER_NAME, context=self.context)
        create = self.node.create_publisher
        self.image_pubs = [create(Image, topic, sensors) for topic in camera_topics(camera_names)]
        self.info_pubs = [create(CameraInfo, topic, sensors) for topic in camera_info_topics(camera_names)]
        self.cloud_pub = create(PointCloud2, LIDAR_TOPIC, sensors)
        self.tf_pub = create(TFMessage, "/tf", QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self.tf_static_pub = create(TFMessage, "/tf_static", latched)
        self.received = _Receiver()
        subscribe = self.node.create_subscription
        subscribe(Detection3DArray, DETECTIONS_TOPIC, self.received.on_detections, outputs)
        subscribe(FrameInfo, FRAME_INFO_TOPIC, self.received.on_frame_info, outputs)
        subscribe(DiagnosticArray, DIAGNOSTICS_TOPIC, self.received.on_diagnostics, outputs)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._spinner = threading.Thread(target=self._spin, name="soak-spin", daemon=True)
        self._spinner.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException
        with contextlib.suppress(ExternalShutdownException):
            self.executor.spin()

    def node_connected(self) -> bool:
        """The node subscribes to every input and publishes the outputs this process reads."""
        publishers = [*self.image_pubs, *self.info_pubs, self.cloud_pub, self.tf_pub, self.tf_static_pub]
        return (all(p.get_subscription_count() > 0 for p in publishers)
                and all(self.node.count_publishers(t) > 0 for t in (DETECTIONS_TOPIC, DIAGNOSTICS_TOPIC)))

    def foreign_nodes(self) -> list[str]:
        """Nodes in the soak's ROS domain other than the node under test and this driver (another
        node there would mix its /diagnostics and detections into the soak's)."""
        names = self.node.get_node_names_and_namespaces()
        return sorted(f"{namespace.rstrip('/')}/{name}" for name, namespace in names
                      if (name, namespace) not in ((NODE_NAME, "/"), (DRIVER_NAME, "/")))

    def publish_frame(self, messages: Any, odometry: Any | None) -> None:
        """CameraInfos, images (None: not published), the odometry, then the cloud."""
        for info, pub in zip(messages.camera_infos, self.info_pubs):
            pub.publish(info)
        for image, pub in zip(messages.images, self.image_pubs):
            if image is not None:
                pub.publish(image)
        if odometry is not None:
            self.tf_pub.publish(odometry)
        self.cloud_pub.publish(messages.cloud)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5.0)
        self._spinner.join(10.0)
        self.node.destroy_node()
        self.context.try_shutdown()


def wait_for(condition: Callable[[], bool], timeout_s: float, abort: Callable[[], bool] = lambda: False) -> bool:
    """Poll ``condition`` every ``POLL_S`` s until it holds (True), ``timeout_s`` s pass or
    ``abort`` holds (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if abort() or time.monotonic() > deadline:
            return condition()
        time.sleep(POLL_S)
    return True


# ------------------------------------------------------------------------------- publishing
@dataclass
class _StampPlan:
    """Good stamps ``base + n * period`` (ns); stamp faults do not advance them. The odometry
    is measured from ``origin_ns`` (the ego at x = 0)."""

    origin_ns: int
    period_ns: int
    base_ns: int = 0
    good: int = 0                        # good stamps used since the base
    previous_ns: int = 0                 # stamp of the last cloud published

    def __post_init__(self) -> None:
        self.base_ns = self.origin_ns
        self.previous_ns = self.origin_ns - self.period_ns

    def next_good_ns(self) -> int:
        return self.base_ns + self.good * self.period_ns

    def rebase(self, now_ns: int) -> None:
        """Continue the good stamps from ``now_ns`` (never backwards)."""
        self.base_ns, self.good = max(now_ns, self.next_good_ns()), 0


def publish_one(driver: SoakDriver, messages: Any, fault: Any | None, plan: _StampPlan, max_points: int,
                speed_mps: float) -> int:
    """Publish one frame (``fault`` None: good) and advance ``plan``; returns the cloud's stamp.
    The odometry goes out only with a good stamp (the odometry source itself is healthy)."""
    messages, stamp_ns = _frame(messages, fault, plan, max_points)
    advances = stamp_ns == plan.next_good_ns()
    odometry = (odometry_message(stamp_ns, plan.origin_ns, speed_mps, messages.cloud.header.frame_id)
                if advances else None)
    driver.publish_frame(messages, odometry)
    plan.good += advances
    plan.previous_ns = stamp_ns
    return stamp_ns


def prime(driver: SoakDriver, scene: Any, plan: _StampPlan, options: SoakOptions,
          alive: Callable[[], bool]) -> tuple[list[int], dict[str, str]]:
    """Publish good frames, one every ``PRIME_ANSWER_S`` at most, until the node answers one
    (discovery complete both ways, the pipeline warm), then wait for its diagnostics to settle.
    Returns the priming stamps and the node's counters then (the soak's baseline): frames sent
    before the node's readers matched this process's writers are lost, not the node's fault."""
    driver.tf_static_pub.publish(scene.tf_static)
    deadline = time.monotonic() + options.startup_timeout_s
    stamps: list[int] = []
    while True:
        if not alive() or time.monotonic() > deadline:
            raise SoakError(f"the node answered none of {len(stamps)} priming frames "
                            f"within {options.startup_timeout_s} s (alive: {alive()})")
        stamp_ns = publish_one(driver, scene, None, plan, 0, options.ego_speed_mps)
        stamps.append(stamp_ns)
        if wait_for(lambda: stamp_ns in driver.received.detections, PRIME_ANSWER_S, lambda: not alive()):
            break
    if not wait_for(lambda: driver.received.settled(None), options.settle_timeout_s, lambda: not alive()):
        raise SoakError("the node's diagnostics did not settle after the priming frames")
    return stamps, driver.received.latest_values()


def publish_frames(driver: SoakDriver, scenes: list[Any], plan: _StampPlan, options: SoakOptions,
                   max_points: int, keep_going: Callable[[], bool], log: Callable[[str], None]) -> list[SentFrame]:
    """Publish ``options.frame_count`` frames, frame ``k`` at ``start + k / rate`` (monotonic),
    good stamps from the wall clock now on. Stops early when ``keep_going()`` turns False."""
    from bevfusion_ros.ros.faults import FAULTS
    plan.rebase(time.time_ns())
    frames: list[SentFrame] = []
    faults_sent = 0
    start = time.monotonic()
    for index in range(options.frame_count):
        due = start + index / options.rate_hz
        time.sleep(max(0.0, due - time.monotonic()))
        lag_ms = (time.monotonic() - due) * 1e3
        if not keep_going():
            log(f"node exited at frame {index}: publishing stopped")
            break
        fault = FAULTS[faults_sent % len(FAULTS)] if is_fault_frame(index, options.fault_every) else None
        faults_sent += fault is not None
        stamp_ns = publish_one(driver, scenes[index % len(scenes)], fault, plan, max_points, options.ego_speed_mps)
        frames.append(SentFrame(index, stamp_ns, fault.name if fault else None,
                                fault.outcome if fault else None, round(lag_ms, 3)))
        if (index + 1) % max(1, int(10 * options.rate_hz)) == 0:
            log(f"  {index + 1}/{options.frame_count} frames, {faults_sent} faulty, "
                f"{len(driver.received.detections)} stamps answered so far")
    return frames


def _frame(messages: Any, fault: Any | None, plan: _StampPlan, max_points: int) -> tuple[Any, int]:
    """The messages of one frame and its cloud's stamp: the scene re-stamped with the next good
    stamp, then the fault's corruption (it may read the stamp) and the fault's cloud stamp."""
    good_ns = plan.next_good_ns()
    stamp_messages(messages, good_ns)
    if fault is None:
        return messages, good_ns
    stamp_ns = fault.stamp(good_ns, plan.previous_ns)
    messages = fault.corrupt(messages, max_points)
    if stamp_ns != good_ns:
        from bevfusion_ros.ros.convert import ns_to_stamp
        messages.cloud.header.stamp = ns_to_stamp(stamp_ns)
    return messages, stamp_ns


# ------------------------------------------------------------------------------- evaluation
def _int(values: dict[str, str], key: str) -> int | None:
    try:
        return int(float(values[key]))
    except (KeyError, ValueError):
        return None


def mark_answered(frames: list[SentFrame], answers: dict[int, int]) -> None:
    """Set ``answered`` of each frame: a stamp's answers go to its frames in publication order."""
    remaining = dict(answers)
    for frame in frames:
        frame.answered = remaining.get(frame.stamp_ns, 0) > 0
        if frame.answered:
            remaining[frame.stamp_ns] -= 1


def summarize_rss(samples: list[tuple[float, int]], start_s: float, warmup_s: float) -> RssSummary:
    """RSS figures (MiB) from (monotonic s, KiB) samples; the warm-up value is the first sample
    at least ``warmup_s`` after ``start_s`` (monotonic: the first frame), else the last one."""
    warmup_end_s = start_s + warmup_s
    if not samples:
        return RssSummary()
    after = [kib for t, kib in samples if t >= warmup_end_s]
    warmup = after[0] if after else samples[-1][1]
    end = samples[-1][1]
    return RssSummary(samples=len(samples), warmup_mib=round(warmup / 1024, 1), end_mib=round(end / 1024, 1),
                      max_mib=round(max(kib for _, kib in samples) / 1024, 1),
                      growth_pct=round(100.0 * (end - warmup) / warmup, 2) if warmup else 0.0,
                      series=[(round(t - start_s, 1), round(kib / 1024, 1)) for t, kib in samples])


def counters(values: dict[str, str]) -> dict[str, int]:
    """The integer counters of a pipeline status: frames_* and dropped.* (absent keys absent)."""
    return {key: number for key in values
            if key.startswith(("frames_", "dropped.")) and (number := _int(values, key)) is not None}


def read_counters(report: SoakReport, values: dict[str, str], baseline: dict[str, int]) -> None:
    """The node's counters during the soak: its last pipeline status minus ``baseline``
    (``frames_in_progress`` is a state, not subtracted); absent keys stay None."""
    report.diagnostics, report.baseline = dict(values), dict(baseline)
    delta = {key: value - (0 if key == "frames_in_progress" else baseline.get(key, 0))
             for key, value in counters(values).items()}
    report.frames_in, report.frames_out = delta.get("frames_in"), delta.get("frames_out")
    report.frames_dropped, report.frames_failed = delta.get("frames_dropped"), delta.get("frames_failed")
    report.frames_in_progress = delta.get("frames_in_progress")
    report.dropped_by_reason = {key[len("dropped."):]: value for key, value in delta.items()
                                if key.startswith("dropped.")}
    queue_full = report.dropped_by_reason.get("queue_full")
    report.queue_drops = queue_full if queue_full is not None else report.frames_dropped


def tally_answers(report: SoakReport, frames: list[SentFrame], answers: dict[int, int],
                  priming: Sequence[int] = ()) -> None:
    """Answered / unanswered counts of good frames, good frames right after a fault, and per
    fault; answers to the ``priming`` stamps are left out."""
    answers = {stamp: count for stamp, count in answers.items() if stamp not in set(priming)}
    mark_answered(frames, answers)
    published = {frame.stamp_ns for frame in frames}
    report.detection_messages = sum(answers.values())
    report.detection_stamps = len(answers)
    report.unexpected_detection_stamps = sum(1 for stamp in answers if stamp not in published)
    good = [frame for frame in frames if frame.fault is None]
    report.good_answered = sum(frame.answered for frame in good)
    report.good_unanswered = len(good) - report.good_answered
    after_fault = [frame for previous, frame in zip(frames, frames[1:])
                   if previous.fault is not None and frame.fault is None]
    report.good_after_fault_answered = sum(frame.answered for frame in after_fault)
    report.good_after_fault_unanswered = len(after_fault) - report.good_after_fault_answered
    for frame in frames:
        if frame.fault is not None:
            tally = report.faults.setdefault(frame.fault, FaultTally(str(frame.outcome)))
            tally.sent += 1
            tally.answered += frame.answered
    report.degraded_unanswered = sum(t.sent - t.answered for t in report.faults.values() if t.outcome == "degraded")


def good_frames_failed(frames: list[SentFrame], log_text: str) -> list[int]:
    """Stamps of good frames (no faulty frame shares their stamp) that the node's log says it
    skipped or failed: a good frame must only ever be answered or dropped for load."""
    faulty = {frame.stamp_ns for frame in frames if frame.fault is not None}
    good = {frame.stamp_ns for frame in frames if frame.fault is None} - faulty
    logged = {int(match) for match in FRAME_ERROR_LOG.findall(log_text)}
    return sorted(good & logged)


def failed_checks(report: SoakReport, growth_limit_pct: float) -> list[str]:
    """The acceptance criteria that ``report`` does not meet, each as a readable line."""
    failed = []
    if report.foreign_nodes:
        failed.append(f"other ROS nodes joined the soak's domain: {report.foreign_nodes} (figures unreliable)")
    if not report.node_alive:
        failed.append(f"node crashed (exit code {report.node_exit_code})")
    if report.traceback_in_log:
        failed.append("node log has a Traceback")
    if not report.settled:
        failed.append(f"diagnostics did not settle (frames_in {report.frames_in} of "
                      f"{report.frames_published} clouds, in progress {report.frames_in_progress})")
    if report.frames_in != report.frames_published:
        failed.append(f"frames_in {report.frames_in} != {report.frames_published} clouds published")
    accounted = (report.frames_out or 0) + (report.frames_dropped or 0) + (report.frames_failed or 0)
    if report.frames_in is None or report.frames_in != accounted:
        failed.append(f"counters do not add up: frames_in {report.frames_in} != frames_out {report.frames_out}"
                      f" + frames_dropped {report.frames_dropped} + frames_failed {report.frames_failed}")
    if report.frames_out != report.detection_stamps:
        failed.append(f"frames_out {report.frames_out} != {report.detection_stamps} distinct detection stamps")
    if report.unexpected_detection_stamps:
        failed.append(f"{report.unexpected_detection_stamps} detection stamps were never published")
    unanswered = report.good_unanswered + report.degraded_unanswered
    covered = report.queue_drops is not None and unanswered <= report.queue_drops
    if report.good_after_fault_unanswered and not covered:
        failed.append(f"{report.good_after_fault_unanswered} good frames right after a fault unanswered; "
                      f"{unanswered} good/degraded frames unanswered > {report.queue_drops} queue drops")
    if report.good_failed_in_log:
        failed.append(f"{len(report.good_failed_in_log)} good frames failed in the node (its log), "
                      f"first at stamp {report.good_failed_in_log[0]} ns")
    for name, tally in report.faults.items():
        if tally.outcome in ("failed", "dropped") and tally.answered:
            failed.append(f"fault {name} ({tally.outcome}): {tally.answered} of {tally.sent} answered, expected none")
        if tally.outcome == "degraded" and tally.answered < tally.sent and not covered:
            failed.append(f"fault {name} (degraded): {tally.answered} of {tally.sent} answered, expected all "
                          f"({unanswered} good/degraded unanswered > {report.queue_drops} queue drops)")
    if report.rss.samples == 0 or report.rss.growth_pct >= growth_limit_pct:
        failed.append(f"RSS grew {report.rss.growth_pct} % ({report.rss.warmup_mib} -> {report.rss.end_mib} MiB)"
                      f", limit {growth_limit_pct} %")
    return failed


def evaluate(report: SoakReport, frames: list[SentFrame], received: _Receiver, priming: list[int],
             baseline: dict[str, int], rss_samples: list[tuple[float, int]], start_s: float,
             warmup_s: float) -> SoakReport:
    """Fill ``report``'s figures from what was sent and received (not the checks)."""
    with received.lock:
        answers = dict(received.detections)
        report.frame_infos = sum(count for stamp, count in received.frame_infos.items() if stamp not in priming)
        report.diagnostics_received = received.diagnostics_received
    report.frames = frames
    report.frames_published = len(frames)
    report.fault_frames = sum(frame.fault is not None for frame in frames)
    report.good_frames = report.frames_published - report.fault_frames
    report.priming_frames = len(priming)
    read_counters(report, received.latest_values(), baseline)
    tally_answers(report, frames, answers, priming)
    report.rss = summarize_rss(rss_samples, start_s, warmup_s)
    return report


# ------------------------------------------------------------------------------- the run
def run_soak(options: SoakOptions, log: Callable[[str], None] = print) -> SoakReport:
    """Run the soak (docs/benchmarks.md) and return its report; also written to
    ``options.out_dir/soak.json``. Raises :class:`SoakError` when the node does not come up."""
    from bevfusion_ros.config import load_config
    options.validate()
    started = time.monotonic()
    options.out_dir.mkdir(parents=True, exist_ok=True)
    config = load_config(options.model_dir / "bevfusion.yaml")
    report = SoakReport(model_dir=str(options.model_dir), duration_s=options.duration_s, rate_hz=options.rate_hz,
                        fault_every=options.fault_every, num_sweeps=options.num_sweeps,
                        log_path=str(options.out_dir / "node.log"))
    params = node_parameters(options, options.out_dir / "node_params.yaml")
    domain_id = options.domain_id if options.domain_id is not None else default_domain_id()
    with safe_ros_process(domain_id) as env:
        node = NodeProcess(params, options.out_dir / "node.log", env)
        sampler = RssSampler(node.pid, options.rss_period_s)
        driver = None
        try:
            log(f"node pid {node.pid} on ROS domain {domain_id}; building {len(options.scene_seeds)} scenes")
            scenes = scene_messages(options.scene_seeds, time.time_ns())
            driver = SoakDriver(domain_id, config.camera_names)
            if not wait_for(driver.node_connected, options.startup_timeout_s, lambda: not node.alive()):
                raise SoakError(f"the node did not connect within {options.startup_timeout_s} s "
                                f"(alive: {node.alive()}); log tail:\n{node.log_tail()}")
            if driver.foreign_nodes():
                raise SoakError(f"ROS domain {domain_id} is in use by {driver.foreign_nodes()}: "
                                "pass another domain id")
            plan = _StampPlan(origin_ns=time.time_ns(), period_ns=round(NS_PER_S / options.rate_hz))
            try:
                priming, primed = prime(driver, scenes[0], plan, options, node.alive)
            except SoakError as error:
                raise SoakError(f"{error}; log tail:\n{node.log_tail()}") from error
            baseline = counters(primed)
            log(f"node answered after {len(priming)} priming frames (counters {baseline}); "
                f"publishing {options.frame_count} frames at {options.rate_hz} Hz")
            publish_start = time.monotonic()
            frames = publish_frames(driver, scenes, plan, options, config.lidar.max_points, node.alive, log)
            report.publish_s = round(time.monotonic() - publish_start, 3)
            _publish_timing(report, frames, options.rate_hz)
            expected_in = baseline.get("frames_in", 0) + len(frames)
            settle_start = time.monotonic()
            report.settled = wait_for(lambda: driver.received.settled(expected_in), options.settle_timeout_s,
                                      lambda: not node.alive())
            report.settle_s = round(time.monotonic() - settle_start, 3)
            report.node_alive = node.alive()
            report.foreign_nodes = driver.foreign_nodes()
            evaluate(report, frames, driver.received, priming, baseline, sampler.stop(), publish_start,
                     options.warmup_s)
        finally:
            sampler.stop()
            report.node_exit_code = node.stop(options.shutdown_timeout_s)
            if driver is not None:
                driver.close()
    log_text = node.log_text()
    report.traceback_in_log = "Traceback" in log_text
    report.good_failed_in_log = good_frames_failed(report.frames, log_text)
    report.failed_checks = failed_checks(report, options.rss_growth_limit_pct)
    report.wall_s = round(time.monotonic() - started, 3)
    write_report(report, options.out_dir / "soak.json")
    return report


def _publish_timing(report: SoakReport, frames: list[SentFrame], rate_hz: float) -> None:
    """Schedule lateness figures, and a warning when the publisher could not keep the rate."""
    lags = [frame.lag_ms for frame in frames]
    report.max_lag_ms = max(lags, default=0.0)
    report.late_frames = sum(lag > 1e3 / rate_hz for lag in lags)
    if report.late_frames:
        report.warnings.append(f"{report.late_frames} frames published more than one period late "
                               f"(max {report.max_lag_ms:.0f} ms): the publisher did not keep {rate_hz} Hz")


def write_report(report: SoakReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(report), indent=1))


def format_report(report: SoakReport) -> str:
    """A readable summary (figures, per-fault table, checks)."""
    node_counters = ", ".join(f"{name} {getattr(report, name)}" for name in
                         ("frames_in", "frames_out", "frames_dropped", "frames_failed", "frames_in_progress"))
    lines = [
        f"soak: {report.model_dir}, {report.duration_s:g} s at {report.rate_hz:g} Hz, fault every "
        f"{report.fault_every}, {report.num_sweeps} sweeps ({report.wall_s:.0f} s wall)",
        f"after {report.priming_frames} priming frames, published {report.frames_published} frames "
        f"({report.good_frames} good, {report.fault_frames} faulty) "
        f"in {report.publish_s:.1f} s; max lag {report.max_lag_ms:.0f} ms, {report.late_frames} late",
        f"node: alive {report.node_alive}, exit code {report.node_exit_code}, Traceback in log "
        f"{report.traceback_in_log}; settled {report.settled} after {report.settle_s:.1f} s",
        f"counters: {node_counters}; dropped by reason {report.dropped_by_reason or '-'}",
        f"detections: {report.detection_messages} messages, {report.detection_stamps} stamps "
        f"({report.detection_stamps / max(report.publish_s, 1e-9):.1f} frames/s answered) "
        f"of which {report.unexpected_detection_stamps} never published; {report.frame_infos} FrameInfo",
        f"good frames: {report.good_answered} answered, {report.good_unanswered} not; right after a fault "
        f"{report.good_after_fault_answered} answered, {report.good_after_fault_unanswered} not; "
        f"queue drops {report.queue_drops}; good frames failed (node log) {len(report.good_failed_in_log)}",
        f"RSS: warm-up {report.rss.warmup_mib} MiB, end {report.rss.end_mib} MiB, growth "
        f"{report.rss.growth_pct} %, max {report.rss.max_mib} MiB ({report.rss.samples} samples; "
        f"warm-up {min(WARMUP_MAX_S, WARMUP_FRACTION * report.duration_s):g} s)",
        "faults (outcome: answered/sent):",
    ]
    lines += [f"  {name:24s} {tally.outcome:9s} {tally.answered}/{tally.sent}" for name, tally in report.faults.items()]
    lines += [f"warning: {warning}" for warning in report.warnings]
    lines += [f"FAILED: {check}" for check in report.failed_checks] or ["all checks passed"]
    return "\n".join(lines)
