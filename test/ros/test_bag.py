"""bevfusion_ros.ros.bag and bevfusion-make-bag against independent references.

* Bags written by :class:`BagWriter` are decoded a second time by mcap-ros2-support's own reader,
  which builds its CDR decoder from the schema text alone: equal fields prove that the schemas
  are real ROS 2 definitions. The expected ``ros2msg`` text is assembled here from the
  installed ``.msg`` files in rosbag2's layout.
* Example-data bags are checked against the folder's files parsed here (tensor format from
  the data's README, JPEGs decoded with OpenCV), transforms with a quaternion -> matrix formula
  written in this file.
* nuScenes bags are made from a tiny data root built in this file (devkit JSON tables, random
  ``.pcd.bin`` sweeps, small JPEGs) and compared with those tables and files.
"""
from __future__ import annotations

import array
import json
import math
import struct
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from geometry_msgs.msg import TransformStamped, Vector3
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage
from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose

from bevfusion_ros.ros import bag as bagmod
from bevfusion_ros.ros.bag import BagError, BagMessage, BagWriter, bag_summary, read_bag
from bevfusion_ros.tools import make_bag

mcap_reader = pytest.importorskip("mcap.reader")
ros2_reader = pytest.importorskip("mcap_ros2.reader")

CAMERAS = ("FRONT", "FRONT_RIGHT", "FRONT_LEFT", "BACK", "BACK_LEFT", "BACK_RIGHT")
EQUALS_80 = "=" * 80


# ----------------------------------------------------------------------------------------------
# Independent helpers
# ----------------------------------------------------------------------------------------------

def msg_file(type_name: str) -> str:
    """Text of an installed .msg (``pkg/Name``), read straight from <sys.prefix>/share."""
    package, name = type_name.split("/")
    return (Path(sys.prefix) / "share" / package / "msg" / f"{name}.msg").read_text()


def rotation_xyzw(x: float, y: float, z: float, w: float) -> np.ndarray:
    """Rotation matrix of a quaternion (normalised here), Hamilton convention."""
    n = math.sqrt(x * x + y * y + z * z + w * w)
    x, y, z, w = x / n, y / n, z / n, w / n
    return np.array([
        [w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z],
    ])


def assert_quaternion_equal(rotation, wxyz, tol: float = 1e-9) -> None:
    """geometry_msgs/Quaternion equals the nuScenes (w, x, y, z) quaternion up to sign."""
    expected = np.asarray(wxyz, dtype=np.float64)
    expected = expected / np.linalg.norm(expected)
    got = np.array([rotation.w, rotation.x, rotation.y, rotation.z])
    assert min(np.abs(got - expected).max(), np.abs(got + expected).max()) < tol, (got, expected)


def read_tensor_file(path: Path) -> np.ndarray:
    """CUDA-BEVFusion .tensor: int32 magic 0x33ff1101, ndim, dtype code, dims, raw data."""
    raw = path.read_bytes()
    magic, ndim, dtype = struct.unpack_from("<iii", raw, 0)
    assert magic == 0x33FF1101
    dims = struct.unpack_from(f"<{ndim}i", raw, 12)
    numpy_dtype = {2: np.float16, 3: np.float32}[dtype]
    return np.frombuffer(raw, dtype=numpy_dtype, offset=12 + 4 * ndim).reshape(dims)


