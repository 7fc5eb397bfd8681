"""Known messages shared by the ROS test publisher (a second process) and the tests.

Values are plain literals; the tests compare what they receive against these literals and against
bytes packed independently with ``struct`` (``cloud_reference_bytes``), never against the code
under test.
"""
from __future__ import annotations

import struct

STAMP_SEC = 1_700_000_000
STAMP_NANOSEC = 123_456_789
FRAME_ID = "lidar_top"

#: (class_id, score, center xyz, orientation xyzw, size xyz, covariance seed, id)
DETECTIONS = (
    ("car", 0.875, (10.5, -2.25, 0.75), (0.0, 0.0, 0.6, 0.8), (4.5, 1.875, 1.5), 0.5, "7"),
    ("pedestrian", 0.3125, (-3.0, 6.125, 1.0), (0.0, 0.0, -0.28, 0.96), (0.75, 0.625, 1.75), -0.25, "11"),
)

CLOUD_FIELDS = ("x", "y", "z", "intensity", "time")
CLOUD_POINTS = 3000


def covariance(seed: float) -> list[float]:
    """36 distinct float64 values for PoseWithCovariance.covariance."""
    return [seed * (i + 1) for i in range(36)]


def cloud_point(i: int) -> tuple[float, float, float, float, float]:
    """Point ``i`` of the test cloud (x, y, z, intensity, time); all exactly representable in float32."""
    return (i * 0.25 - 100.0, (i % 97) * 0.5, -1.5 + (i % 7) * 0.125, float(i % 256), i * 2.0**-12)


def cloud_reference_bytes() -> bytes:
    """The cloud's data as little-endian float32 records of 20 bytes, packed with struct."""
    return b"".join(struct.pack("<5f", *cloud_point(i)) for i in range(CLOUD_POINTS))
