"""sensor_msgs/PointCloud2 <-> numpy structured arrays.

Uses ``sensor_msgs_py.point_cloud2`` when it is importable (a ROS 2 installation), otherwise the
implementation below, which behaves the same for what this package uses:

- ``read_points(cloud, field_names=None, skip_nans=False)``: a numpy structured array, one record
  per point, with one field per PointField (``name_i`` for ``count > 1``), whatever the field
  order, ``point_step`` padding or byte order of the cloud. Values are returned in native byte
  order. ``skip_nans`` drops points having a NaN in any returned field, unless ``is_dense``.
- ``read_points_numpy(...)``: the same as a plain ``(N, F)`` array (all fields of one type).
- ``create_cloud(header, fields, points)`` / ``create_cloud_xyz32(header, points)``: an unorganised
  (or, for 2-D input, organised) little/native-endian cloud whose layout follows ``fields``.

``msg.data`` is filled with an ``array.array('B')`` made from the packed bytes: assigning a numpy
array to a message's ``uint8[]`` field goes element by element in rclpy (hundreds of times slower).
Reading wraps ``cloud.data`` without copying (unless rows are padded or bytes must be swapped).

Only this ROS layer imports sensor_msgs; the ROS-free core never imports this module.
"""
from __future__ import annotations

import array
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from numpy.lib import recfunctions
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

try:  # A ROS 2 installation ships the reference implementation: prefer it.
    from sensor_msgs_py import point_cloud2 as _upstream
except ImportError:  # PyPI wheels: sensor_msgs_py is not published there.
    _upstream = None

#: PointField datatype constant -> numpy dtype (native byte order), as in sensor_msgs_py.
DATATYPES: dict[int, np.dtype] = {
    PointField.INT8: np.dtype(np.int8),
    PointField.UINT8: np.dtype(np.uint8),
    PointField.INT16: np.dtype(np.int16),
    PointField.UINT16: np.dtype(np.uint16),
    PointField.INT32: np.dtype(np.int32),
    PointField.UINT32: np.dtype(np.uint32),
    PointField.FLOAT32: np.dtype(np.float32),
    PointField.FLOAT64: np.dtype(np.float64),
}

#: Name given to a PointField that has an empty name (numpy needs one), as in sensor_msgs_py.
DUMMY_FIELD_PREFIX = "unnamed_field"

_NATIVE_BIGENDIAN = sys.byteorder != "little"


def dtype_from_fields(
    fields: Iterable[PointField], point_step: int | None = None, bigendian: bool | None = None
) -> np.dtype:
    """Structured dtype of one point described by ``fields``.

    A field with ``count > 1`` becomes ``count`` scalar fields ``name_0 .. name_{count-1}``.
    ``point_step`` sets the record size (padding after the last field); ``bigendian`` forces
    the byte order (default: native).
    """
    order = "=" if bigendian is None else (">" if bigendian else "<")
    names: list[str] = []
    formats: list[np.dtype] = []
    offsets: list[int] = []
    for index, field in enumerate(fields):
        if field.datatype not in DATATYPES:
            raise ValueError(f"PointField {field.name!r} has unknown datatype {field.datatype}")
        base = DATATYPES[field.datatype].newbyteorder(order)
        name = field.name or f"{DUMMY_FIELD_PREFIX}_{index}"
        subnames = [name] if field.count == 1 else [f"{name}_{i}" for i in range(field.count)]
        for i, subname in enumerate(subnames):
            names.append(subname)
            formats.append(base)
            offsets.append(field.offset + i * base.itemsize)
    spec: dict[str, Any] = {"names": names, "formats": formats, "offsets": offsets}
    if point_step is not None:
        spec["itemsize"] = point_step
    return np.dtype(spec)


def _points_view(cloud: PointCloud2) -> np.ndarray:
    """All points of ``cloud`` as a 1-D structured array in native byte order."""
    count = cloud.width * cloud.height
    dtype = dtype_from_fields(cloud.fields, cloud.point_step, bigendian=bool(cloud.is_bigendian))
    buffer = memoryview(cloud.data).cast("B")
    row_bytes = cloud.width * cloud.point_step
    if cloud.height > 1 and cloud.row_step != row_bytes:  # rows padded beyond width * point_step
        needed = (cloud.height - 1) * cloud.row_step + row_bytes
        rows = np.ndarray(
            shape=(cloud.height, cloud.width), dtype=dtype, buffer=buffer[:needed],
            strides=(cloud.row_step, cloud.point_step),
        )
        points = np.ascontiguousarray(rows).reshape(count)
    else:
        points = np.ndarray(shape=(count,), dtype=dtype, buffer=buffer)
    if bool(cloud.is_bigendian) != _NATIVE_BIGENDIAN:
        points = points.astype(dtype.newbyteorder("="))
    return points


