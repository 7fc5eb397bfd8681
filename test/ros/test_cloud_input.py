"""cloud_input.cloud_points: layout checks, byte-order correction, NaN rows, against values
written byte by byte with struct (an independent encoder)."""
from __future__ import annotations

import array
import struct

import numpy as np
import pytest
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

from bevfusion_ros.pipeline import InputError
from bevfusion_ros.ros.cloud_input import CloudError, check_layout, cloud_points, plausible_fraction

FIELDS = ("x", "y", "z", "intensity")


def packed_cloud(points: np.ndarray, byte_order: str = "<", is_bigendian: bool = False, point_step: int = 16,
                 names: tuple[str, ...] = FIELDS) -> PointCloud2:
    """float32 fields at 0, 4, 8, ... packed with struct in ``byte_order``, rows ``point_step`` long."""
    data = bytearray()
    for row in points:
        record = struct.pack(f"{byte_order}{len(names)}f", *row[:len(names)])
        data += record + bytes(point_step - len(record))
    fields = [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1) for i, name in enumerate(names)]
    return PointCloud2(header=Header(frame_id="lidar"), height=1, width=len(points), fields=fields,
                       is_bigendian=is_bigendian, point_step=point_step, row_step=point_step * len(points),
                       data=array.array("B", bytes(data)), is_dense=False)


@pytest.fixture
def lidar_points() -> np.ndarray:
    rng = np.random.default_rng(3)
    xyz = rng.uniform(-60, 60, (500, 3)) * [1, 1, 0.1]
    return np.hstack([xyz, rng.integers(0, 256, (500, 1))]).astype(np.float32)


def test_a_correct_cloud_reads_back_exactly(lidar_points):
    decoded = cloud_points(packed_cloud(lidar_points, point_step=20))
    np.testing.assert_array_equal(decoded.points, lidar_points)
    assert decoded.warnings == ()


def test_big_endian_data_declared_big_endian_reads_back(lidar_points):
    decoded = cloud_points(packed_cloud(lidar_points, ">", is_bigendian=True))
    np.testing.assert_array_equal(decoded.points, lidar_points)
    assert decoded.warnings == ()


@pytest.mark.parametrize("byte_order, flag", [("<", True), (">", False)])
def test_a_wrong_is_bigendian_flag_is_corrected_and_said(lidar_points, byte_order, flag):
    """Defect: is_bigendian=true on little-endian data gave garbage points at level OK."""
    decoded = cloud_points(packed_cloud(lidar_points, byte_order, is_bigendian=flag))
    np.testing.assert_array_equal(decoded.points, lidar_points)
    assert len(decoded.warnings) == 1 and "input corrected" in decoded.warnings[0]
    assert f"is_bigendian={flag}" in decoded.warnings[0]


def test_implausible_points_are_said_not_corrected():
    garbage = np.full((100, 4), 1e30, np.float32)          # beyond 1 km in both byte orders
    decoded = cloud_points(packed_cloud(garbage))
    np.testing.assert_array_equal(decoded.points, garbage)
    assert len(decoded.warnings) == 1 and "only 0% of the PointCloud2's points" in decoded.warnings[0]


def test_plausible_fraction_counts_nan_and_far_points():
    xyz = np.array([[1, 2, 3], [np.nan, 0, 0], [0, 0, 1001], [-1000, 0, 0]], np.float32)
    assert plausible_fraction(xyz) == 0.5
    assert plausible_fraction(np.zeros((0, 3), np.float32)) == 1.0


def test_short_data_is_a_clear_error(lidar_points):
    """Defect: data shorter than width x height x point_step raised a TypeError in the reader."""
    cloud = packed_cloud(lidar_points)
    cloud.data = cloud.data[:1000]
    with pytest.raises(CloudError, match=r"has 1000 bytes of data, but width x height x point_step = "
                                         r"500 x 1 x 16 needs 8000"):
        cloud_points(cloud)


def test_point_step_smaller_than_its_fields_is_a_clear_error(lidar_points):
    """Defect: a point_step smaller than the fields gave a cryptic NumPy message."""
    cloud = packed_cloud(lidar_points)
    cloud.point_step = 8
    cloud.row_step = 8 * cloud.width
    with pytest.raises(CloudError, match=r"field 'z' ends at byte 12 of a point, beyond point_step 8"):
        cloud_points(cloud)


def test_organised_cloud_row_step_checked(lidar_points):
    cloud = packed_cloud(lidar_points)
    cloud.height, cloud.width, cloud.row_step = 2, 250, 100
    with pytest.raises(CloudError, match="row_step 100 is shorter than width x point_step = 250 x 16"):
        check_layout(cloud)
    cloud.row_step = 4000
    check_layout(cloud)


def test_missing_xyz_and_unknown_datatype(lidar_points):
    with pytest.raises(CloudError, match=r"lacks field\(s\) \['z'\]"):
        cloud_points(packed_cloud(lidar_points[:, [0, 1, 3]], names=("x", "y", "intensity")))
    cloud = packed_cloud(lidar_points)
    cloud.fields[3].datatype = 42
    with pytest.raises(CloudError, match="unknown datatype 42"):
        cloud_points(cloud)
    assert issubclass(CloudError, InputError)


def test_missing_intensity_is_zero_and_extra_fields_are_read(lidar_points):
    decoded = cloud_points(packed_cloud(lidar_points[:, :3], names=("x", "y", "z")))
    np.testing.assert_array_equal(decoded.points[:, 3], 0)
    lag = np.hstack([lidar_points, np.full((len(lidar_points), 1), 0.05, np.float32)])
    decoded = cloud_points(packed_cloud(lag, point_step=20, names=(*FIELDS, "time_lag")), extra=("time_lag",))
    np.testing.assert_array_equal(decoded.points, lag)


def test_empty_cloud_reads_as_no_points():
    decoded = cloud_points(packed_cloud(np.zeros((0, 4), np.float32)))
    assert decoded.points.shape == (0, 4) and decoded.warnings == ()


def test_nan_rows_are_dropped_and_counted(lidar_points):
    noisy = lidar_points.copy()
    noisy[::100, 2] = np.nan
    noisy[7, 3] = np.inf
    decoded = cloud_points(packed_cloud(noisy))
    keep = np.isfinite(noisy).all(axis=1)
    np.testing.assert_array_equal(decoded.points, lidar_points[keep])
    assert decoded.warnings == ("dropped 6 points with NaN/inf values",)
