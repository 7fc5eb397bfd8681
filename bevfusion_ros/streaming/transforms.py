"""A small, ROS-free transform buffer with tf2's lookup semantics (tf2_ros is not on PyPI).

A transform is stored as ``parent_T_child``: a 4x4 float64 rigid matrix that maps points
expressed in the child frame into the parent frame, as a ROS ``TransformStamped`` with
``header.frame_id = parent`` and ``child_frame_id = child``. Frames form a tree (every child
has one parent). :meth:`TransformBuffer.lookup` returns ``target_T_source`` like tf2's
``lookup_transform(target, source, time)``: it maps points from ``source`` into ``target``,
chaining the edges through the frames' common ancestor.

Static edges hold one transform and ignore time. Dynamic edges keep a time-sorted history of
at most ``cache_time_s`` behind their newest sample and are interpolated at the requested
stamp: linearly in translation, by spherical linear interpolation (shortest path) in rotation.
Stamp 0 means "latest common time", as in tf2: the newest stamp for which every dynamic edge
on the chain has data, i.e. the minimum over those edges of their newest stamps.

Quaternions in this module are in ROS order ``(x, y, z, w)``.
"""
from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ConnectivityError",
    "ExtrapolationError",
    "TransformBuffer",
    "TransformError",
    "interpolate_transform",
    "invert_transform",
    "matrix_from_quaternion",
    "quaternion_from_matrix",
    "slerp",
    "transform_from_translation_quaternion",
    "validate_transform",
]

ORTHONORMAL_TOLERANCE = 1e-5
_NS_PER_S = 1_000_000_000


class TransformError(ValueError):
    """An invalid transform, or one that would break the tree (two parents, a cycle)."""


class ExtrapolationError(LookupError):
    """A lookup at a time outside the data of a dynamic edge on the chain."""


class ConnectivityError(LookupError):
    """A lookup between frames that are unknown or not connected through the tree."""


# --------------------------------------------------------------------------- matrix helpers