def decode_rgb(data: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return bgr[:, :, ::-1]


def cloud_array(cloud: PointCloud2, names: tuple[str, ...]) -> np.ndarray:
    """Little-endian float32 fields of an unorganised cloud, parsed from the raw bytes."""
    assert [f.name for f in cloud.fields] == list(names)
    assert [f.offset for f in cloud.fields] == [4 * i for i in range(len(names))]
    assert all(f.datatype == PointField.FLOAT32 and f.count == 1 for f in cloud.fields)
    assert cloud.point_step == 4 * len(names) and not cloud.is_bigendian and cloud.height == 1
    assert cloud.row_step == cloud.point_step * cloud.width
    return np.frombuffer(bytes(cloud.data), dtype="<f4").reshape(cloud.width, len(names))


def stamp_ns(header) -> int:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


# ----------------------------------------------------------------------------------------------
# Messages of the round trip
# ----------------------------------------------------------------------------------------------

def make_header(frame_id: str, sec: int, nanosec: int) -> Header:
    header = Header(frame_id=frame_id)
    header.stamp.sec, header.stamp.nanosec = sec, nanosec
    return header


def sample_messages() -> list[tuple[str, object, int]]:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    image = Image(header=make_header("cam_FRONT", 1_700_000_000, 5), height=5, width=7,
                  encoding="rgb8", is_bigendian=0, step=21,
                  data=array.array("B", pixels.tobytes()))
    points = rng.normal(size=(11, 4)).astype(np.float32)
    cloud = PointCloud2(header=make_header("lidar_top", 1_700_000_000, 10), height=1, width=11,
                        fields=[PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32,
                                           count=1) for i, n in enumerate("xyzi")],
                        is_bigendian=False, point_step=16, row_step=176,
                        data=array.array("B", points.tobytes()), is_dense=True)
    transform = TransformStamped(header=make_header("lidar_top", 1_700_000_000, 0),
                                 child_frame_id="cam_FRONT")
    transform.transform.translation = Vector3(x=1.5, y=-0.25, z=2.0)
    transform.transform.rotation.x, transform.transform.rotation.w = 0.6, 0.8
    tf = TFMessage(transforms=[transform, TransformStamped(child_frame_id="cam_BACK")])
    info = CameraInfo(header=make_header("cam_FRONT", 1_700_000_000, 5), height=900, width=1600,
                      distortion_model="plumb_bob", d=[0.1, 0.0, 0.0, 0.0, 0.0],
                      k=[1266.4, 0.0, 816.3, 0.0, 1266.4, 491.5, 0.0, 0.0, 1.0])
    detection = Detection3D(header=make_header("lidar_top", 1_700_000_000, 10), id="3")
    hypothesis = ObjectHypothesisWithPose()
    hypothesis.hypothesis.class_id, hypothesis.hypothesis.score = "car", 0.75
    hypothesis.pose.pose.position.x = 4.0
    detection.results = [hypothesis]
    detection.bbox.center.position.x, detection.bbox.size.x = 4.0, 4.5
    detections = Detection3DArray(header=make_header("lidar_top", 1_700_000_000, 10),
                                  detections=[detection])
    # Written out of log-time order on purpose.
    return [("/CAM_FRONT/image_raw", image, 300), ("/LIDAR_TOP", cloud, 100),
            ("/tf_static", tf, 50), ("/CAM_FRONT/camera_info", info, 200),
            ("/bevfusion/detections", detections, 400), ("/CAM_FRONT/image_raw", image, 250)]


@pytest.fixture
def round_trip_bag(tmp_path: Path) -> tuple[Path, list[tuple[str, object, int]]]:
    path = tmp_path / "sub" / "round_trip.mcap"
    messages = sample_messages()
    with BagWriter(path) as writer:
        for topic, message, log_time in messages:
            writer.write(topic, message, log_time)
    return path, messages


# ----------------------------------------------------------------------------------------------
# Message definitions
# ----------------------------------------------------------------------------------------------

def test_message_definition_of_image_is_rosbag2_layout() -> None:
    expected = (msg_file("sensor_msgs/Image")
                + f"\n{EQUALS_80}\nMSG: std_msgs/Header\n" + msg_file("std_msgs/Header")
                + f"\n{EQUALS_80}\nMSG: builtin_interfaces/Time\n"
                + msg_file("builtin_interfaces/Time"))
    definition = bagmod.message_definition("sensor_msgs/msg/Image")
    assert definition == expected
    assert "\nMSG: std_msgs/Header\n" in definition and "\nMSG: builtin_interfaces/Time\n" in definition
    assert bagmod.message_definition("sensor_msgs/Image") == expected


def test_message_definition_lists_every_nested_type_once() -> None:
    definition = bagmod.message_definition("vision_msgs/msg/Detection3DArray")
    blocks = definition.split(f"\n{EQUALS_80}\n")
    assert blocks[0] == msg_file("vision_msgs/Detection3DArray")
    names = [block.split("\n", 1)[0] for block in blocks[1:]]
    assert all(name.startswith("MSG: ") for name in names)
    names = [name[len("MSG: "):] for name in names]
    assert len(names) == len(set(names))
    assert set(names) == {
        "std_msgs/Header", "builtin_interfaces/Time", "vision_msgs/Detection3D",
        "vision_msgs/ObjectHypothesisWithPose", "vision_msgs/ObjectHypothesis",
        "geometry_msgs/PoseWithCovariance", "geometry_msgs/Pose", "geometry_msgs/Point",
        "geometry_msgs/Quaternion", "vision_msgs/BoundingBox3D", "geometry_msgs/Vector3"}
    for block in blocks[1:]:
        name, text = block.split("\n", 1)
        assert text == msg_file(name[len("MSG: "):])


def test_message_definition_of_unknown_type_raises() -> None:
    with pytest.raises(BagError, match="no message definition"):
        bagmod.message_definition("sensor_msgs/msg/NoSuchType")
    with pytest.raises(BagError, match="not a ROS 2 message type name"):
        bagmod.message_definition("Image")


def test_type_name_of() -> None:
    assert bagmod.type_name_of(Image()) == "sensor_msgs/msg/Image"
    assert bagmod.type_name_of(TFMessage()) == "tf2_msgs/msg/TFMessage"
    assert bagmod.type_name_of(Detection3DArray) == "vision_msgs/msg/Detection3DArray"
    with pytest.raises(TypeError):
        bagmod.type_name_of(object())


