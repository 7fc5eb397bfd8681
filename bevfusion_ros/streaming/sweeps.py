"""Multi-sweep lidar accumulation, as BEVFusion's nuScenes models were trained (ROS-free).

BEVFusion's nuScenes configs load points with mmdet3d's ``LoadPointsFromMultiSweeps``
(``sweeps_num: 9``, ``remove_close: true``, ``load_dim: 5``, ``use_dim: 5``): the current
keyframe sweep plus the 9 previous lidar sweeps (10 in all, about 0.45 s at 20 Hz), each past
sweep

* stripped of the points inside the square ``|x| < 1 m and |y| < 1 m`` of its own lidar frame
  (``_remove_close``, mostly returns from the ego vehicle's roof), then
* moved into the current lidar frame (``sensor2lidar`` rotation and translation, i.e.
  ``current_T_past = inv(world_T_current) @ world_T_past``), and
* given the time lag ``current stamp - sweep stamp`` in seconds as its 5th channel.

The current sweep keeps all its points and a time lag of 0. :class:`SweepAccumulator` does the
same online: it remembers the last ``num_sweeps - 1`` sweeps with their poses and returns
``[M, 5]`` float32 points ``(x, y, z, intensity, time_lag_s)`` for each new one.

(``pad_empty_sweeps``, which in training repeats the current sweep when a sample has no
sweeps at all, is not reproduced: at run time a missing history just means fewer points.)
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from bevfusion_ros.streaming.transforms import invert_transform

__all__ = ["SweepAccumulator"]

_NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class _Sweep:
    points: np.ndarray               # [N, 4] float32 x, y, z, intensity; close points removed
    stamp_ns: int
    world_T_lidar: np.ndarray | None  # [4, 4] float64


def _checked_pose(world_T_lidar: np.ndarray) -> np.ndarray:
    """``world_T_lidar`` as a float64 [4, 4]; ValueError unless finite and of that shape."""
    pose = np.array(world_T_lidar, dtype=np.float64)
    if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
        raise ValueError(f"world_T_lidar must be a finite [4, 4] matrix, got shape {pose.shape}")
    return pose


class SweepAccumulator:
    """Accumulates the current lidar sweep with up to ``num_sweeps - 1`` past ones.

    ``num_sweeps`` counts the current sweep (BEVFusion nuScenes: 10). Past sweeps older than
    ``max_age_s`` are not used. A past sweep stored without a pose is left out (the others are
    used) until :meth:`refresh_poses` finds its pose; without a pose for the current sweep no
    past sweep can be used. After each :meth:`add`, :attr:`last_warning` holds a message when
    the output had to be degraded (missing poses, time going backwards), else None.
    """

    def __init__(self, num_sweeps: int = 10, close_radius_m: float = 1.0, max_age_s: float = 1.0) -> None:
        if int(num_sweeps) != num_sweeps or num_sweeps < 1:
            raise ValueError(f"num_sweeps must be an integer >= 1, got {num_sweeps}")
        if not close_radius_m >= 0:
            raise ValueError(f"close_radius_m must be >= 0, got {close_radius_m}")
        if not max_age_s > 0:
            raise ValueError(f"max_age_s must be > 0, got {max_age_s}")
        self.num_sweeps = int(num_sweeps)
        self.close_radius_m = float(close_radius_m)
        self.max_age_ns = int(round(max_age_s * _NS_PER_S))
        # Past sweeps for the next call, oldest first; the newest num_sweeps - 1 are enough.
        self._history: deque[_Sweep] = deque(maxlen=self.num_sweeps - 1)
        self.last_warning: str | None = None

    def __len__(self) -> int:
        """Number of stored sweeps (candidates to be past sweeps of the next call)."""
        return len(self._history)

    @property
    def stored_stamps(self) -> list[int]:
        """Stamps of the stored sweeps, oldest first."""
        return [sweep.stamp_ns for sweep in self._history]

    def remove_close(self, points: np.ndarray) -> np.ndarray:
        """``points`` without those with ``|x| < r`` and ``|y| < r`` (mmdet3d ``_remove_close``)."""
        r = self.close_radius_m
        close = (np.abs(points[:, 0]) < r) & (np.abs(points[:, 1]) < r)
        return points[~close]

    def add(self, points: np.ndarray, stamp_ns: int, world_T_lidar: np.ndarray | None) -> np.ndarray:
        """Store a sweep and return it with the usable past sweeps, as ``[M, 5]`` float32.

        ``points``: ``[N, >=4]`` (x, y, z, intensity, ...) in the lidar frame at ``stamp_ns``;
        columns past the 4th are dropped. ``world_T_lidar``: the lidar's pose in a fixed
        (odometry/world) frame at ``stamp_ns``, or None when unknown. Output rows: the current
        sweep (time lag 0), then the past sweeps newest to oldest, moved into the current lidar
        frame, with their time lag in seconds.
        """
        current, stamp, pose = self._begin(points, stamp_ns, world_T_lidar)
        past = list(reversed(self._history))            # newest first
        posed: list[_Sweep] = []
        if past and pose is None:
            self.last_warning = (
                f"no lidar pose for the current sweep: past sweeps cannot be motion-compensated; "
                f"using the current sweep only ({len(past)} past sweep(s) left out)")
        elif past:
            posed = [sweep for sweep in past if sweep.world_T_lidar is not None]
            if len(posed) < len(past):
                self.last_warning = (f"no lidar pose for {len(past) - len(posed)} past sweep(s): "
                                     f"left out ({len(posed)} of {len(past)} past sweep(s) used)")
        # One output array, written once (a 250k-point sweep is 5 MB: no intermediate copies).
        output = np.empty((len(current) + sum(len(sweep.points) for sweep in posed), 5), dtype=np.float32)
        output[:len(current), :4] = current
        output[:len(current), 4] = 0.0
        start, current_T_world = len(current), invert_transform(pose) if posed else None
        for sweep in posed:
            end = start + len(sweep.points)
            self._compensate(output[start:end], sweep, current_T_world @ sweep.world_T_lidar, stamp)
            start = end
        self._store(current, stamp, pose)
        return output

    @staticmethod
    def _compensate(block: np.ndarray, sweep: _Sweep, current_T_past: np.ndarray, stamp_ns: int) -> None:
        """Write ``sweep`` moved into the current frame, with its time lag in s, into ``block``
        (float32 ``[N, 5]``)."""
        block[:, :3] = sweep.points[:, :3] @ current_T_past[:3, :3].T + current_T_past[:3, 3]
        block[:, 3] = sweep.points[:, 3]
        block[:, 4] = (stamp_ns - sweep.stamp_ns) / _NS_PER_S

    def refresh_poses(self, pose_at: Callable[[int], np.ndarray | None]) -> None:
        """Ask ``pose_at(stamp_ns)`` again for the pose of every stored sweep that has none
        (odometry that arrived after its sweep); sweeps it still returns None for stay pose-less."""
        for index, sweep in enumerate(self._history):
            if sweep.world_T_lidar is None:
                pose = pose_at(sweep.stamp_ns)
                if pose is not None:
                    self._history[index] = replace(sweep, world_T_lidar=_checked_pose(pose))

    def remember(self, points: np.ndarray, stamp_ns: int, world_T_lidar: np.ndarray | None) -> None:
        """Store a sweep as a past sweep without building an output (a sweep whose frame the
        node dropped: the next frames still need it). Same arguments and checks as :meth:`add`."""
        self._store(*self._begin(points, stamp_ns, world_T_lidar))

    def _begin(self, points: np.ndarray, stamp_ns: int, world_T_lidar: np.ndarray | None
               ) -> tuple[np.ndarray, int, np.ndarray | None]:
        """Checked (points [N, 4] float32, stamp, pose); clears the history when the stamp went
        backwards and drops stored sweeps that cannot be past sweeps of this one."""
        points = np.asarray(points)
        if points.ndim != 2 or points.shape[1] < 4:
            raise ValueError(f"points must be [N, >=4] (x, y, z, intensity, ...), got shape {points.shape}")
        current = np.ascontiguousarray(points[:, :4], dtype=np.float32)
        stamp = int(stamp_ns)
        pose = None if world_T_lidar is None else _checked_pose(world_T_lidar)
        self.last_warning = None
        history = self._history
        if history and stamp < history[-1].stamp_ns:
            self.last_warning = (
                f"lidar stamp went backwards ({stamp / 1e9:.6f} s < {history[-1].stamp_ns / 1e9:.6f} s, "
                f"bag loop or time reset?): cleared {len(history)} stored sweep(s)")
            history.clear()
        # Drop stored sweeps that cannot be past sweeps of this one, or of any later one: too old,
        # or not older than this sweep (a repeated stamp).
        kept = [s for s in history if s.stamp_ns < stamp and stamp - s.stamp_ns <= self.max_age_ns]
        if len(kept) != len(history):
            history.clear()
            history.extend(kept)
        return current, stamp, pose

    def _store(self, current: np.ndarray, stamp: int, pose: np.ndarray | None) -> None:
        if self._history.maxlen:                        # num_sweeps == 1 keeps nothing
            self._history.append(_Sweep(points=self.remove_close(current), stamp_ns=stamp, world_T_lidar=pose))
