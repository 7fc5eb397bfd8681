"""bevfusion_ros.ros.pointcloud2 against clouds packed independently with struct.

Each test runs on the local implementation (``_read_points`` ...) and on the public functions
(which are sensor_msgs_py's where a ROS installation provides it), so both must agree with the
struct-packed references.
"""
from __future__ import annotations

import array
import math
import struct
import sys

import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

from bevfusion_ros.ros import pointcloud2 as pc2

F32, U16, U8, F64, I32 = PointField.FLOAT32, PointField.UINT16, PointField.UINT8, PointField.FLOAT64, PointField.INT32
STRUCT_CODE = {PointField.INT8: "b", PointField.UINT8: "B", PointField.INT16: "h", PointField.UINT16: "H",
               PointField.INT32: "i", PointField.UINT32: "I", PointField.FLOAT32: "f", PointField.FLOAT64: "d"}

READERS = pytest.mark.parametrize("read", [pc2._read_points, pc2.read_points], ids=["local", "public"])
CREATORS = pytest.mark.parametrize("create", [pc2._create_cloud, pc2.create_cloud], ids=["local", "public"])


def field(name: str, offset: int, datatype: int, count: int = 1) -> PointField:
    """A PointField."""
    return PointField(name=name, offset=offset, datatype=datatype, count=count)


def header() -> Header:
    """A header with a non-trivial stamp."""
    out = Header(frame_id="lidar")
    out.stamp.sec, out.stamp.nanosec = 12, 345
    return out


def pack_points(fields: list[PointField], points: list[dict[str, object]], point_step: int,
                bigendian: bool = False) -> bytes:
    """Reference encoder: each point's values written at its fields' offsets with struct."""
    order = ">" if bigendian else "<"
    out = bytearray(point_step * len(points))
    for index, values in enumerate(points):
        for f in fields:
            code = order + STRUCT_CODE[f.datatype] * f.count
            value = values[f.name]
            args = value if f.count > 1 else (value,)
            struct.pack_into(code, out, index * point_step + f.offset, *args)
    return bytes(out)


def make_cloud(fields: list[PointField], data: bytes, width: int, point_step: int, height: int = 1,
               row_step: int | None = None, bigendian: bool = False, dense: bool = False) -> PointCloud2:
    """A PointCloud2 around reference bytes."""
    return PointCloud2(
        header=header(), height=height, width=width, fields=fields, is_bigendian=bigendian,
        point_step=point_step, row_step=row_step if row_step is not None else width * point_step,
        data=array.array("B", data), is_dense=dense,
    )


# Fields listed out of offset order, of mixed types, with padding between and after them.
SHUFFLED_FIELDS = [
    field("intensity", 16, F32), field("x", 0, F32), field("ring", 20, U16),
    field("z", 8, F32), field("time", 24, F64), field("y", 4, F32),
]
SHUFFLED_STEP = 40  # 32 bytes of fields + 8 bytes of padding
SHUFFLED_POINTS = [
    {"x": 1.5 * i - 7, "y": -0.25 * i, "z": 0.125 * (i % 5), "intensity": float(i * 3),
     "ring": (i * 7) % 65536, "time": 1e-6 * i + 0.1}
    for i in range(257)
]


@READERS
@pytest.mark.parametrize("bigendian", [False, True], ids=["little", "big"])
def test_read_points_shuffled_padded_any_byte_order(read, bigendian):
    data = pack_points(SHUFFLED_FIELDS, SHUFFLED_POINTS, SHUFFLED_STEP, bigendian=bigendian)
    cloud = make_cloud(SHUFFLED_FIELDS, data, len(SHUFFLED_POINTS), SHUFFLED_STEP, bigendian=bigendian)

    points = read(cloud)

    assert points.dtype.names == ("intensity", "x", "ring", "z", "time", "y")  # the fields' order
    assert points.shape == (len(SHUFFLED_POINTS),)
    for name in points.dtype.names:
        expected = [p[name] for p in SHUFFLED_POINTS]
        reference_type = np.float64 if name == "time" else (np.uint16 if name == "ring" else np.float32)
        np.testing.assert_array_equal(points[name], np.array(expected, dtype=reference_type))
        assert points.dtype[name].isnative