# ----------------------------------------------------------------------------------------------
# Writer / reader
# ----------------------------------------------------------------------------------------------

def test_round_trip_in_log_time_order(round_trip_bag) -> None:
    path, messages = round_trip_bag
    got = list(read_bag(path))
    expected = sorted(messages, key=lambda m: m[2])
    assert [(m.topic, m.log_time_ns) for m in got] == [(t, time) for t, _, time in expected]
    for message, (topic, original, _) in zip(got, expected):
        assert isinstance(message, BagMessage)
        assert type(message.message) is type(original)
        assert message.message == original
        assert message.type_name == bagmod.type_name_of(original)
    image = next(m.message for m in got if m.topic == "/CAM_FRONT/image_raw")
    assert bytes(image.data) == bytes(messages[0][1].data)


def test_read_bag_topic_filter_and_summary(round_trip_bag) -> None:
    path, _ = round_trip_bag
    only = list(read_bag(path, topics=["/CAM_FRONT/image_raw", "/tf_static"]))
    assert [(m.topic, m.log_time_ns) for m in only] == [
        ("/tf_static", 50), ("/CAM_FRONT/image_raw", 250), ("/CAM_FRONT/image_raw", 300)]
    assert bag_summary(path) == {
        "/CAM_FRONT/image_raw": ("sensor_msgs/msg/Image", 2),
        "/LIDAR_TOP": ("sensor_msgs/msg/PointCloud2", 1),
        "/tf_static": ("tf2_msgs/msg/TFMessage", 1),
        "/CAM_FRONT/camera_info": ("sensor_msgs/msg/CameraInfo", 1),
        "/bevfusion/detections": ("vision_msgs/msg/Detection3DArray", 1),
    }


def test_independent_decoder_reads_the_same_fields(round_trip_bag) -> None:
    """mcap-ros2-support decodes with a parser built from the schema text alone."""
    path, messages = round_trip_bag
    decoded = list(ros2_reader.read_ros2_messages(str(path)))
    expected = sorted(messages, key=lambda m: m[2])
    assert len(decoded) == len(expected)
    for item, (topic, original, log_time) in zip(decoded, expected):
        assert item.channel.topic == topic and item.log_time_ns == log_time
        assert item.schema.name == bagmod.type_name_of(original)
        assert item.schema.encoding == "ros2msg" and item.channel.message_encoding == "cdr"
        msg = item.ros_msg
        if isinstance(original, Image):
            assert (msg.header.frame_id, msg.header.stamp.sec, msg.header.stamp.nanosec) == (
                "cam_FRONT", 1_700_000_000, 5)
            assert (msg.height, msg.width, msg.encoding, msg.step) == (5, 7, "rgb8", 21)
            assert bytes(msg.data) == bytes(original.data)
        elif isinstance(original, PointCloud2):
            assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
                (f.name, f.offset, f.datatype, f.count) for f in original.fields]
            assert (msg.width, msg.point_step, msg.row_step, msg.is_dense) == (11, 16, 176, True)
            assert bytes(msg.data) == bytes(original.data)
        elif isinstance(original, TFMessage):
            assert [t.child_frame_id for t in msg.transforms] == ["cam_FRONT", "cam_BACK"]
            first = msg.transforms[0]
            assert first.header.frame_id == "lidar_top"
            assert (first.transform.translation.x, first.transform.translation.y,
                    first.transform.translation.z) == (1.5, -0.25, 2.0)
            assert (first.transform.rotation.x, first.transform.rotation.w) == (0.6, 0.8)
        elif isinstance(original, CameraInfo):
            assert (msg.width, msg.height, msg.distortion_model) == (1600, 900, "plumb_bob")
            assert list(msg.k) == list(original.k) and list(msg.d) == list(original.d)
            assert list(msg.p) == [0.0] * 12
        else:
            detection = msg.detections[0]
            assert detection.id == "3" and detection.header.frame_id == "lidar_top"
            assert detection.results[0].hypothesis.class_id == "car"
            assert detection.results[0].hypothesis.score == 0.75
            assert detection.results[0].pose.pose.position.x == 4.0
            assert (detection.bbox.center.position.x, detection.bbox.size.x) == (4.0, 4.5)


