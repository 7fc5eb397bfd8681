"""``bevfusion-make-bag SOURCE --out BAG`` / ``bevfusion-make-bag --seeds A:B --out BAG``: write a
rosbag2-compatible MCAP bag of nuScenes data, or of generated scenes, with the topics and frames
the bevfusion node subscribes to (``config/nuscenes.yaml``).

SOURCE is a CUDA-BEVFusion example-data folder or a nuScenes data root (read with
nuscenes-devkit); ``--seeds A:B`` writes the generated scenes of those seeds, for the synthetic rig or
``--rig FILE`` / ``--cameras NAME,NAME,...`` (topics ``/CAM_<name>/image_raw`` per camera). What each source
becomes (frames, stamps, clouds, TF) and the topics: docs/tools.md, "bevfusion-make-bag".
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from bevfusion_ros.config import NUSCENES_CAMERA_NAMES
from bevfusion_ros.io import CalibrationError, FrameError, TensorFileError, load_example_data
from bevfusion_ros.io.calibration import pose_matrix
from bevfusion_ros.io.frame import Frame, read_rgb_image
from bevfusion_ros.io.rig import parse_camera_names
from bevfusion_ros.sim.rig import CAMERAS_OPTION_HELP, RIG_OPTION_HELP
from bevfusion_ros.streaming.node_config import NodeConfig, camera_info_topic, camera_topic

if TYPE_CHECKING:
    from bevfusion_ros.sim.scene import Scene

EXAMPLE_STAMP_NS = 1_533_151_603_547_590_000
SCENE_PERIOD_NS = 100_000_000          # generated scenes: one frame every 0.1 s
LIDAR_CHANNEL = "LIDAR_TOP"
WORLD_FRAME = "odom"
BASE_FRAME = "base_link"
TF_TOPIC = "/tf"
TF_STATIC_TOPIC = "/tf_static"
NUSCENES_CLOUD_FIELDS = ("x", "y", "z", "intensity")
#: Camera sample_data kept around the selected lidar frames' time span (microseconds).
CAMERA_MARGIN_US = 50_000
#: Write order of messages that share a time stamp.
_ORDER = {"tf_static": 0, "tf": 1, "camera": 2, "lidar": 3}


class SourceError(ValueError):
    """SOURCE is neither an example-data folder nor a nuScenes data root, or lacks something."""


def camera_channel(name: str) -> str:
    """nuScenes channel of a camera name of the config: FRONT -> CAM_FRONT."""
    return f"CAM_{name}"


def compressed_topic(name: str) -> str:
    return f"{camera_topic(name)}/compressed"


def lidar_topic() -> str:
    return NodeConfig().lidar_topic


@dataclass
class BagStats:
    path: Path
    topics: dict[str, tuple[str, int]]
    start_ns: int
    end_ns: int

    def describe(self) -> str:
        size = self.path.stat().st_size
        lines = [f"bag: {self.path} ({size / 1e6:.1f} MB)",
                 f"duration: {(self.end_ns - self.start_ns) / 1e9:.3f} s "
                 f"({self.start_ns / 1e9:.6f} .. {self.end_ns / 1e9:.6f} s since the epoch)",
                 f"messages: {sum(count for _, count in self.topics.values())}"]
        for topic, (type_name, count) in sorted(self.topics.items()):
            lines.append(f"  {topic:<38} {type_name:<32} {count}")
        return "\n".join(lines)


def _stats(bag: Any) -> BagStats:
    return BagStats(bag.path, bag.message_counts, bag.start_time_ns or 0, bag.end_time_ns or 0)


# ----------------------------------------------------------------------------------------------
# CUDA-BEVFusion example data
# ----------------------------------------------------------------------------------------------

def is_example_data(source: Path) -> bool:
    return (source / "points.tensor").is_file()


def _write_frame(bag: Any, frame: Frame, stamp_ns: int, jpegs: Sequence[bytes] | None,
                 tf_static: bool = True) -> None:
    """The messages of one frame, all stamped ``stamp_ns``: ``/tf_static`` (when asked), then
    per camera its CameraInfo and its image (raw rgb8, or CompressedImage of ``jpegs[i]``),
    then the cloud."""
    from sensor_msgs.msg import CompressedImage

    from bevfusion_ros.ros.frame_messages import frame_messages

    messages = frame_messages(frame, stamp_ns)
    if tf_static:
        bag.write(TF_STATIC_TOPIC, messages.tf_static, stamp_ns)
    for index, name in enumerate(frame.calibration.camera_names):
        bag.write(camera_info_topic(camera_topic(name)), messages.camera_infos[index], stamp_ns)
        if jpegs is not None:
            image = CompressedImage(header=messages.images[index].header, format="jpeg",
                                    data=jpegs[index])
            bag.write(compressed_topic(name), image, stamp_ns)
        else:
            bag.write(camera_topic(name), messages.images[index], stamp_ns)
    bag.write(lidar_topic(), messages.cloud, stamp_ns)


def write_example_bag(source: str | Path, out: str | Path, *, compressed: bool = False,
                      stamp_ns: int = EXAMPLE_STAMP_NS,
                      camera_names: Sequence[str] | None = None) -> BagStats:
    """One example-data frame as a bag (see docs/tools.md); returns what was written.
    ``compressed``: the folder's JPEG files as they are; ``camera_names``: default the folder's."""
    from bevfusion_ros.ros.bag import BagWriter

    source = Path(source)
    frame = load_example_data(source, camera_names)
    jpegs = ([(source / f"{index}-{name}.jpg").read_bytes()
              for index, name in enumerate(frame.calibration.camera_names)] if compressed else None)
    with BagWriter(out) as bag:
        _write_frame(bag, frame, stamp_ns, jpegs)
    return _stats(bag)


# ----------------------------------------------------------------------------------------------
# Generated scenes (bevfusion_ros.sim)
# ----------------------------------------------------------------------------------------------

def scene_stamp_ns(index: int, start_ns: int = EXAMPLE_STAMP_NS,
                   period_ns: int = SCENE_PERIOD_NS) -> int:
    """Stamp of the ``index``-th scene of a generated-scenes bag."""
    return start_ns + index * period_ns


def write_frames_bag(frames: Iterable[Frame], out: str | Path, *, compressed: bool = False,
                     start_ns: int = EXAMPLE_STAMP_NS, period_ns: int = SCENE_PERIOD_NS,
                     progress: Callable[[str], None] | None = None,
                     before_close: Callable[[Any], None] | None = None) -> BagStats:
    """Frames, e.g. generated scenes (``Scene.to_frame()``), one after the other every
    ``period_ns`` from ``start_ns`` (:func:`scene_stamp_ns`; 10 Hz by default, like a lidar):
    the images exactly (raw rgb8; ``compressed``: JPEG quality 95), the cloud (x, y, z,
    intensity, time_lag), the first frame's rig on ``/tf_static`` (once, first: one rig for all).
    ``before_close(bag)`` may add metadata to the :class:`~bevfusion_ros.ros.bag.BagWriter`
    after the last frame. Ground truth: :func:`write_scenes_bag`."""
    from bevfusion_ros.ros.bag import BagWriter

    with BagWriter(out) as bag:
        for index, frame in enumerate(frames):
            jpegs = [encode_jpeg(image) for image in frame.images] if compressed else None
            _write_frame(bag, frame, scene_stamp_ns(index, start_ns, period_ns), jpegs,
                         tf_static=index == 0)
            if progress is not None and (index + 1) % 20 == 0:
                progress(f"  {index + 1} frames written")
        if before_close is not None:
            before_close(bag)
    return _stats(bag)


def write_scenes_bag(scenes: Iterable[Scene], out: str | Path, *, compressed: bool = False,
                     start_ns: int = EXAMPLE_STAMP_NS, period_ns: int = SCENE_PERIOD_NS,
                     progress: Callable[[str], None] | None = None) -> BagStats:
    """Generated scenes as :func:`write_frames_bag` writes their frames, plus each scene's
    ground truth by lidar stamp (the metadata record
    :data:`~bevfusion_ros.analysis.ground_truth.GROUND_TRUTH_RECORD`) and the scenes' seeds
    (rosbag2 ``custom_data`` :data:`~bevfusion_ros.analysis.ground_truth.SCENE_SEEDS_KEY`)."""
    from bevfusion_ros.analysis.ground_truth import (
        GROUND_TRUTH_RECORD,
        SCENE_SEEDS_KEY,
        FrameTruth,
        truth_record,
    )
    truths: dict[int, FrameTruth] = {}
    seeds: list[int] = []

    def frames() -> Iterator[Frame]:
        for index, scene in enumerate(scenes):
            truths[scene_stamp_ns(index, start_ns, period_ns)] = FrameTruth.of_scene(scene)
            seeds.append(scene.seed)
            yield scene.to_frame()

    def add_truth(bag: Any) -> None:
        bag.add_metadata(GROUND_TRUTH_RECORD, truth_record(truths))
        bag.custom_data[SCENE_SEEDS_KEY] = ",".join(str(seed) for seed in seeds)

    return write_frames_bag(frames(), out, compressed=compressed, start_ns=start_ns,
                            period_ns=period_ns, progress=progress, before_close=add_truth)


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """RGB uint8 [H, W, 3] -> JPEG bytes."""
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]),
                            [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


# ----------------------------------------------------------------------------------------------
# nuScenes data root (nuscenes-devkit)
# ----------------------------------------------------------------------------------------------

def is_nuscenes_root(source: Path, version: str) -> bool:
    return (source / version / "sample_data.json").is_file()


def _load_nuscenes(dataroot: Path, version: str) -> Any:
    try:
        from nuscenes.nuscenes import NuScenes
    except ImportError as error:
        raise SourceError(
            f"reading a nuScenes data root needs nuscenes-devkit ({error}); install the "
            "'nuscenes' extra, then requirements/nuscenes.txt with --no-deps") from error
    return NuScenes(version=version, dataroot=str(dataroot), verbose=False)


def _channel_chain(nusc: Any, first_sample: dict, channel: str, scene_name: str) -> list[dict]:
    """All sample_data of ``channel`` in the scene (keyframes and sweeps), in time order: from
    the first keyframe back to the scene's first record, then forward to its last."""
    token = first_sample["data"].get(channel)
    if token is None:
        raise SourceError(f"scene {scene_name}: its first sample has no {channel} data")
    record = nusc.get("sample_data", token)
    while record["prev"]:
        record = nusc.get("sample_data", record["prev"])
    chain = [record]
    while record["next"]:
        record = nusc.get("sample_data", record["next"])
        chain.append(record)
    chain.sort(key=lambda r: r["timestamp"])
    return chain