@READERS
def test_read_points_field_subset_in_requested_order(read):
    data = pack_points(SHUFFLED_FIELDS, SHUFFLED_POINTS, SHUFFLED_STEP)
    cloud = make_cloud(SHUFFLED_FIELDS, data, len(SHUFFLED_POINTS), SHUFFLED_STEP)

    points = read(cloud, field_names=["z", "x"])

    assert points.dtype.names == ("z", "x")
    np.testing.assert_array_equal(points["x"], np.float32([p["x"] for p in SHUFFLED_POINTS]))
    np.testing.assert_array_equal(points["z"], np.float32([p["z"] for p in SHUFFLED_POINTS]))


NAN_FIELDS = [field("x", 0, F32), field("y", 4, F32), field("z", 8, F32), field("label", 12, I32)]
NAN_POINTS = [
    {"x": 1.0, "y": 2.0, "z": 3.0, "label": 1},
    {"x": math.nan, "y": 2.0, "z": 3.0, "label": 2},
    {"x": 4.0, "y": 5.0, "z": 6.0, "label": 3},
    {"x": 7.0, "y": 8.0, "z": math.nan, "label": 4},
    {"x": 9.0, "y": math.nan, "z": math.nan, "label": 5},
    {"x": -1.0, "y": -2.0, "z": -3.0, "label": 6},
]


@READERS
def test_read_points_skip_nans(read):
    cloud = make_cloud(NAN_FIELDS, pack_points(NAN_FIELDS, NAN_POINTS, 16), len(NAN_POINTS), 16)

    kept = read(cloud, skip_nans=True)
    all_points = read(cloud, skip_nans=False)
    xy_kept = read(cloud, field_names=["x", "label"], skip_nans=True)

    assert kept["label"].tolist() == [1, 3, 6]
    np.testing.assert_array_equal(kept["z"], np.float32([3.0, 6.0, -3.0]))
    assert all_points["label"].tolist() == [1, 2, 3, 4, 5, 6]
    assert np.isnan(all_points["x"][1]) and np.isnan(all_points["z"][3])
    assert xy_kept["label"].tolist() == [1, 3, 4, 5, 6]  # NaNs only in unselected fields are kept


@READERS
def test_read_points_dense_cloud_is_not_filtered(read):
    """Like sensor_msgs_py: skip_nans trusts is_dense=True (the cloud claims to hold no NaN)."""
    cloud = make_cloud(NAN_FIELDS, pack_points(NAN_FIELDS, NAN_POINTS, 16), len(NAN_POINTS), 16, dense=True)

    assert len(read(cloud, skip_nans=True)) == len(NAN_POINTS)


@READERS
def test_read_points_field_count_and_organised_cloud(read):
    fields = [field("xyz", 0, F32, count=3), field("rgb", 12, U8, count=3)]
    points = [{"xyz": (i + 0.5, -i * 2.0, 0.25), "rgb": (i, 255 - i, (3 * i) % 256)} for i in range(6)]
    cloud = make_cloud(fields, pack_points(fields, points, 16), width=3, height=2, point_step=16)

    out = read(cloud)

    assert out.dtype.names == ("xyz_0", "xyz_1", "xyz_2", "rgb_0", "rgb_1", "rgb_2")
    assert out.shape == (6,)
    np.testing.assert_array_equal(out["xyz_1"], np.float32([-2.0 * i for i in range(6)]))
    np.testing.assert_array_equal(out["rgb_2"], np.uint8([(3 * i) % 256 for i in range(6)]))