def test_file_layout_is_rosbag2_mcap(round_trip_bag) -> None:
    path, _ = round_trip_bag
    with open(path, "rb") as stream:
        reader = mcap_reader.make_reader(stream)
        header = reader.get_header()
        summary = reader.get_summary()
        metadata = {record.name: record.metadata for record in reader.iter_metadata()}
    assert header.profile == "ros2" and "bevfusion_ros" in header.library
    schemas = {schema.name: schema for schema in summary.schemas.values()}
    assert set(schemas) == {"sensor_msgs/msg/Image", "sensor_msgs/msg/PointCloud2",
                            "tf2_msgs/msg/TFMessage", "sensor_msgs/msg/CameraInfo",
                            "vision_msgs/msg/Detection3DArray"}
    for name, schema in schemas.items():
        assert schema.encoding == "ros2msg"
        assert schema.data.decode() == bagmod.message_definition(name)
    for channel in summary.channels.values():
        assert channel.message_encoding == "cdr"
        profiles = yaml.safe_load(channel.metadata["offered_qos_profiles"])
        durability = "transient_local" if channel.topic == "/tf_static" else "volatile"
        assert profiles[0]["durability"] == durability
        assert profiles[0]["reliability"] == "reliable"
        assert channel.metadata["topic_type_hash"].startswith("RIHS01_")
    info = yaml.safe_load(metadata["rosbag2"]["serialized_metadata"])
    assert info["version"] == 9 and info["storage_identifier"] == "mcap"
    assert info["message_count"] == 6
    assert info["starting_time"]["nanoseconds_since_epoch"] == 50
    assert info["duration"]["nanoseconds"] == 350
    counts = {t["topic_metadata"]["name"]: t["message_count"]
              for t in info["topics_with_message_count"]}
    assert counts["/CAM_FRONT/image_raw"] == 2 and counts["/tf_static"] == 1


def test_writer_errors(tmp_path: Path) -> None:
    path = tmp_path / "errors.mcap"
    with BagWriter(path) as writer:
        writer.write("/a", Image(), 1)
        with pytest.raises(BagError, match="sensor_msgs/msg/Image.*CameraInfo"):
            writer.write("/a", CameraInfo(), 2)
        with pytest.raises(BagError, match="absolute"):
            writer.write("relative", Image(), 3)
        with pytest.raises(BagError, match="negative"):
            writer.write("/a", Image(), -1)
    with pytest.raises(BagError, match="closed"):
        writer.write("/a", Image(), 4)
    assert bag_summary(path) == {"/a": ("sensor_msgs/msg/Image", 1)}
    # Overwrites an existing file.
    with BagWriter(path) as writer:
        writer.write("/b", TFMessage(), 1)
    assert bag_summary(path) == {"/b": ("tf2_msgs/msg/TFMessage", 1)}


def test_serialized_messages_custom_data_and_metadata_records(tmp_path: Path) -> None:
    """write_serialized stores the bytes as they are (read back by the independent mcap_ros2
    decoder); custom_data lands in rosbag2's metadata.yaml; metadata records read back by name."""
    from rclpy.serialization import serialize_message
    path = tmp_path / "raw.mcap"
    info = CameraInfo(width=640, height=480, distortion_model="plumb_bob")
    data = serialize_message(info)
    with BagWriter(path) as writer:
        writer.write_serialized("/info", "sensor_msgs/CameraInfo", data, 7)
        writer.custom_data["origin"] = "test"
        writer.add_metadata("extra", {"a": "1", "b": "two"})
        with pytest.raises(BagError, match="rosbag2"):
            writer.add_metadata("rosbag2", {})
        with pytest.raises(BagError, match="strings"):
            writer.add_metadata("bad", {"a": 1})
    with open(path, "rb") as stream:
        ((schema, channel, message, decoded),) = _decoded_messages(stream)
    assert (schema.name, channel.topic, message.log_time) == ("sensor_msgs/msg/CameraInfo", "/info", 7)
    assert message.data == data
    assert (decoded.width, decoded.height, decoded.distortion_model) == (640, 480, "plumb_bob")
    assert bagmod.read_metadata(path, "extra") == {"a": "1", "b": "two"}
    assert bagmod.read_metadata(path, "absent") is None
    assert bagmod.bag_custom_data(path) == {"origin": "test"}
    assert bag_summary(path) == {"/info": ("sensor_msgs/msg/CameraInfo", 1)}


def _decoded_messages(stream):
    from mcap_ros2.decoder import DecoderFactory
    reader = mcap_reader.make_reader(stream, decoder_factories=[DecoderFactory()])
    return list(reader.iter_decoded_messages())