@dataclass(frozen=True)
class _Event:
    time_us: int
    kind: str            # tf_static | tf | camera | lidar
    sequence: int        # tie-break: insertion order
    record: Any          # sample_data record, ego_pose record or the scene's static transforms
    camera: str = ""


def _transform(parent: str, child: str, matrix: np.ndarray, stamp_ns: int) -> Any:
    from geometry_msgs.msg import TransformStamped

    from bevfusion_ros.ros import convert
    from bevfusion_ros.ros.frame_messages import header

    return TransformStamped(header=header(stamp_ns, parent), child_frame_id=child,
                            transform=convert.matrix_to_transform(matrix))


def _calibrated_matrix(nusc: Any, sample_data: dict) -> np.ndarray:
    calibrated = nusc.get("calibrated_sensor", sample_data["calibrated_sensor_token"])
    return pose_matrix(calibrated["translation"], calibrated["rotation"])


def _scene_events(nusc: Any, scene: dict, camera_names: Sequence[str],
                  max_frames: int | None) -> list[_Event]:
    from bevfusion_ros.ros.frame_messages import CAMERA_FRAME_PREFIX, LIDAR_FRAME

    first_sample = nusc.get("sample", scene["first_sample_token"])
    lidar = _channel_chain(nusc, first_sample, LIDAR_CHANNEL, scene["name"])
    if max_frames is not None:
        lidar = lidar[:max_frames]
    start_us = lidar[0]["timestamp"] - CAMERA_MARGIN_US
    end_us = lidar[-1]["timestamp"] + CAMERA_MARGIN_US
    cameras = {name: [r for r in _channel_chain(nusc, first_sample, camera_channel(name),
                                                scene["name"])
                      if start_us <= r["timestamp"] <= end_us]
               for name in camera_names}

    events: list[_Event] = []
    poses_seen: set[str] = set()

    def add(kind: str, record: dict, camera: str = "") -> None:
        events.append(_Event(record["timestamp"], kind, len(events), record, camera))
        if record["ego_pose_token"] not in poses_seen:
            poses_seen.add(record["ego_pose_token"])
            pose = nusc.get("ego_pose", record["ego_pose_token"])
            events.append(_Event(pose["timestamp"], "tf", len(events), pose))

    for record in lidar:
        add("lidar", record)
    for name, records in cameras.items():
        for record in records:
            add("camera", record, name)
    first_us = min(event.time_us for event in events)
    static = {LIDAR_FRAME: _calibrated_matrix(nusc, lidar[0])}
    for name, records in cameras.items():
        if records:
            static[CAMERA_FRAME_PREFIX + name] = _calibrated_matrix(nusc, records[0])
    events.append(_Event(first_us, "tf_static", -1, static))
    events.sort(key=lambda e: (e.time_us, _ORDER[e.kind], e.sequence))
    return events


