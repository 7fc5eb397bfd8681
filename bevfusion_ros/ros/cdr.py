"""The node's big input messages read straight from their serialized (CDR) form, without copying
their pixel or point data.

rclpy turns a 1600x900 ``sensor_msgs/Image`` into a Python message by copying its 4.3 MB of
``data`` into an ``array.array`` (about 2-3 ms each, six per frame, under the GIL). With
``create_subscription(..., raw=True)`` the callback gets the serialized bytes instead (one
``memcpy``); :func:`read_image`, :func:`read_compressed_image` and :func:`read_point_cloud` parse
them into :class:`RawImage`, :class:`RawCompressedImage` and :class:`RawPointCloud2`, which carry
the same field names as the messages (so :mod:`bevfusion_ros.ros.convert` and
:mod:`bevfusion_ros.ros.cloud_input` read both alike) with ``data`` a read-only uint8 NumPy view
into those bytes.

The format is OMG CDR as ROS 2 publishes it (version 1, plain): a 4-byte encapsulation header
(``00 01``: little-endian, ``00 00``: big-endian), then the fields in declaration order, each
primitive aligned to its size counted from the end of that header; strings are a uint32 length
(including the terminating NUL) and the bytes; sequences a uint32 count and the elements.
Anything else (other encapsulations, a truncated buffer, a count beyond the end) raises
:class:`CdrError`.

:class:`CdrWriter` writes the same format (little-endian), for outputs published as bytes
(``Publisher.publish(bytes)``) instead of being built field by field as Python messages.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import PointField
from std_msgs.msg import Header

ENCAPSULATION_HEADER = 4
_BYTE_ORDERS = {b"\x00\x00": ">", b"\x00\x01": "<"}     # CDR_BE, CDR_LE


class CdrError(ValueError):
    """Serialized bytes that are not a plain-CDR message of the expected type."""


class CdrReader:
    """Sequential reader over one serialized message (``buffer``: bytes or any buffer)."""

    def __init__(self, buffer: Any) -> None:
        self.buffer = memoryview(buffer).cast("B")
        order = bytes(self.buffer[:2])
        if len(self.buffer) < ENCAPSULATION_HEADER or order not in _BYTE_ORDERS:
            raise CdrError(f"not a plain CDR message (encapsulation {order.hex() or 'missing'}, "
                           f"{len(self.buffer)} bytes)")
        self.order = _BYTE_ORDERS[order]
        self.position = ENCAPSULATION_HEADER

    def _take(self, size: int, align: int) -> int:
        """Align to ``align``, reserve ``size`` bytes; returns where they start."""
        self.position += -(self.position - ENCAPSULATION_HEADER) % align
        start, self.position = self.position, self.position + size
        if self.position > len(self.buffer):
            raise CdrError(f"message truncated: needs {self.position} bytes, has {len(self.buffer)}")
        return start

    def _unpack(self, code: str, size: int) -> Any:
        return struct.unpack_from(self.order + code, self.buffer, self._take(size, size))[0]

    def uint8(self) -> int:
        return self.buffer[self._take(1, 1)]

    def int32(self) -> int:
        return self._unpack("i", 4)

    def uint32(self) -> int:
        return self._unpack("I", 4)

    def string(self) -> str:
        length = self.uint32()
        if length == 0:                     # some writers omit the NUL of an empty string
            return ""
        start = self._take(length, 1)
        return bytes(self.buffer[start:start + length - 1]).decode("utf-8", errors="replace")

    def uint8_sequence(self) -> np.ndarray:
        """A read-only uint8 view of the sequence's bytes (no copy)."""
        count = self.uint32()
        start = self._take(count, 1)
        view = np.frombuffer(self.buffer, dtype=np.uint8, count=count, offset=start)
        view.flags.writeable = False
        return view

    def header(self) -> Header:
        sec, nanosec = self.int32(), self.uint32()
        return Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id=self.string())


_U32 = struct.Struct("<I")
_PADDING = tuple(bytes(n) for n in range(8))


def cdr_string(text: str) -> bytes:
    """A CDR string as it is written: uint32 length (NUL included), the UTF-8 bytes, the NUL."""
    encoded = text.encode("utf-8")
    return _U32.pack(len(encoded) + 1) + encoded + b"\0"


class CdrWriter:
    """Sequential little-endian plain-CDR writer (what :class:`CdrReader` reads). Each ``put``
    aligns to ``align`` first (counted from the end of the encapsulation header), as the field's
    first primitive requires; :meth:`getvalue` is the serialized message."""

    def __init__(self) -> None:
        self.buffer = bytearray(b"\x00\x01\x00\x00")          # CDR_LE, no options

    def put(self, data: bytes, align: int) -> None:
        buffer = self.buffer
        buffer += _PADDING[(ENCAPSULATION_HEADER - len(buffer)) % align]
        buffer += data

    def uint32(self, value: int) -> None:
        self.put(_U32.pack(value), 4)

    def string(self, text: str) -> None:
        self.put(cdr_string(text), 4)

    def getvalue(self) -> bytes:
        return bytes(self.buffer)


def header_bytes(header: Header) -> bytes:
    """``std_msgs/Header`` as CDR (starts 4-aligned: stamp sec int32, nanosec uint32, frame_id)."""
    return struct.pack("<iI", header.stamp.sec, header.stamp.nanosec) + cdr_string(header.frame_id)


@dataclass(eq=False)
class RawImage:
    """``sensor_msgs/Image`` with ``data`` a uint8 view of the serialized bytes."""

    header: Header
    height: int
    width: int
    encoding: str
    is_bigendian: int
    step: int
    data: np.ndarray


@dataclass(eq=False)
class RawCompressedImage:
    """``sensor_msgs/CompressedImage`` with ``data`` a uint8 view of the serialized bytes."""

    header: Header
    format: str
    data: np.ndarray


@dataclass(eq=False)
class RawPointCloud2:
    """``sensor_msgs/PointCloud2`` with ``data`` a uint8 view of the serialized bytes."""

    header: Header
    height: int
    width: int
    fields: list[PointField]
    is_bigendian: bool
    point_step: int
    row_step: int
    data: np.ndarray
    is_dense: bool


def read_image(buffer: Any) -> RawImage:
    reader = CdrReader(buffer)
    return RawImage(header=reader.header(), height=reader.uint32(), width=reader.uint32(),
                    encoding=reader.string(), is_bigendian=reader.uint8(), step=reader.uint32(),
                    data=reader.uint8_sequence())


def read_compressed_image(buffer: Any) -> RawCompressedImage:
    reader = CdrReader(buffer)
    return RawCompressedImage(header=reader.header(), format=reader.string(), data=reader.uint8_sequence())


def _point_field(reader: CdrReader) -> PointField:
    return PointField(name=reader.string(), offset=reader.uint32(), datatype=reader.uint8(), count=reader.uint32())


def read_point_cloud(buffer: Any) -> RawPointCloud2:
    reader = CdrReader(buffer)
    header, height, width = reader.header(), reader.uint32(), reader.uint32()
    count = reader.uint32()
    if count > len(reader.buffer):
        raise CdrError(f"PointCloud2 declares {count} fields in a {len(reader.buffer)}-byte message")
    fields = [_point_field(reader) for _ in range(count)]
    return RawPointCloud2(header=header, height=height, width=width, fields=fields,
                          is_bigendian=bool(reader.uint8()), point_step=reader.uint32(), row_step=reader.uint32(),
                          data=reader.uint8_sequence(), is_dense=bool(reader.uint8()))