def test_read_points_rows_padded_beyond_width():
    """row_step > width * point_step: the padding at the end of each row is skipped."""
    fields = [field("x", 0, F32), field("y", 4, F32)]
    width, height, step, row_step = 5, 3, 8, 48  # 8 bytes of padding after each row
    rows = b""
    expected = []
    for r in range(height):
        row_points = [{"x": r * 10.0 + c, "y": -(r * 10.0 + c)} for c in range(width)]
        expected += row_points
        rows += pack_points(fields, row_points, step) + b"\xee" * (row_step - width * step)
    cloud = make_cloud(fields, rows, width=width, height=height, point_step=step, row_step=row_step)

    out = pc2._read_points(cloud)

    np.testing.assert_array_equal(out["x"], np.float32([p["x"] for p in expected]))
    np.testing.assert_array_equal(out["y"], np.float32([p["y"] for p in expected]))


def test_read_points_numpy_gives_plain_matrix():
    fields = [field("x", 0, F32), field("y", 4, F32), field("z", 8, F32)]
    points = [{"x": float(i), "y": 2.0 * i, "z": -3.0 * i} for i in range(10)]
    cloud = make_cloud(fields, pack_points(fields, points, 16), 10, 16)

    matrix = pc2._read_points_numpy(cloud)

    assert matrix.shape == (10, 3) and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix, np.float32([[p["x"], p["y"], p["z"]] for p in points]))
    with pytest.raises(ValueError, match="one type"):
        pc2._read_points_numpy(make_cloud(NAN_FIELDS, pack_points(NAN_FIELDS, NAN_POINTS, 16), 6, 16))


XYZIT = [field(name, 4 * i, F32) for i, name in enumerate(("x", "y", "z", "intensity", "time"))]


def xyzit_values(n: int) -> list[tuple[float, ...]]:
    """n points of x, y, z, intensity, time (float32-exact)."""
    return [(i * 0.5 - 3, i * -0.25, 1.0 + i / 64, float(i % 200), i * 2.0**-10) for i in range(n)]


@CREATORS
@pytest.mark.parametrize("form", ["tuples", "matrix", "structured"])
def test_create_cloud_layout_and_bytes(create, form):
    values = xyzit_values(1000)
    if form == "tuples":
        points = values
    elif form == "matrix":
        points = np.array(values, dtype=np.float32)
    else:
        points = np.array(values, dtype=pc2.dtype_from_fields(XYZIT))

    cloud = create(header(), XYZIT, points)

    assert (cloud.height, cloud.width, cloud.point_step, cloud.row_step) == (1, 1000, 20, 20000)
    assert cloud.is_bigendian is (sys.byteorder == "big") and cloud.is_dense is False
    assert [(f.name, f.offset, f.datatype, f.count) for f in cloud.fields] == \
        [(f.name, f.offset, f.datatype, f.count) for f in XYZIT]
    assert (cloud.header.frame_id, cloud.header.stamp.sec, cloud.header.stamp.nanosec) == ("lidar", 12, 345)
    assert isinstance(cloud.data, array.array) and cloud.data.typecode == "B"
    assert cloud.data.tobytes() == b"".join(struct.pack("=5f", *v) for v in values)


def test_create_cloud_structured_input_matched_by_name():
    """A structured array in another field order and type is converted field by field, by name."""
    source = np.zeros(4, dtype=[("time", np.float64), ("z", np.float64), ("x", np.float64),
                                ("intensity", np.uint8), ("y", np.float64)])
    values = xyzit_values(4)
    for name, column in zip(("x", "y", "z", "intensity", "time"), zip(*values)):
        source[name] = column

    cloud = pc2._create_cloud(header(), XYZIT, source)

    assert cloud.data.tobytes() == b"".join(struct.pack("=5f", *v) for v in values)


def test_create_cloud_keeps_field_offsets_with_gaps():
    fields = [field("x", 0, F32), field("ring", 8, U16)]  # 4-byte gap after x
    cloud = pc2._create_cloud(header(), fields, [(1.25, 7), (-2.5, 65535)])

    assert cloud.point_step == 10
    reference = pack_points(fields, [{"x": 1.25, "ring": 7}, {"x": -2.5, "ring": 65535}], 10)
    assert cloud.data.tobytes() == reference