def _nuscenes_cloud(path: Path, stamp_ns: int) -> Any:
    """PointCloud2 (x, y, z, intensity in ``lidar_top``) of a nuScenes ``.pcd.bin`` file."""
    from bevfusion_ros.ros.frame_messages import LIDAR_FRAME, cloud_message

    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % 5:
        raise SourceError(f"{path}: {raw.size} float32 values, not a multiple of 5 "
                          "(x, y, z, intensity, ring)")
    return cloud_message(raw.reshape(-1, 5)[:, :4], stamp_ns, LIDAR_FRAME, NUSCENES_CLOUD_FIELDS)


def _nuscenes_camera_messages(nusc: Any, dataroot: Path, event: _Event, stamp_ns: int,
                              compressed: bool) -> Iterator[tuple[str, Any]]:
    """(topic, message) of a camera event: its CameraInfo, then its image (raw rgb8, or the
    original JPEG bytes with ``compressed``)."""
    from sensor_msgs.msg import CompressedImage

    from bevfusion_ros.ros import convert
    from bevfusion_ros.ros.frame_messages import CAMERA_FRAME_PREFIX, header

    name, record = event.camera, event.record
    camera_header = header(stamp_ns, CAMERA_FRAME_PREFIX + name)
    path = dataroot / record["filename"]
    calibrated = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
    k = np.asarray(calibrated["camera_intrinsic"], dtype=np.float64)
    if compressed:
        data = path.read_bytes()
        width, height = int(record.get("width") or 0), int(record.get("height") or 0)
        if not (width and height):
            height, width = read_rgb_image(path).shape[:2]
        image = CompressedImage(header=camera_header, format="jpeg", data=data)
        topic = compressed_topic(name)
    else:
        rgb = read_rgb_image(path)
        height, width = rgb.shape[:2]
        image = convert.rgb_to_image(rgb, camera_header)
        topic = camera_topic(name)
    yield camera_info_topic(camera_topic(name)), convert.intrinsics_to_camera_info(k, width, height, camera_header)
    yield topic, image


