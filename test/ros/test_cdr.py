"""bevfusion_ros.ros.cdr against rclpy's own serializer: every field of messages serialized by
rclpy reads back equal, the data as a view of the serialized bytes."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from rclpy.serialization import serialize_message
from sensor_msgs.msg import CompressedImage, Image, PointCloud2, PointField

from bevfusion_ros.ros import cdr
from bevfusion_ros.ros.convert import image_to_rgb, ns_to_stamp
from bevfusion_ros.ros.frame_messages import header

RNG = np.random.default_rng(7)


def header_equal(read, expected) -> bool:
    return (read.stamp.sec, read.stamp.nanosec, read.frame_id) == (
        expected.stamp.sec, expected.stamp.nanosec, expected.frame_id)


@pytest.mark.parametrize("frame_id", ["", "c", "cam", "camera_front_optical_frame_xyz"])   # every alignment
@pytest.mark.parametrize("encoding,channels,padding", [("rgb8", 3, 0), ("bgra8", 4, 3), ("mono8", 1, 1)])
def test_image_reads_back_every_field(frame_id, encoding, channels, padding):
    height, width = 5, 7
    step = width * channels + padding
    data = RNG.integers(0, 256, height * step, dtype=np.uint8)
    msg = Image(header=header(1_700_000_000_123_456_789, frame_id), height=height, width=width,
                encoding=encoding, is_bigendian=0, step=step, data=data.tobytes())
    raw = serialize_message(msg)
    read = cdr.read_image(raw)
    assert header_equal(read.header, msg.header)
    assert (read.height, read.width, read.encoding, read.is_bigendian, read.step) == (height, width, encoding, 0, step)
    np.testing.assert_array_equal(read.data, data)
    assert not read.data.flags.writeable and not read.data.flags.owndata      # a view, not a copy
    np.testing.assert_array_equal(image_to_rgb(read), image_to_rgb(msg))


def test_full_size_rgb8_image_is_not_copied():
    rgb = RNG.integers(0, 256, (900, 1600, 3), dtype=np.uint8)
    msg = Image(header=header(5, "cam"), height=900, width=1600, encoding="rgb8", step=4800, data=rgb.tobytes())
    raw = serialize_message(msg)
    pixels = image_to_rgb(cdr.read_image(raw))
    np.testing.assert_array_equal(pixels, rgb)
    assert np.shares_memory(pixels, np.frombuffer(raw, np.uint8))


@pytest.mark.parametrize("fmt", ["", "jpeg", "png; rgb8"])
def test_compressed_image_reads_back(fmt):
    data = RNG.integers(0, 256, 1001, dtype=np.uint8).tobytes()
    msg = CompressedImage(header=header(42, "cam_f"), format=fmt, data=data)
    read = cdr.read_compressed_image(serialize_message(msg))
    assert header_equal(read.header, msg.header) and read.format == fmt and read.data.tobytes() == data


@pytest.mark.parametrize("frame_id", ["", "lidar_top", "l"])
def test_point_cloud_reads_back_every_field(frame_id):
    fields = [PointField(name="x", offset=0, datatype=PointField.FLOAT32, count=1),
              PointField(name="ring", offset=4, datatype=PointField.UINT16, count=1),
              PointField(name="intensity_and_more", offset=8, datatype=PointField.FLOAT64, count=2)]
    data = RNG.integers(0, 256, 3 * 2 * 24, dtype=np.uint8).tobytes()
    msg = PointCloud2(header=header(9_000_000_001, frame_id), height=2, width=3, fields=fields,
                      is_bigendian=True, point_step=24, row_step=72, data=data, is_dense=True)
    read = cdr.read_point_cloud(serialize_message(msg))
    assert header_equal(read.header, msg.header)
    assert (read.height, read.width, read.is_bigendian, read.point_step, read.row_step, read.is_dense) == (
        2, 3, True, 24, 72, True)
    assert [(f.name, f.offset, f.datatype, f.count) for f in read.fields] == [
        (f.name, f.offset, f.datatype, f.count) for f in fields]
    assert read.data.tobytes() == data


def test_big_endian_encapsulation_is_read():
    """A hand-written big-endian CompressedImage (stamp 3 s 4 ns, frame 'ab', format 'jpeg')."""
    body = struct.pack(">iI", 3, 4) + struct.pack(">I", 3) + b"ab\x00" + b"\x00"      # pad to 4
    body += struct.pack(">I", 5) + b"jpeg\x00" + b"\x00" * 3 + struct.pack(">I", 2) + b"\x01\x02"
    read = cdr.read_compressed_image(b"\x00\x00\x00\x00" + body)
    assert (read.header.stamp.sec, read.header.stamp.nanosec, read.header.frame_id) == (3, 4, "ab")
    assert read.format == "jpeg" and read.data.tolist() == [1, 2]


def test_truncated_or_foreign_bytes_are_refused():
    raw = serialize_message(Image(header=header(1, "cam"), height=2, width=2, encoding="rgb8", step=6,
                                  data=bytes(12)))
    for cut in (0, 3, 10, len(raw) - 1):
        with pytest.raises(cdr.CdrError):
            cdr.read_image(raw[:cut])
    with pytest.raises(cdr.CdrError, match="encapsulation"):
        cdr.read_image(b"\x00\x03\x00\x00" + raw[4:])          # PL_CDR_LE: not plain CDR
    huge_count = bytearray(serialize_message(PointCloud2(header=header(1, "l"))))
    offset = 4 + 8 + 4 + 4 + 8                                 # stamp, frame_id "l" + pad, height, width
    huge_count[offset:offset + 4] = struct.pack("<I", 10**9)
    with pytest.raises(cdr.CdrError):
        cdr.read_point_cloud(bytes(huge_count))


def test_stamps_survive_the_round_trip():
    for stamp_ns in (0, 1, 1_999_999_999, 2**31 * 10**9 - 1):
        msg = CompressedImage(header=header(stamp_ns, "x"))
        read = cdr.read_compressed_image(serialize_message(msg))
        assert read.header.stamp == ns_to_stamp(stamp_ns)