def test_corrupt_and_absent_files_raise_bag_error(round_trip_bag, tmp_path: Path) -> None:
    path, _ = round_trip_bag
    data = path.read_bytes()
    cases = {
        "absent.mcap": None,
        "empty.mcap": b"",
        "text.mcap": b"this is not an MCAP file at all\n" * 4,
        "head.mcap": data[:200],
        "half.mcap": data[: len(data) // 2],
        "no_magic.mcap": b"\x00" * 8 + data[8:],
    }
    for name, content in cases.items():
        bad = tmp_path / name
        if content is not None:
            bad.write_bytes(content)
        with pytest.raises(BagError):
            list(read_bag(bad))
        if name != "half.mcap":  # a cut-off file may still scan; its messages then must fail
            with pytest.raises(BagError):
                bag_summary(bad)
    with pytest.raises(BagError, match="not a file"):
        bag_summary(tmp_path)
    with pytest.raises(BagError, match="does not exist"):
        read_bag(tmp_path / "absent.mcap")  # at the call, before iterating


# ----------------------------------------------------------------------------------------------
# Example data -> bag
# ----------------------------------------------------------------------------------------------

def _check_example_bag(path: Path, directory: Path, compressed: bool) -> None:
    stamp = make_bag.EXAMPLE_STAMP_NS
    summary = bag_summary(path)
    image_type = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
    suffix = "/compressed" if compressed else ""
    expected = {f"/CAM_{n}/image_raw{suffix}": (image_type, 1) for n in CAMERAS}
    expected.update({f"/CAM_{n}/camera_info": ("sensor_msgs/msg/CameraInfo", 1) for n in CAMERAS})
    expected["/LIDAR_TOP"] = ("sensor_msgs/msg/PointCloud2", 1)
    expected["/tf_static"] = ("tf2_msgs/msg/TFMessage", 1)
    assert summary == expected

    messages = list(read_bag(path))
    assert all(m.log_time_ns == stamp for m in messages)
    by_topic = {m.topic: m.message for m in messages}
    intrinsics = read_tensor_file(directory / "camera_intrinsics.tensor").astype(np.float64)[0]
    for index, name in enumerate(CAMERAS):
        jpeg = (directory / f"{index}-{name}.jpg").read_bytes()
        reference = decode_rgb(jpeg)
        image = by_topic[f"/CAM_{name}/image_raw{suffix}"]
        assert image.header.frame_id == f"cam_{name}" and stamp_ns(image.header) == stamp
        if compressed:
            assert bytes(image.data) == jpeg and image.format == "jpeg"
            pixels = decode_rgb(bytes(image.data))
            assert np.abs(pixels.astype(int) - reference.astype(int)).max() <= 1
        else:
            assert (image.encoding, image.width, image.height, image.step) == (
                "rgb8", reference.shape[1], reference.shape[0], 3 * reference.shape[1])
            pixels = np.frombuffer(bytes(image.data), np.uint8).reshape(reference.shape)
            assert np.array_equal(pixels, reference)
        info = by_topic[f"/CAM_{name}/camera_info"]
        assert info.header.frame_id == f"cam_{name}" and stamp_ns(info.header) == stamp
        assert (info.width, info.height) == (reference.shape[1], reference.shape[0])
        assert np.array_equal(np.reshape(info.k, (3, 3)), intrinsics[index, :3, :3])

    points = read_tensor_file(directory / "points.tensor").astype(np.float32)
    cloud = by_topic["/LIDAR_TOP"]
    assert cloud.header.frame_id == "lidar_top" and stamp_ns(cloud.header) == stamp
    assert cloud.width == 242_180 == points.shape[0]
    assert np.array_equal(cloud_array(cloud, ("x", "y", "z", "intensity", "time_lag")), points)

    camera2lidar = read_tensor_file(directory / "camera2lidar.tensor").astype(np.float64)[0]
    transforms = by_topic["/tf_static"].transforms
    assert [t.child_frame_id for t in transforms] == [f"cam_{n}" for n in CAMERAS]
    for transform, matrix in zip(transforms, camera2lidar):
        assert transform.header.frame_id == "lidar_top"
        assert stamp_ns(transform.header) == stamp
        t, q = transform.transform.translation, transform.transform.rotation
        assert np.abs(np.array([t.x, t.y, t.z]) - matrix[:3, 3]).max() < 1e-9
        assert abs(math.sqrt(q.x ** 2 + q.y ** 2 + q.z ** 2 + q.w ** 2) - 1) < 1e-12
        # The float32 file rotations are orthonormal only to ~5e-8: the rotation of the unit
        # quaternion can be no closer to them than that.
        rotation = matrix[:3, :3]
        orthogonality = np.abs(rotation.T @ rotation - np.eye(3)).max()
        error = np.abs(rotation_xyzw(q.x, q.y, q.z, q.w) - rotation).max()
        assert error <= orthogonality + 1e-9, (error, orthogonality)


@pytest.mark.parametrize("compressed", [False, True])
def test_example_data_bag(example_data_dir: Path, tmp_path: Path, compressed: bool,
                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "example.mcap"
    argv = [str(example_data_dir), "--out", str(out)] + (["--compressed"] if compressed else [])
    assert make_bag.main(argv) == 0
    printed = capsys.readouterr().out
    assert "/LIDAR_TOP" in printed and "messages: 14" in printed and "MB" in printed
    _check_example_bag(out, example_data_dir, compressed)


# ----------------------------------------------------------------------------------------------
# nuScenes data root -> bag
# ----------------------------------------------------------------------------------------------

T0_US = 1_532_402_927_647_951
SCENE_B_US = T0_US + 20_000_000
CAMERA_OFFSETS_US = (-12_000, -7_000, -2_000, 3_000, 8_000, 13_000)
IMAGE_W, IMAGE_H = 64, 48


def random_quaternion(rng: np.random.Generator) -> list[float]:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    return [float(v) for v in q]  # w, x, y, z (w of either sign)


def build_nuscenes_root(root: Path, seed: int = 3) -> dict:
    """A tiny but complete nuScenes v1.0-mini layout; returns the tables."""
    rng = np.random.default_rng(seed)
    version = root / "v1.0-mini"
    version.mkdir(parents=True)
    (root / "maps").mkdir()
    cv2.imwrite(str(root / "maps" / "map.png"), np.zeros((8, 8), np.uint8))

    sensors, calibrated = [], []
    for channel, modality in [("LIDAR_TOP", "lidar")] + [(f"CAM_{n}", "camera") for n in CAMERAS]:
        sensors.append({"token": f"sensor-{channel}", "channel": channel, "modality": modality})
        intrinsic = ([] if modality == "lidar" else
                     [[float(rng.uniform(40, 60)), 0.0, float(rng.uniform(28, 36))],
                      [0.0, float(rng.uniform(40, 60)), float(rng.uniform(20, 28))],
                      [0.0, 0.0, 1.0]])
        calibrated.append({"token": f"cs-{channel}", "sensor_token": f"sensor-{channel}",
                           "translation": [float(v) for v in rng.uniform(-2, 2, 3)],
                           "rotation": random_quaternion(rng), "camera_intrinsic": intrinsic})
    log = {"token": "log-0", "logfile": "n015-test", "vehicle": "n015",
           "date_captured": "2018-07-24", "location": "singapore-onenorth"}
    tables: dict[str, list] = {"category": [{"token": "cat-0", "name": "vehicle.car",
                                             "description": "car", "index": 1}],
                               "attribute": [], "visibility": [], "instance": [],
                               "sample_annotation": [], "sensor": sensors,
                               "calibrated_sensor": calibrated, "log": [log],
                               "map": [{"token": "map-0", "log_tokens": ["log-0"],
                                        "category": "semantic_prior",
                                        "filename": "maps/map.png"}],
                               "ego_pose": [], "scene": [], "sample": [], "sample_data": []}

    def add_scene(name: str, lidar_times: list[int], key_indices: list[int]) -> None:
        samples = []
        for number, index in enumerate(key_indices):
            samples.append({"token": f"{name}-sample-{number}", "timestamp": lidar_times[index],
                            "scene_token": f"scene-{name}", "prev": "", "next": ""})
        for before, after in zip(samples, samples[1:]):
            before["next"], after["prev"] = after["token"], before["token"]
        tables["sample"].extend(samples)
        tables["scene"].append({"token": f"scene-{name}", "log_token": "log-0",
                                "nbr_samples": len(samples), "name": name,
                                "first_sample_token": samples[0]["token"],
                                "last_sample_token": samples[-1]["token"],
                                "description": "generated"})

        def add_chain(channel: str, entries: list[tuple[int, int | None]]) -> None:
            """entries: (timestamp, sample number for a keyframe or None for a sweep)."""
            records = []
            for number, (timestamp, sample) in enumerate(entries):
                token = f"{name}-{channel}-{number}"
                pose = {"token": f"pose-{token}", "timestamp": timestamp,
                        "translation": [float(v) for v in rng.uniform(-500, 1500, 3)],
                        "rotation": random_quaternion(rng)}
                tables["ego_pose"].append(pose)
                key = sample is not None
                is_lidar = channel == "LIDAR_TOP"
                folder = "samples" if key else "sweeps"
                extension = "pcd.bin" if is_lidar else "jpg"
                filename = f"{folder}/{channel}/{name}__{channel}__{timestamp}.{extension}"
                path = root / filename
                path.parent.mkdir(parents=True, exist_ok=True)
                if is_lidar:
                    points = rng.normal(0, 10, size=(int(rng.integers(50, 90)), 5))
                    points[:, 3] = rng.integers(0, 256, len(points))
                    points[:, 4] = rng.integers(0, 32, len(points))
                    points.astype(np.float32).tofile(path)
                else:
                    gradient = np.linspace(0, 255, IMAGE_W, dtype=np.float64)
                    base = np.stack([np.tile(gradient, (IMAGE_H, 1))] * 3, axis=2)
                    noise = rng.integers(0, 60, size=(IMAGE_H, IMAGE_W, 3))
                    bgr = np.clip(base * 0.7 + noise, 0, 255).astype(np.uint8)
                    assert cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, 85])
                sample_token = (samples[sample]["token"] if key else
                                min(samples, key=lambda s: abs(s["timestamp"] - timestamp))["token"])
                records.append({"token": token, "sample_token": sample_token,
                                "ego_pose_token": pose["token"],
                                "calibrated_sensor_token": f"cs-{channel}",
                                "timestamp": timestamp,
                                "fileformat": "pcd" if is_lidar else "jpg",
                                "is_key_frame": key,
                                "height": 0 if is_lidar else IMAGE_H,
                                "width": 0 if is_lidar else IMAGE_W,
                                "filename": filename, "prev": "", "next": ""})
            for before, after in zip(records, records[1:]):
                before["next"], after["prev"] = after["token"], before["token"]
            tables["sample_data"].extend(records)

        add_chain("LIDAR_TOP", [(t, key_indices.index(i) if i in key_indices else None)
                                for i, t in enumerate(lidar_times)])
        for camera_index, camera in enumerate(CAMERAS):
            offset = CAMERA_OFFSETS_US[camera_index]
            add_chain(f"CAM_{camera}", [(s["timestamp"] + offset, n) for n, s in enumerate(samples)])

    # Scene B first in the tables (later in time) to check that scenes are written in time order.
    add_scene("scene-0002", [SCENE_B_US], [0])
    add_scene("scene-0001", [T0_US, T0_US + 50_000, T0_US + 100_000], [0, 2])
    for name, rows in tables.items():
        (version / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return tables


@pytest.fixture(scope="module")
def nuscenes_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    pytest.importorskip("nuscenes.nuscenes", reason="nuscenes-devkit is not installed")
    root = tmp_path_factory.mktemp("nuscenes")
    return root, build_nuscenes_root(root)


def _expected_records(tables: dict, scene: str, max_frames: int | None) -> list[dict]:
    """The sample_data the bag must hold: the scene's lidar records (first max_frames), and
    camera records within 50 ms of their time span."""
    records = [r for r in tables["sample_data"] if r["token"].startswith(scene + "-")]
    lidar = sorted((r for r in records if "LIDAR_TOP" in r["token"]), key=lambda r: r["timestamp"])
    lidar = lidar[:max_frames] if max_frames else lidar
    low, high = lidar[0]["timestamp"] - 50_000, lidar[-1]["timestamp"] + 50_000
    cameras = [r for r in records if "CAM_" in r["token"] and low <= r["timestamp"] <= high]
    return lidar + cameras


def _check_nuscenes_bag(path: Path, root: Path, tables: dict, scenes: list[str],
                        max_frames: int | None, compressed: bool) -> None:
    expected = [r for scene in scenes for r in _expected_records(tables, scene, max_frames)]
    sensors = {s["token"]: s["channel"] for s in tables["sensor"]}
    calibrated = {c["token"]: c for c in tables["calibrated_sensor"]}
    poses = {p["token"]: p for p in tables["ego_pose"]}
    channel_of = {r["token"]: sensors[calibrated[r["calibrated_sensor_token"]]["sensor_token"]]
                  for r in expected}
    messages = list(read_bag(path))

    # Log times are non-decreasing and equal the header stamps; /tf_static opens the bag.
    times = [m.log_time_ns for m in messages]
    assert times == sorted(times)
    assert messages[0].topic == "/tf_static"

    lidar = [r for r in expected if channel_of[r["token"]] == "LIDAR_TOP"]
    clouds = [m for m in messages if m.topic == "/LIDAR_TOP"]
    assert len(clouds) == len(lidar)
    for message, record in zip(clouds, sorted(lidar, key=lambda r: r["timestamp"])):
        cloud = message.message
        assert message.log_time_ns == stamp_ns(cloud.header) == record["timestamp"] * 1000
        assert cloud.header.frame_id == "lidar_top"
        points = np.fromfile(root / record["filename"], dtype=np.float32).reshape(-1, 5)
        assert np.array_equal(cloud_array(cloud, ("x", "y", "z", "intensity")), points[:, :4])

    suffix = "/compressed" if compressed else ""
    for camera in CAMERAS:
        records = sorted((r for r in expected if channel_of[r["token"]] == f"CAM_{camera}"),
                         key=lambda r: r["timestamp"])
        images = [m for m in messages if m.topic == f"/CAM_{camera}/image_raw{suffix}"]
        infos = [m for m in messages if m.topic == f"/CAM_{camera}/camera_info"]
        assert len(images) == len(infos) == len(records)
        k = np.array(calibrated[f"cs-CAM_{camera}"]["camera_intrinsic"])
        for image, info, record in zip(images, infos, records):
            stamp = record["timestamp"] * 1000
            assert image.log_time_ns == info.log_time_ns == stamp
            assert stamp_ns(image.message.header) == stamp_ns(info.message.header) == stamp
            assert image.message.header.frame_id == info.message.header.frame_id == f"cam_{camera}"
            jpeg = (root / record["filename"]).read_bytes()
            if compressed:
                assert bytes(image.message.data) == jpeg
            else:
                pixels = np.frombuffer(bytes(image.message.data), np.uint8)
                assert np.array_equal(pixels.reshape(IMAGE_H, IMAGE_W, 3), decode_rgb(jpeg))
            assert (info.message.width, info.message.height) == (IMAGE_W, IMAGE_H)
            assert np.array_equal(np.reshape(info.message.k, (3, 3)), k)

    # /tf: odom -> base_link at every written sample_data's ego pose.
    tf = [m for m in messages if m.topic == "/tf"]
    expected_poses = sorted((poses[r["ego_pose_token"]] for r in expected),
                            key=lambda p: p["timestamp"])
    assert len(tf) == len(expected_poses)
    got = sorted(((m.log_time_ns, m.message.transforms) for m in tf), key=lambda x: x[0])
    remaining = list(expected_poses)
    for log_time, transforms in got:
        assert len(transforms) == 1
        transform = transforms[0]
        assert (transform.header.frame_id, transform.child_frame_id) == ("odom", "base_link")
        assert stamp_ns(transform.header) == log_time
        t = transform.transform.translation
        match = [p for p in remaining if p["timestamp"] * 1000 == log_time
                 and np.abs(np.array([t.x, t.y, t.z]) - p["translation"]).max() < 1e-9]
        assert len(match) == 1
        assert_quaternion_equal(transform.transform.rotation, match[0]["rotation"])
        remaining.remove(match[0])
    assert not remaining

    # /tf_static: one per scene, base_link -> each sensor as calibrated.
    statics = [m for m in messages if m.topic == "/tf_static"]
    assert len(statics) == len(scenes)
    for message in statics:
        children = {t.child_frame_id: t for t in message.message.transforms}
        assert set(children) == {"lidar_top"} | {f"cam_{c}" for c in CAMERAS}
        for child, transform in children.items():
            channel = "LIDAR_TOP" if child == "lidar_top" else "CAM_" + child[len("cam_"):]
            record = calibrated[f"cs-{channel}"]
            assert transform.header.frame_id == "base_link"
            t = transform.transform.translation
            assert np.abs(np.array([t.x, t.y, t.z]) - record["translation"]).max() < 1e-9
            assert_quaternion_equal(transform.transform.rotation, record["rotation"])
            # Independent check of the direction: the matrix maps sensor points into base_link.
            q = transform.transform.rotation
            w, x, y, z = np.asarray(record["rotation"]) / np.linalg.norm(record["rotation"])
            assert np.abs(rotation_xyzw(q.x, q.y, q.z, q.w) - rotation_xyzw(x, y, z, w)).max() < 1e-9


def test_nuscenes_all_scenes(nuscenes_root, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    root, tables = nuscenes_root
    out = tmp_path / "all.mcap"
    assert make_bag.main([str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "scene scene-0001: 3 lidar sweeps, 12 camera images" in printed
    assert printed.index("scene-0001") < printed.index("scene-0002")  # time order
    _check_nuscenes_bag(out, root, tables, ["scene-0001", "scene-0002"], None, False)
    summary = bag_summary(out)
    assert summary["/LIDAR_TOP"] == ("sensor_msgs/msg/PointCloud2", 4)
    assert summary["/CAM_FRONT/image_raw"] == ("sensor_msgs/msg/Image", 3)
    assert summary["/tf"] == ("tf2_msgs/msg/TFMessage", 4 + 6 * 3)
    assert summary["/tf_static"] == ("tf2_msgs/msg/TFMessage", 2)


def test_nuscenes_scene_max_frames_compressed(nuscenes_root, tmp_path: Path) -> None:
    root, tables = nuscenes_root
    out = tmp_path / "one.mcap"
    assert make_bag.main([str(root), "--out", str(out), "--scene", "scene-0001",
                          "--max-frames", "2", "--compressed"]) == 0
    _check_nuscenes_bag(out, root, tables, ["scene-0001"], 2, True)
    summary = bag_summary(out)
    assert summary["/LIDAR_TOP"][1] == 2
    # The second keyframe's cameras at +3..+13 ms lie beyond 50 ms after the 2nd sweep.
    assert summary["/CAM_FRONT/image_raw/compressed"] == ("sensor_msgs/msg/CompressedImage", 2)
    assert summary["/CAM_BACK/image_raw/compressed"] == ("sensor_msgs/msg/CompressedImage", 1)
    assert not any(topic.endswith("/image_raw") for topic in summary)


def test_cli_errors(nuscenes_root, example_data_dir: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = nuscenes_root
    out = str(tmp_path / "x.mcap")
    assert make_bag.main([str(tmp_path / "missing"), "--out", out]) == 1
    assert make_bag.main([str(tmp_path), "--out", out]) == 1
    assert make_bag.main([str(root), "--out", out, "--scene", "scene-9999"]) == 1
    assert make_bag.main([str(root), "--out", out, "--max-frames", "0"]) == 1
    assert make_bag.main([str(example_data_dir), "--out", out, "--scene", "scene-0001"]) == 1
    errors = capsys.readouterr().err
    assert "neither a CUDA-BEVFusion example-data folder" in errors
    assert "scene-9999" in errors and "scene-0001" in errors
    assert "max_frames must be >= 1" in errors