def _nuscenes_messages(nusc: Any, dataroot: Path, events: list[_Event],
                       compressed: bool) -> Iterator[tuple[str, Any, int]]:
    """(topic, message, log time ns) of each event, built lazily (images are large)."""
    from tf2_msgs.msg import TFMessage

    cloud_topic = lidar_topic()
    for event in events:
        stamp_ns = int(event.time_us) * 1000
        if event.kind == "tf_static":
            transforms = [_transform(BASE_FRAME, child, matrix, stamp_ns)
                          for child, matrix in event.record.items()]
            yield TF_STATIC_TOPIC, TFMessage(transforms=transforms), stamp_ns
        elif event.kind == "tf":
            pose = event.record
            matrix = pose_matrix(pose["translation"], pose["rotation"])
            yield TF_TOPIC, TFMessage(transforms=[_transform(WORLD_FRAME, BASE_FRAME, matrix,
                                                             stamp_ns)]), stamp_ns
        elif event.kind == "lidar":
            yield cloud_topic, _nuscenes_cloud(dataroot / event.record["filename"], stamp_ns), stamp_ns
        else:
            for topic, message in _nuscenes_camera_messages(nusc, dataroot, event, stamp_ns, compressed):
                yield topic, message, stamp_ns


def write_nuscenes_bag(dataroot: str | Path, out: str | Path, *, version: str = "v1.0-mini",
                       scenes: Sequence[str] | None = None, compressed: bool = False,
                       max_frames: int | None = None,
                       camera_names: Sequence[str] = NUSCENES_CAMERA_NAMES,
                       progress: Callable[[str], None] | None = None) -> BagStats:
    """Scenes of a nuScenes data root as a bag (see docs/tools.md)."""
    from bevfusion_ros.ros.bag import BagWriter

    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    dataroot = Path(dataroot)
    nusc = _load_nuscenes(dataroot, version)
    by_name = {scene["name"]: scene for scene in nusc.scene}
    if scenes:
        unknown = [name for name in scenes if name not in by_name]
        if unknown:
            raise SourceError(f"no scene {unknown} in {dataroot}/{version}; it has "
                              f"{sorted(by_name)}")
        selected = [by_name[name] for name in dict.fromkeys(scenes)]
    else:
        selected = list(nusc.scene)
    planned = [(scene, _scene_events(nusc, scene, camera_names, max_frames)) for scene in selected]
    planned.sort(key=lambda item: item[1][0].time_us)
    with BagWriter(out) as bag:
        for scene, events in planned:
            lidar_count = sum(event.kind == "lidar" for event in events)
            camera_count = sum(event.kind == "camera" for event in events)
            if progress:
                progress(f"scene {scene['name']}: {lidar_count} lidar sweeps, "
                         f"{camera_count} camera images")
            for topic, message, log_time_ns in _nuscenes_messages(nusc, dataroot, events,
                                                                  compressed):
                bag.write(topic, message, log_time_ns)
    return _stats(bag)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bevfusion-make-bag",
        description="Write a rosbag2-compatible MCAP bag (the node's topics and TF frames) of a "
                    "CUDA-BEVFusion example-data folder or of nuScenes scenes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example data: one frame. nuScenes: --scene, --version, --max-frames select.")
    parser.add_argument("source", nargs="?",
                        help="CUDA-BEVFusion example-data folder or nuScenes data root")
    parser.add_argument("--seeds", metavar="A:B",
                        help="instead of SOURCE: the generated scenes of seeds A .. B-1 "
                             "(bevfusion_ros.sim), one frame each at 10 Hz")
    parser.add_argument("--out", required=True, help="bag file to write (.mcap), replaced if present")
    parser.add_argument("--compressed", action="store_true",
                        help="sensor_msgs/CompressedImage JPEGs on <camera topic>/compressed")
    parser.add_argument("--scene", action="append", metavar="NAME",
                        help="nuScenes scene name (e.g. scene-0061), repeatable; default all")
    parser.add_argument("--version", default="v1.0-mini", help="nuScenes version folder")
    parser.add_argument("--max-frames", type=int, metavar="N",
                        help="at most N lidar sweeps per nuScenes scene")
    parser.add_argument("--rig", type=Path, metavar="RIG.yaml",
                        help=f"--seeds: {RIG_OPTION_HELP}")
    parser.add_argument("--cameras", metavar="NAME,NAME,...",
                        help=f"--seeds or a nuScenes root: {CAMERAS_OPTION_HELP}")
    parser.add_argument("--stamp-ns", type=int, default=EXAMPLE_STAMP_NS,
                        help="example data: stamp of every message (--seeds: of the first "
                             "scene), ns since the epoch "
                             f"(default {EXAMPLE_STAMP_NS})")
    return parser