def validate_transform(matrix: np.ndarray, tolerance: float = ORTHONORMAL_TOLERANCE) -> np.ndarray:
    """``matrix`` as a float64 [4, 4] copy, after checking that it is a proper rigid transform.

    Raises :class:`TransformError` unless it is finite, has the bottom row ``[0, 0, 0, 1]``
    and an orthonormal rotation with determinant +1 (each to within ``tolerance``).
    """
    try:
        m = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TransformError(f"transform is not a numeric array: {exc}") from None
    if m.shape != (4, 4):
        raise TransformError(f"transform must be a [4, 4] matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise TransformError("transform has non-finite entries")
    if np.max(np.abs(m[3] - (0.0, 0.0, 0.0, 1.0))) > tolerance:
        raise TransformError(f"transform's bottom row must be [0, 0, 0, 1], got {m[3].tolist()}")
    rotation = m[:3, :3]
    error = np.max(np.abs(rotation.T @ rotation - np.eye(3)))
    if error > tolerance:
        raise TransformError(f"transform's rotation is not orthonormal (max |R^T R - I| = {error:.3g})")
    det = float(np.linalg.det(rotation))
    if abs(det - 1.0) > tolerance:
        raise TransformError(f"transform's rotation has determinant {det:.6g}, not +1 (a reflection?)")
    m[3] = (0.0, 0.0, 0.0, 1.0)
    return m


def invert_transform(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a rigid [4, 4] transform: ``[R^T, -R^T t; 0 0 0 1]``."""
    m = np.asarray(matrix, dtype=np.float64)
    inverse = np.eye(4)
    inverse[:3, :3] = m[:3, :3].T
    inverse[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return inverse


def quaternion_from_matrix(rotation: np.ndarray) -> np.ndarray:
    """Unit quaternion ``(x, y, z, w)`` of a rotation matrix ([3, 3] or the top-left of [4, 4]).

    Shepperd's method: it extracts the largest of the four components from the trace or a
    diagonal element, where the square root is well conditioned, and the other three from the
    off-diagonal sums and differences. The sign is chosen so that the extracted component is
    positive (``w >= 0`` whenever ``w`` is the largest).
    """
    r = np.asarray(rotation, dtype=np.float64)[:3, :3]
    trace = r[0, 0] + r[1, 1] + r[2, 2]
    candidates = (trace, r[0, 0], r[1, 1], r[2, 2])
    largest = int(np.argmax(candidates))
    if largest == 0:
        s = 2.0 * np.sqrt(max(1.0 + trace, 0.0))          # s = 4w
        w = 0.25 * s
        x = (r[2, 1] - r[1, 2]) / s
        y = (r[0, 2] - r[2, 0]) / s
        z = (r[1, 0] - r[0, 1]) / s
    elif largest == 1:
        s = 2.0 * np.sqrt(max(1.0 + r[0, 0] - r[1, 1] - r[2, 2], 0.0))   # s = 4x
        w = (r[2, 1] - r[1, 2]) / s
        x = 0.25 * s
        y = (r[0, 1] + r[1, 0]) / s
        z = (r[0, 2] + r[2, 0]) / s
    elif largest == 2:
        s = 2.0 * np.sqrt(max(1.0 + r[1, 1] - r[0, 0] - r[2, 2], 0.0))   # s = 4y
        w = (r[0, 2] - r[2, 0]) / s
        x = (r[0, 1] + r[1, 0]) / s
        y = 0.25 * s
        z = (r[1, 2] + r[2, 1]) / s
    else:
        s = 2.0 * np.sqrt(max(1.0 + r[2, 2] - r[0, 0] - r[1, 1], 0.0))   # s = 4z
        w = (r[1, 0] - r[0, 1]) / s
        x = (r[0, 2] + r[2, 0]) / s
        y = (r[1, 2] + r[2, 1]) / s
        z = 0.25 * s
    q = np.array([x, y, z, w], dtype=np.float64)
    return q / np.linalg.norm(q)


def matrix_from_quaternion(quaternion: np.ndarray) -> np.ndarray:
    """[3, 3] rotation matrix of a quaternion ``(x, y, z, w)`` (normalised first)."""
    q = np.asarray(quaternion, dtype=np.float64).reshape(4)
    norm = np.linalg.norm(q)
    if not np.isfinite(norm) or norm < 1e-12:
        raise TransformError(f"quaternion {q.tolist()} has no direction")
    x, y, z, w = q / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def transform_from_translation_quaternion(translation: np.ndarray, quaternion: np.ndarray) -> np.ndarray:
    """[4, 4] transform from a translation ``(x, y, z)`` and a quaternion ``(x, y, z, w)``
    (the fields of a ROS ``geometry_msgs/Transform``)."""
    m = np.eye(4)
    m[:3, :3] = matrix_from_quaternion(quaternion)
    m[:3, 3] = np.asarray(translation, dtype=np.float64).reshape(3)
    return m


def slerp(q0: np.ndarray, q1: np.ndarray, t: float) -> np.ndarray:
    """Spherical linear interpolation between unit quaternions ``(x, y, z, w)``, along the
    shortest path (``q1`` is negated when the two lie in opposite hemispheres)."""
    a = np.asarray(q0, dtype=np.float64) / np.linalg.norm(q0)
    b = np.asarray(q1, dtype=np.float64) / np.linalg.norm(q1)
    if float(np.dot(a, b)) < 0.0:
        b = -b
    # The angle between a and b from atan2, accurate also for tiny angles (arccos of the dot
    # product is not); the sines below then keep their relative precision.
    theta = 2.0 * np.arctan2(np.linalg.norm(a - b), np.linalg.norm(a + b))
    sin_theta = np.sin(theta)
    if sin_theta < 1e-15:                 # equal rotations
        return a.copy()
    q = (np.sin((1.0 - t) * theta) / sin_theta) * a + (np.sin(t * theta) / sin_theta) * b
    return q / np.linalg.norm(q)


def interpolate_transform(m0: np.ndarray, m1: np.ndarray, t: float) -> np.ndarray:
    """Rigid transform a fraction ``t`` of the way from ``m0`` to ``m1``: translation
    interpolated linearly, rotation by :func:`slerp`."""
    m = np.eye(4)
    m[:3, :3] = matrix_from_quaternion(slerp(quaternion_from_matrix(m0), quaternion_from_matrix(m1), t))
    m[:3, 3] = (1.0 - t) * np.asarray(m0)[:3, 3] + t * np.asarray(m1)[:3, 3]
    return m


# --------------------------------------------------------------------------- the buffer

@dataclass
class _Edge:
    """The transform(s) parent_T_child of one child frame."""

    parent: str
    static: np.ndarray | None = None                    # parent_T_child of a static edge
    stamps: list[int] = field(default_factory=list)     # sorted, of a dynamic edge
    matrices: list[np.ndarray] = field(default_factory=list)

    @property
    def is_static(self) -> bool:
        return self.static is not None


def _format_s(stamp_ns: int) -> str:
    return f"{stamp_ns / _NS_PER_S:.9f} s"


class TransformBuffer:
    """A tf-like tree of static and time-stamped transforms.

    Thread-safe: every public method takes an internal lock, so a ROS node may fill it from a
    ``/tf`` subscription and query it from another callback group.
    """

    def __init__(self, cache_time_s: float = 10.0, extrapolation_tolerance_ns: int = 0) -> None:
        if not cache_time_s > 0:
            raise ValueError(f"cache_time_s must be > 0, got {cache_time_s}")
        if extrapolation_tolerance_ns < 0:
            raise ValueError(f"extrapolation_tolerance_ns must be >= 0, got {extrapolation_tolerance_ns}")
        self.cache_time_ns = int(round(cache_time_s * _NS_PER_S))
        self.extrapolation_tolerance_ns = int(extrapolation_tolerance_ns)
        self._edges: dict[str, _Edge] = {}              # child frame -> its edge to the parent
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # notified by every set_transform

    # ---------------------------------------------------------------- filling
    def set_transform(self, parent: str, child: str, stamp_ns: int, matrix: np.ndarray,
                      static: bool = False) -> None:
        """Store ``parent_T_child`` (maps child-frame points into the parent frame).

        A static transform replaces whatever the edge held; a dynamic one is added to the
        edge's history (a sample at an existing stamp replaces it), which is then pruned to
        ``cache_time_s`` behind its newest stamp. A dynamic sample older than the newest by more
        than ``cache_time_s`` (a bag played in a loop, simulated time reset) first clears the
        edge's history. Raises :class:`TransformError` for an invalid matrix, an empty or
        self-referencing frame name, a second parent for ``child``, or a cycle.
        """
        parent, child = self._frame_name(parent), self._frame_name(child)
        if parent == child:
            raise TransformError(f"transform from frame {child!r} to itself")
        m = validate_transform(matrix)
        stamp = int(stamp_ns)
        if not static and stamp < 0:
            raise TransformError(f"negative stamp {stamp_ns} for {parent!r} -> {child!r}")
        with self._lock:
            edge = self._edges.get(child)
            if edge is not None and edge.parent != parent:
                raise TransformError(
                    f"frame {child!r} already has parent {edge.parent!r}; it cannot also have parent "
                    f"{parent!r} (a tf tree gives every frame one parent)")
            if edge is None:
                if child in self._ancestors(parent):
                    raise TransformError(f"{parent!r} -> {child!r} would close a cycle in the tree")
                edge = _Edge(parent=parent)
                self._edges[child] = edge
            if static:
                edge.static = m
                edge.stamps.clear()
                edge.matrices.clear()
                self._changed.notify_all()
                return
            edge.static = None
            if edge.stamps and stamp < edge.stamps[-1] - self.cache_time_ns:
                edge.stamps.clear()                     # time jumped back (bag loop): start anew
                edge.matrices.clear()
            index = bisect.bisect_left(edge.stamps, stamp)
            if index < len(edge.stamps) and edge.stamps[index] == stamp:
                edge.matrices[index] = m
            else:
                edge.stamps.insert(index, stamp)
                edge.matrices.insert(index, m)
            keep_from = bisect.bisect_left(edge.stamps, edge.stamps[-1] - self.cache_time_ns)
            if keep_from:
                del edge.stamps[:keep_from]
                del edge.matrices[:keep_from]
            self._changed.notify_all()

    def clear(self) -> None:
        """Forget every transform."""
        with self._lock:
            self._edges.clear()

    # ---------------------------------------------------------------- queries
    def frames(self) -> set[str]:
        """Every frame named by a stored transform, as parent or child."""
        with self._lock:
            return set(self._edges) | {edge.parent for edge in self._edges.values()}

    def can_transform(self, target: str, source: str, stamp_ns: int) -> bool:
        """Whether :meth:`lookup` would succeed."""
        try:
            self.lookup(target, source, stamp_ns)
        except LookupError:
            return False
        return True

    def wait_for_transform(self, target: str, source: str, stamp_ns: int, timeout_s: float) -> np.ndarray:
        """:meth:`lookup`, waiting up to ``timeout_s`` seconds for the transforms it needs to
        arrive (as tf2's message filter waits); raises the lookup's error once that time is up."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._changed:
            while True:
                try:
                    return self.lookup(target, source, stamp_ns)
                except LookupError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise
                    self._changed.wait(remaining)

    def lookup(self, target: str, source: str, stamp_ns: int) -> np.ndarray:
        """``target_T_source`` [4, 4] float64 at ``stamp_ns`` (0: the latest common time).

        Raises :class:`ConnectivityError` for unknown frames or frames in different trees, and
        :class:`ExtrapolationError` when a dynamic edge on the chain has no data around the
        requested time (its exact endpoints, widened by ``extrapolation_tolerance_ns``, are
        allowed).
        """
        target, source = self._frame_name(target), self._frame_name(source)
        stamp = int(stamp_ns)
        with self._lock:
            known = self.frames()
            unknown = [name for name in (target, source) if name not in known]
            if unknown:
                raise ConnectivityError(
                    f"frame(s) {', '.join(map(repr, unknown))} do not exist in the buffer "
                    f"(known: {sorted(known)})")
            if target == source:
                return np.eye(4)
            source_chain = [source, *self._ancestors(source)]
            target_chain = [target, *self._ancestors(target)]
            target_set = set(target_chain)
            common = next((frame for frame in source_chain if frame in target_set), None)
            if common is None:
                raise ConnectivityError(
                    f"could not find a connection between {target!r} and {source!r}: they are in "
                    f"different trees (roots {target_chain[-1]!r} and {source_chain[-1]!r})")
            source_edges = source_chain[:source_chain.index(common)]   # children below common
            target_edges = target_chain[:target_chain.index(common)]
            if stamp == 0:
                stamp = self._latest_common_stamp(source_edges + target_edges)
            common_T_source = self._chain(source_edges, stamp, target, source)
            common_T_target = self._chain(target_edges, stamp, target, source)
            return invert_transform(common_T_target) @ common_T_source

    def latest_common_stamp(self, target: str, source: str) -> int:
        """The stamp a lookup with ``stamp_ns = 0`` uses (0 when the chain is all static)."""
        target, source = self._frame_name(target), self._frame_name(source)
        with self._lock:
            if not {target, source} <= self.frames():
                raise ConnectivityError(f"frame {target!r} or {source!r} does not exist in the buffer")
            source_chain = [source, *self._ancestors(source)]
            target_chain = [target, *self._ancestors(target)]
            common = next((frame for frame in source_chain if frame in set(target_chain)), None)
            if common is None:
                raise ConnectivityError(f"{target!r} and {source!r} are in different trees")
            edges = source_chain[:source_chain.index(common)] + target_chain[:target_chain.index(common)]
            return self._latest_common_stamp(edges)

    # ---------------------------------------------------------------- internals
    @staticmethod
    def _frame_name(name: str) -> str:
        if not isinstance(name, str):
            raise TypeError(f"frame name must be a str, got {type(name).__name__}")
        stripped = name.lstrip("/")                    # tf2 ignores a leading slash
        if not stripped:
            raise TransformError(f"empty frame name {name!r}")
        return stripped

    def _ancestors(self, frame: str) -> list[str]:
        """Parents of ``frame`` up to its tree's root, nearest first."""
        chain: list[str] = []
        seen = {frame}
        while frame in self._edges:
            frame = self._edges[frame].parent
            if frame in seen:                           # cannot happen: set_transform refuses cycles
                raise ConnectivityError(f"cycle in the transform tree at {frame!r}")
            seen.add(frame)
            chain.append(frame)
        return chain

    def _latest_common_stamp(self, children: list[str]) -> int:
        newest = [self._edges[child].stamps[-1] for child in children
                  if not self._edges[child].is_static and self._edges[child].stamps]
        return min(newest) if newest else 0

    def _chain(self, children: list[str], stamp: int, target: str, source: str) -> np.ndarray:
        """``top_T_bottom`` for the edges of ``children`` (bottom first, up to below the top)."""
        result = np.eye(4)
        for child in children:
            result = self._edge_at(child, stamp, target, source) @ result
        return result

    def _edge_at(self, child: str, stamp: int, target: str, source: str) -> np.ndarray:
        edge = self._edges[child]
        if edge.static is not None:
            return edge.static
        stamps = edge.stamps
        where = f"{edge.parent!r} -> {child!r} (looking up {target!r} <- {source!r})"
        if not stamps:
            raise ExtrapolationError(f"no data for {where}")
        oldest, newest = stamps[0], stamps[-1]
        tolerance = self.extrapolation_tolerance_ns
        if stamp < oldest:
            if oldest - stamp > tolerance:
                raise ExtrapolationError(
                    f"lookup would require extrapolation into the past: requested time "
                    f"{_format_s(stamp)} but the earliest data for {where} is at {_format_s(oldest)} "
                    f"({(oldest - stamp) / 1e6:.3f} ms earlier than the data)")
            return edge.matrices[0]
        if stamp > newest:
            if stamp - newest > tolerance:
                raise ExtrapolationError(
                    f"lookup would require extrapolation into the future: requested time "
                    f"{_format_s(stamp)} but the latest data for {where} is at {_format_s(newest)} "
                    f"({(stamp - newest) / 1e6:.3f} ms later than the data)")
            return edge.matrices[-1]
        index = bisect.bisect_left(stamps, stamp)
        if stamps[index] == stamp:
            return edge.matrices[index]
        t0, t1 = stamps[index - 1], stamps[index]
        return interpolate_transform(edge.matrices[index - 1], edge.matrices[index], (stamp - t0) / (t1 - t0))