def _read_points(
    cloud: PointCloud2, field_names: Sequence[str] | None = None, skip_nans: bool = False
) -> np.ndarray:
    """Local implementation of ``read_points`` (see the module docstring)."""
    points = _points_view(cloud)
    if field_names is not None:
        missing = [name for name in field_names if name not in (points.dtype.names or ())]
        if missing:
            raise ValueError(f"fields {missing} not in cloud (has {points.dtype.names})")
        points = points[list(field_names)]
    if skip_nans and not cloud.is_dense:
        keep = np.ones(len(points), dtype=bool)
        for name in points.dtype.names:
            if points.dtype[name].kind == "f":
                keep &= ~np.isnan(points[name])
        points = points[keep]
    return points


def _read_points_numpy(
    cloud: PointCloud2, field_names: Sequence[str] | None = None, skip_nans: bool = False
) -> np.ndarray:
    """Local implementation of ``read_points_numpy``: an ``(N, F)`` array of one dtype."""
    points = _read_points(cloud, field_names, skip_nans)
    kinds = {points.dtype[name] for name in points.dtype.names}
    if len(kinds) != 1:
        raise ValueError(f"read_points_numpy needs fields of one type, got {sorted(map(str, kinds))}")
    return recfunctions.structured_to_unstructured(points)


def _as_structured(points: Any, dtype: np.dtype) -> np.ndarray:
    """``points`` (structured array, plain ``(..., F)`` array or iterable of tuples) as ``dtype``,
    with zeroed padding bytes."""
    if isinstance(points, np.ndarray) and points.dtype.names is not None:
        source = points
    elif isinstance(points, np.ndarray):
        if points.shape[-1:] != (len(dtype.names),):
            raise ValueError(f"points of shape {points.shape} do not have {len(dtype.names)} columns")
        source = recfunctions.unstructured_to_structured(points, dtype=dtype)
    else:
        source = np.array([tuple(point) for point in points], dtype=dtype)
    missing = [name for name in dtype.names if name not in source.dtype.names]
    if missing:
        raise ValueError(f"points lack fields {missing} (have {source.dtype.names})")
    out = np.zeros(source.shape, dtype=dtype)
    for name in dtype.names:  # by name: numpy's structured astype would go by position
        out[name] = source[name]
    return out


def _create_cloud(header: Header, fields: Sequence[PointField], points: Any) -> PointCloud2:
    """Local implementation of ``create_cloud`` (see the module docstring)."""
    structured = _as_structured(points, dtype_from_fields(fields))
    if structured.ndim > 2:
        raise ValueError(f"points must be 1-D (unorganised) or 2-D (organised), got {structured.ndim}-D")
    height, width = (1, structured.shape[0]) if structured.ndim == 1 else structured.shape
    data = array.array("B")
    data.frombytes(np.ascontiguousarray(structured).tobytes())
    point_step = structured.dtype.itemsize
    return PointCloud2(
        header=header, height=height, width=width, fields=list(fields),
        is_bigendian=_NATIVE_BIGENDIAN, point_step=point_step, row_step=point_step * width,
        data=data, is_dense=False,
    )


def xyz32_fields() -> list[PointField]:
    """PointFields x, y, z as float32 at offsets 0, 4, 8."""
    return [
        PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
        for i, name in enumerate("xyz")
    ]


def _create_cloud_xyz32(header: Header, points: Any) -> PointCloud2:
    """Local implementation of ``create_cloud_xyz32``."""
    return _create_cloud(header, xyz32_fields(), points)


if _upstream is not None:
    read_points = _upstream.read_points
    read_points_numpy = _upstream.read_points_numpy
    create_cloud = _upstream.create_cloud
    create_cloud_xyz32 = _upstream.create_cloud_xyz32
else:
    read_points = _read_points
    read_points_numpy = _read_points_numpy
    create_cloud = _create_cloud
    create_cloud_xyz32 = _create_cloud_xyz32