def test_create_cloud_organised_from_2d_input():
    grid = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    structured = np.zeros((2, 3), dtype=pc2.dtype_from_fields(pc2.xyz32_fields()))
    for k, name in enumerate("xyz"):
        structured[name] = grid[:, :, k]

    cloud = pc2._create_cloud(header(), pc2.xyz32_fields(), structured)

    assert (cloud.height, cloud.width, cloud.row_step) == (2, 3, 36)
    assert cloud.data.tobytes() == struct.pack("=18f", *grid.ravel().tolist())


@pytest.mark.parametrize("create", [pc2._create_cloud_xyz32, pc2.create_cloud_xyz32], ids=["local", "public"])
def test_create_cloud_xyz32(create):
    points = [(0.5, 1.5, -2.0), (3.0, -4.25, 5.125)]

    cloud = create(header(), points)

    assert [(f.name, f.offset, f.datatype, f.count) for f in cloud.fields] == \
        [("x", 0, F32, 1), ("y", 4, F32, 1), ("z", 8, F32, 1)]
    assert cloud.point_step == 12
    assert cloud.data.tobytes() == struct.pack("=6f", 0.5, 1.5, -2.0, 3.0, -4.25, 5.125)


def test_round_trip_through_cdr_serialisation():
    """create -> real CDR bytes (rclpy) -> message -> read gives back the values exactly."""
    values = xyzit_values(2048)
    cloud = pc2.create_cloud(header(), XYZIT, values)

    received = deserialize_message(serialize_message(cloud), PointCloud2)
    points = pc2.read_points(received)

    np.testing.assert_array_equal(
        np.stack([points[n] for n in ("x", "y", "z", "intensity", "time")], axis=1),
        np.array(values, dtype=np.float32),
    )


def test_unknown_datatype_and_missing_fields_are_errors():
    with pytest.raises(ValueError, match="unknown datatype"):
        pc2.dtype_from_fields([field("x", 0, 42)])
    cloud = make_cloud(NAN_FIELDS, pack_points(NAN_FIELDS, NAN_POINTS, 16), 6, 16)
    with pytest.raises(ValueError, match="not in cloud"):
        pc2._read_points(cloud, field_names=["x", "intensity"])
    with pytest.raises(ValueError, match="lack fields"):
        pc2._create_cloud(header(), XYZIT, np.zeros(3, dtype=[("x", np.float32)]))


def test_matches_sensor_msgs_py_when_available():
    """Where ROS provides sensor_msgs_py, the local implementation must give the same arrays."""
    upstream = pytest.importorskip("sensor_msgs_py.point_cloud2", reason="sensor_msgs_py not installed")
    data = pack_points(SHUFFLED_FIELDS, SHUFFLED_POINTS, SHUFFLED_STEP)
    cloud = make_cloud(SHUFFLED_FIELDS, data, len(SHUFFLED_POINTS), SHUFFLED_STEP)
    ours, theirs = pc2._read_points(cloud), upstream.read_points(cloud)
    assert ours.dtype.names == theirs.dtype.names
    for name in ours.dtype.names:
        np.testing.assert_array_equal(ours[name], theirs[name])
    values = xyzit_values(100)
    assert pc2._create_cloud(header(), XYZIT, values).data.tobytes() == \
        bytes(upstream.create_cloud(header(), XYZIT, values).data)


@CREATORS
def test_empty_cloud_round_trip(create):
    cloud = create(header(), pc2.xyz32_fields(), [])

    assert (cloud.height, cloud.width, len(cloud.data)) == (1, 0, 0)
    points = pc2.read_points(deserialize_message(serialize_message(cloud), PointCloud2), skip_nans=True)
    assert points.shape == (0,) and points.dtype.names == ("x", "y", "z")