def _write_seeds_bag(args: argparse.Namespace, out: Path) -> BagStats:
    """``--seeds``: the generated scenes, for ``--rig`` / ``--cameras``, as a bag."""
    from bevfusion_ros.sim.rig import select_rig
    from bevfusion_ros.sim.scene import generate_scene
    from bevfusion_ros.train.data import parse_scene_range
    rig = select_rig(args.rig, args.cameras)
    scenes = (generate_scene(seed, rig=rig) for seed in parse_scene_range(args.seeds))
    return write_scenes_bag(scenes, out, compressed=args.compressed, start_ns=args.stamp_ns,
                            progress=lambda line: print(line, flush=True))


def _write_source_bag(args: argparse.Namespace, out: Path) -> BagStats:
    """SOURCE (an example-data folder or a nuScenes data root) as a bag."""
    source = Path(args.source)
    if not source.is_dir():
        raise SourceError(f"{source} is not a directory")
    if args.rig is not None:
        raise SourceError("--rig applies to --seeds (generated scenes); a SOURCE brings its own cameras")
    if is_example_data(source):
        if args.cameras is not None:
            raise SourceError(f"--cameras applies to --seeds and nuScenes data roots; {source} is an "
                              "example-data folder (its cameras are its {i}-{NAME}.jpg files)")
        if args.scene or args.max_frames is not None:
            raise SourceError("--scene and --max-frames apply to nuScenes data roots; "
                              f"{source} is an example-data folder (one frame)")
        return write_example_bag(source, out, compressed=args.compressed, stamp_ns=args.stamp_ns)
    if is_nuscenes_root(source, args.version):
        cameras = parse_camera_names(args.cameras) if args.cameras else NUSCENES_CAMERA_NAMES
        return write_nuscenes_bag(source, out, version=args.version, scenes=args.scene,
                                  camera_names=cameras, compressed=args.compressed, max_frames=args.max_frames,
                                  progress=lambda line: print(line, flush=True))
    raise SourceError(f"{source} is neither a CUDA-BEVFusion example-data folder "
                      f"(points.tensor) nor a nuScenes data root "
                      f"({source / args.version / 'sample_data.json'})")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.source is None) == (args.seeds is None):
        parser.error("give either SOURCE or --seeds A:B")
    out = Path(args.out)
    from bevfusion_ros.ros.bag import BagError

    try:
        if out.is_dir():
            raise SourceError(f"--out {out} is a directory; give a file name (e.g. {out}/frame.mcap)")
        stats = _write_seeds_bag(args, out) if args.seeds is not None else _write_source_bag(args, out)
    except (SourceError, FrameError, CalibrationError, TensorFileError, BagError, ValueError,
            OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(stats.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
