"""``sensor_msgs/PointCloud2`` -> the pipeline's float32 points, checked before they are trusted.

:func:`cloud_points` reads x, y, z, intensity (0 when the cloud has none) and any extra fields
into ``[N, 4 + len(extra)]`` float32, after checking what a reader would otherwise trip over or
silently misread:

* the layout (:func:`check_layout`): every field inside ``point_step``, ``row_step`` at least a
  row, ``data`` as long as ``width x height`` points need. A violation raises
  :class:`CloudError` (an :class:`~bevfusion_ros.pipeline.InputError`) naming the numbers;
* NaN/inf rows are dropped, with a warning;
* the byte order: a cloud whose ``is_bigendian`` does not match its data reads as garbage
  (huge, tiny or NaN coordinates). When fewer than :data:`PLAUSIBLE_FRACTION_LOW` of the points
  are plausible (finite, within :data:`PLAUSIBLE_RANGE_M` of the sensor) as declared, but at
  least :data:`PLAUSIBLE_FRACTION_HIGH` are when read in the other byte order, the other order
  is used and a warning says so; when neither reads plausibly, a warning says that too.

Warnings are returned with the points, for the frame's diagnostic.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from sensor_msgs.msg import PointCloud2

from bevfusion_ros.pipeline import InputError
from bevfusion_ros.ros import pointcloud2
from bevfusion_ros.ros.cdr import RawPointCloud2

#: A coordinate beyond this many metres from the sensor is not a lidar return.
PLAUSIBLE_RANGE_M = 1000.0
#: Below this fraction of plausible points the declared byte order is suspect ...
PLAUSIBLE_FRACTION_LOW = 0.5
#: ... and the other order is taken when at least this fraction reads plausibly.
PLAUSIBLE_FRACTION_HIGH = 0.9
#: Rows plausible_fraction looks at, at most (evenly spaced).
PLAUSIBILITY_SAMPLE = 8192
XYZ = ("x", "y", "z")


class CloudError(InputError):
    """A PointCloud2 whose layout contradicts its data or fields."""


@dataclass(frozen=True)
class CloudPoints:
    """``points`` [N, 4 + extra] float32 (x, y, z, intensity, extra...) and what was wrong."""

    points: np.ndarray
    warnings: tuple[str, ...] = ()


def check_layout(cloud: PointCloud2) -> None:
    """Raise :class:`CloudError` unless the fields fit ``point_step``, a row fits ``row_step``
    and ``data`` holds ``width x height`` points."""
    width, height, point_step = int(cloud.width), int(cloud.height), int(cloud.point_step)
    if width * height == 0:
        return
    for field in cloud.fields:
        dtype = pointcloud2.DATATYPES.get(field.datatype)
        if dtype is None:
            raise CloudError(f"PointCloud2 field {field.name!r} has unknown datatype {field.datatype}")
        end = field.offset + dtype.itemsize * max(int(field.count), 1)
        if end > point_step:
            raise CloudError(f"PointCloud2 field {field.name!r} ends at byte {end} of a point, "
                             f"beyond point_step {point_step}")
    row_bytes = width * point_step
    row_step = int(cloud.row_step) if height > 1 else row_bytes
    if row_step < row_bytes:
        raise CloudError(f"PointCloud2 row_step {row_step} is shorter than width x point_step "
                         f"= {width} x {point_step} = {row_bytes} bytes")
    needed = (height - 1) * row_step + row_bytes
    if len(cloud.data) < needed:
        raise CloudError(f"PointCloud2 has {len(cloud.data)} bytes of data, but width x height x "
                         f"point_step = {width} x {height} x {point_step} needs {needed}")


def plausible_fraction(xyz: np.ndarray) -> float:
    """Fraction of rows of ``xyz`` [N, 3] that are finite and within PLAUSIBLE_RANGE_M, counted
    on at most PLAUSIBILITY_SAMPLE evenly spaced rows (exact for smaller clouds; a byte-order
    mix-up moves the fraction by tens of percent, a sample's error is about 1 %)."""
    if len(xyz) == 0:
        return 1.0
    sample = xyz[::max(1, len(xyz) // PLAUSIBILITY_SAMPLE)]
    with np.errstate(invalid="ignore", over="ignore"):
        plausible = np.all(np.abs(sample) <= PLAUSIBLE_RANGE_M, axis=1)   # False for NaN
    return float(plausible.mean())


def _read(cloud: PointCloud2, names: tuple[str, ...]) -> np.ndarray:
    """float32 [N, len(names)] of ``cloud``; a field it lacks (``intensity``) is zeros."""
    records = pointcloud2.read_points(cloud)
    columns = [records[name] if name in (records.dtype.names or ()) else np.zeros(len(records), np.float32)
               for name in names]
    return np.stack(columns, axis=1).astype(np.float32, copy=False)


def _other_byte_order(cloud: PointCloud2 | RawPointCloud2) -> PointCloud2 | RawPointCloud2:
    """A shallow copy of ``cloud`` declaring the other byte order (same data)."""
    if isinstance(cloud, RawPointCloud2):
        return dataclasses.replace(cloud, is_bigendian=not cloud.is_bigendian)
    flipped = PointCloud2(header=cloud.header, height=cloud.height, width=cloud.width,
                          fields=cloud.fields, is_bigendian=not cloud.is_bigendian,
                          point_step=cloud.point_step, row_step=cloud.row_step, is_dense=cloud.is_dense,
                          data=cloud.data)      # an array.array is shared, not copied
    return flipped


def _order_name(bigendian: bool) -> str:
    return "big-endian" if bigendian else "little-endian"


def cloud_points(cloud: PointCloud2, extra: tuple[str, ...] = ()) -> CloudPoints:
    """x, y, z, intensity and ``extra`` of ``cloud`` as float32 [N, 4 + len(extra)] (see the
    module docstring); rows with a NaN/inf value are dropped (and counted in a warning) here, so
    that they do not come back with the sweep in later frames. Raises :class:`CloudError` for a
    cloud without x, y, z or ``extra``, or with a broken layout."""
    fields = {f.name for f in cloud.fields}
    absent = [name for name in (*XYZ, *extra) if name not in fields]
    if absent:
        raise CloudError(f"PointCloud2 lacks field(s) {absent}; has {sorted(fields)}")
    check_layout(cloud)
    names = (*XYZ, "intensity", *extra)
    points, warnings = _in_plausible_byte_order(cloud, names)
    if not np.isfinite(points).all():               # (one flat pass; rows only when needed)
        finite = np.logical_and.reduce([np.isfinite(column) for column in points.T])
        warnings.append(f"dropped {int((~finite).sum())} points with NaN/inf values")
        points = points[finite]
    return CloudPoints(points, tuple(warnings))


def _in_plausible_byte_order(cloud: PointCloud2, names: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    """The points read as declared, or in the other byte order when only that reads plausibly."""
    points = _read(cloud, names)
    declared = plausible_fraction(points[:, :3])
    if declared >= PLAUSIBLE_FRACTION_LOW:
        return points, []
    swapped_points = _read(_other_byte_order(cloud), names)
    swapped = plausible_fraction(swapped_points[:, :3])
    stated = _order_name(bool(cloud.is_bigendian))
    if swapped >= PLAUSIBLE_FRACTION_HIGH:
        return swapped_points, [
            f"PointCloud2 says is_bigendian={bool(cloud.is_bigendian)} but its data are "
            f"{_order_name(not cloud.is_bigendian)}: {declared:.0%} of the points are plausible as "
            f"{stated}, {swapped:.0%} in the other byte order; read in the other byte order "
            f"(input corrected: fix the driver's is_bigendian)"]
    return points, [
        f"only {declared:.0%} of the PointCloud2's points are finite and within "
        f"{PLAUSIBLE_RANGE_M:.0f} m ({swapped:.0%} in the other byte order): check its fields, "
        f"offsets and is_bigendian"]
