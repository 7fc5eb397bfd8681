"""Lidar-triggered approximate-time synchronisation of 1 lidar + N camera streams (ROS-free).

Messages are opaque objects here; only their stamps (integer nanoseconds) matter. Feed every
message in (:meth:`LidarTriggeredSync.add_image`, :meth:`LidarTriggeredSync.add_lidar`), call
:meth:`LidarTriggeredSync.poll` on a timer, and run inference on each :class:`SyncedFrame`
returned. The policy (matching within ``slop``, stale images, ``missing_camera``: wait,
zero_fill or lidar_only, dropped and reset sweeps) is ``docs/sync-policy.md``.
"""
from __future__ import annotations

import bisect
import math
import operator
from dataclasses import dataclass
from typing import Sequence

MISSING_CAMERA_POLICIES: tuple[str, ...] = ("wait", "zero_fill", "lidar_only")

REASON_NO_MATCH = "no image within slop"
REASON_STALE = "stale"
REASON_SUPERSEDED = "superseded"
LIDAR_ONLY_PREFIX = "lidar_only: "

DROP_DUPLICATE = "duplicate_stamp"
DROP_OUT_OF_ORDER = "out_of_order"
DROP_FUTURE = "future_stamp"
DROP_RESET = "sync_reset"
DROP_REASONS: tuple[str, ...] = (DROP_DUPLICATE, DROP_OUT_OF_ORDER, DROP_FUTURE, DROP_RESET)

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class SyncedFrame:
    """One lidar sweep with the camera images matched to it.

    ``images`` and ``image_stamps_ns`` map every camera name (constructor order) to the matched
    message and its stamp in nanoseconds, or ``None`` when the camera is not used; ``missing``
    maps each unused camera to a short reason (see the module docstring).
    """

    lidar_stamp_ns: int
    lidar: object
    images: dict[str, object | None]
    image_stamps_ns: dict[str, int | None]
    missing: dict[str, str]

    @property
    def cameras_used(self) -> tuple[str, ...]:
        """Names of the cameras that have an image, in constructor order."""
        return tuple(name for name, image in self.images.items() if image is not None)


@dataclass(frozen=True)
class DroppedSweep:
    """A lidar sweep the synchroniser did not emit: ``reason`` is one of :data:`DROP_REASONS`,
    ``detail`` says why in words."""

    stamp_ns: int
    reason: str
    detail: str


@dataclass
class _Match:
    """Matching result of one camera: the image and its stamp (ns), or a missing reason."""

    stamp_ns: int | None = None
    message: object | None = None
    reason: str | None = None


@dataclass
class _PendingSweep:
    """A lidar sweep waiting for images (wait policy); ``arrival_now_ns`` is the receiver clock."""

    stamp_ns: int
    message: object
    arrival_now_ns: int


class _ImageBuffer:
    """The newest ``capacity`` images of one camera, ordered by stamp (ns)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.stamps_ns: list[int] = []
        self.messages: list[object] = []

    def __len__(self) -> int:
        return len(self.stamps_ns)

    @property
    def newest_stamp_ns(self) -> int | None:
        """Stamp of the newest buffered image in nanoseconds, or None when empty."""
        return self.stamps_ns[-1] if self.stamps_ns else None

    def insert(self, stamp_ns: int, message: object) -> int:
        """Insert in stamp order (same stamp replaces); returns how many images were evicted."""
        index = bisect.bisect_left(self.stamps_ns, stamp_ns)
        if index < len(self.stamps_ns) and self.stamps_ns[index] == stamp_ns:
            self.messages[index] = message
            return 0
        self.stamps_ns.insert(index, stamp_ns)
        self.messages.insert(index, message)
        evicted = max(0, len(self.stamps_ns) - self.capacity)
        del self.stamps_ns[:evicted]
        del self.messages[:evicted]
        return evicted

    def nearest(self, stamp_ns: int) -> tuple[int, object] | None:
        """Buffered (stamp, message) nearest to ``stamp_ns``; the earlier one on a tie."""
        if not self.stamps_ns:
            return None
        index = bisect.bisect_left(self.stamps_ns, stamp_ns)
        candidates = [i for i in (index - 1, index) if 0 <= i < len(self.stamps_ns)]
        # min() keeps the first of equal keys, and candidates are in stamp order: earlier wins.
        best = min(candidates, key=lambda i: abs(self.stamps_ns[i] - stamp_ns))
        return self.stamps_ns[best], self.messages[best]

    def clear(self) -> None:
        self.stamps_ns.clear()
        self.messages.clear()


def _seconds_to_ns(name: str, seconds: float) -> int:
    """Validate a non-negative finite duration in seconds and convert it to nanoseconds."""
    value = float(seconds)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {seconds!r}")
    return int(round(value * NS_PER_S))


def _validate_camera_names(camera_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(camera_names, (str, bytes)):
        raise ValueError(f"camera_names must be a sequence of names, not the string {camera_names!r}")
    names = tuple(camera_names)
    if not names:
        raise ValueError("camera_names must not be empty")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"camera names must be non-empty strings, got {name!r}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate camera names: {', '.join(duplicates)}")
    return names


def _lidar_only_reason(missing_cameras: Sequence[str]) -> str:
    noun = "camera" if len(missing_cameras) == 1 else "cameras"
    return f"{LIDAR_ONLY_PREFIX}{noun} {', '.join(missing_cameras)} missing"


class LidarTriggeredSync:
    """Lidar-triggered approximate-time synchroniser for 1 lidar + N cameras (see module doc).

    Counters: ``emitted`` (frames returned), ``resets`` (time-went-backwards resets, reason in
    ``last_reset_reason``), ``dropped_images`` (images evicted from full buffers),
    ``future_images`` (images not buffered: stamp in the future); dropped sweeps are handed out
    by :meth:`take_drops`.
    """

    def __init__(self, camera_names: Sequence[str], slop_s: float = 0.05,
                 missing_camera: str = "zero_fill", wait_timeout_s: float = 0.1,
                 max_image_age_s: float = 0.5, buffer_size: int = 10,
                 backwards_tolerance_s: float = 1.0, max_future_s: float = 5.0) -> None:
        self.camera_names = _validate_camera_names(camera_names)
        if missing_camera not in MISSING_CAMERA_POLICIES:
            raise ValueError(f"unknown missing_camera policy {missing_camera!r}; "
                             f"expected one of {', '.join(MISSING_CAMERA_POLICIES)}")
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be an integer >= 1, got {buffer_size!r}")
        self.missing_camera = missing_camera
        self.slop_ns = _seconds_to_ns("slop_s", slop_s)
        self.wait_timeout_ns = _seconds_to_ns("wait_timeout_s", wait_timeout_s)
        self.max_image_age_ns = _seconds_to_ns("max_image_age_s", max_image_age_s)
        self.backwards_tolerance_ns = _seconds_to_ns("backwards_tolerance_s", backwards_tolerance_s)
        self.max_future_ns = _seconds_to_ns("max_future_s", max_future_s)
        self.buffer_size = buffer_size
        self._buffers = {name: _ImageBuffer(buffer_size) for name in self.camera_names}
        self._pending: _PendingSweep | None = None
        self._last_lidar_stamp_ns: int | None = None
        self.emitted = 0
        self.resets = 0
        self.dropped_images = 0
        self.future_images = 0
        self.last_reset_reason = ""
        self._drops: list[DroppedSweep] = []

    # ----------------------------------------------------------------------------- public API

    @property
    def pending_lidar_stamp_ns(self) -> int | None:
        """Stamp (ns) of the sweep waiting for images under the wait policy, or None."""
        return self._pending.stamp_ns if self._pending is not None else None

    def buffered_image_count(self, camera: str) -> int:
        """Number of images currently buffered for ``camera``."""
        return len(self._buffer_of(camera))

    def take_drops(self) -> list[DroppedSweep]:
        """The sweeps dropped since the last call, oldest first (the list is then emptied)."""
        drops, self._drops = self._drops, []
        return drops

    def add_image(self, camera: str, stamp_ns: int, message: object,
                  clock_ns: int | None = None) -> list[SyncedFrame]:
        """Buffer one camera image (stamp in ns; ``clock_ns`` the receiver's clock in the same
        time base, None when unknown); returns the pending sweep if it is now complete."""
        buffer = self._buffer_of(camera)
        stamp_ns = operator.index(stamp_ns)
        if self._future_by_ns(stamp_ns, clock_ns) is not None:
            self.future_images += 1
            return []
        newest = buffer.newest_stamp_ns
        if newest is not None and newest - stamp_ns > self.backwards_tolerance_ns:
            self._reset(f"camera {camera} stamp went backwards by {(newest - stamp_ns) / NS_PER_S:.6f} s "
                        f"(newest buffered {newest} ns, got {stamp_ns} ns)")
        self.dropped_images += buffer.insert(stamp_ns, message)
        return self._emit_pending_if_complete()

    def add_lidar(self, stamp_ns: int, message: object, now_ns: int,
                  clock_ns: int | None = None) -> list[SyncedFrame]:
        """Match one lidar sweep (stamp in ns; ``now_ns`` the receiver's monotonic clock in ns,
        for the wait timeout; ``clock_ns`` its clock in the stamps' time base, None when
        unknown); a sweep that cannot be emitted goes to :meth:`take_drops` (module docstring)."""
        stamp_ns = operator.index(stamp_ns)
        now_ns = operator.index(now_ns)
        if self._lidar_dropped(stamp_ns, clock_ns):
            return []
        last = self._last_lidar_stamp_ns
        if last is not None and stamp_ns < last:
            self._reset(f"lidar stamp went backwards by {(last - stamp_ns) / NS_PER_S:.6f} s "
                        f"(last {last} ns, got {stamp_ns} ns)")
        self._last_lidar_stamp_ns = stamp_ns
        frames = self._emit_superseded_pending()
        matches = self._match_all(stamp_ns)
        if self.missing_camera == "wait" and not self._all_matched(matches):
            self._pending = _PendingSweep(stamp_ns, message, now_ns)
            return frames
        frames.append(self._emit(stamp_ns, message, matches))
        return frames

    def poll(self, now_ns: int) -> list[SyncedFrame]:
        """Emit the pending sweep as a zero_fill frame once it has waited ``wait_timeout_s``."""
        pending = self._pending
        if pending is None or operator.index(now_ns) - pending.arrival_now_ns < self.wait_timeout_ns:
            return []
        self._pending = None
        return [self._emit_zero_fill(pending.stamp_ns, pending.message, self._match_all(pending.stamp_ns))]

    # ---------------------------------------------------------------------- stamps checked

    def _future_by_ns(self, stamp_ns: int, clock_ns: int | None) -> int | None:
        """How far ``stamp_ns`` is ahead of ``clock_ns`` when beyond ``max_future_s``, else None."""
        if not self.max_future_ns or not clock_ns:
            return None
        ahead = stamp_ns - operator.index(clock_ns)
        return ahead if ahead > self.max_future_ns else None

    def _lidar_dropped(self, stamp_ns: int, clock_ns: int | None) -> bool:
        """Record a :class:`DroppedSweep` if the sweep at ``stamp_ns`` cannot be emitted."""
        ahead = self._future_by_ns(stamp_ns, clock_ns)
        last = self._last_lidar_stamp_ns
        if ahead is not None:
            drop = DroppedSweep(stamp_ns, DROP_FUTURE,
                                f"lidar stamp {stamp_ns} ns is {ahead / NS_PER_S:.3f} s in the future of "
                                f"the node's clock (limit node.sync.max_future_s = "
                                f"{self.max_future_ns / NS_PER_S:g} s)")
        elif last is not None and stamp_ns == last:
            drop = DroppedSweep(stamp_ns, DROP_DUPLICATE,
                                f"lidar stamp {stamp_ns} ns is a duplicate of the previous sweep's")
        elif last is not None and 0 < last - stamp_ns <= self.backwards_tolerance_ns:
            drop = DroppedSweep(stamp_ns, DROP_OUT_OF_ORDER,
                                f"lidar stamp {stamp_ns} ns is {(last - stamp_ns) / NS_PER_S:.3f} s older "
                                f"than the previous sweep's: out of order (within "
                                f"node.sync.backwards_tolerance_s = "
                                f"{self.backwards_tolerance_ns / NS_PER_S:g} s, so not a time reset)")
        else:
            return False
        self._drops.append(drop)
        return True

    # ------------------------------------------------------------------------------- matching

    def _buffer_of(self, camera: str) -> _ImageBuffer:
        try:
            return self._buffers[camera]
        except KeyError:
            raise ValueError(f"unknown camera {camera!r}; expected one of "
                             f"{', '.join(self.camera_names)}") from None

    def _match_camera(self, camera: str, lidar_stamp_ns: int) -> _Match:
        """Nearest image of ``camera`` within slop and not stale, else the missing reason."""
        nearest = self._buffers[camera].nearest(lidar_stamp_ns)
        if nearest is None or abs(nearest[0] - lidar_stamp_ns) > self.slop_ns:
            return _Match(reason=REASON_NO_MATCH)
        image_stamp_ns, message = nearest
        if lidar_stamp_ns - image_stamp_ns > self.max_image_age_ns:
            return _Match(reason=REASON_STALE)
        return _Match(stamp_ns=image_stamp_ns, message=message)

    def _match_all(self, lidar_stamp_ns: int) -> dict[str, _Match]:
        return {name: self._match_camera(name, lidar_stamp_ns) for name in self.camera_names}

    @staticmethod
    def _all_matched(matches: dict[str, _Match]) -> bool:
        return all(match.reason is None for match in matches.values())

    # ------------------------------------------------------------------------------- emitting

    def _emit(self, lidar_stamp_ns: int, lidar: object, matches: dict[str, _Match]) -> SyncedFrame:
        """Frame under the configured policy (wait emits complete frames, i.e. like zero_fill)."""
        if self.missing_camera == "lidar_only":
            return self._emit_lidar_only(lidar_stamp_ns, lidar, matches)
        return self._emit_zero_fill(lidar_stamp_ns, lidar, matches)

    def _emit_zero_fill(self, lidar_stamp_ns: int, lidar: object, matches: dict[str, _Match],
                        missing_reason: str | None = None) -> SyncedFrame:
        """Frame using every matched camera; ``missing_reason`` overrides the per-camera reasons."""
        missing = {name: missing_reason or match.reason for name, match in matches.items()
                   if match.reason is not None}
        return self._count(SyncedFrame(
            lidar_stamp_ns=lidar_stamp_ns, lidar=lidar,
            images={name: match.message for name, match in matches.items()},
            image_stamps_ns={name: match.stamp_ns for name, match in matches.items()},
            missing=missing))

    def _emit_lidar_only(self, lidar_stamp_ns: int, lidar: object,
                         matches: dict[str, _Match]) -> SyncedFrame:
        """All cameras if all matched, else none (every camera missing with the same reason)."""
        missing_cameras = [name for name, match in matches.items() if match.reason is not None]
        if not missing_cameras:
            return self._emit_zero_fill(lidar_stamp_ns, lidar, matches)
        reason = _lidar_only_reason(missing_cameras)
        return self._count(SyncedFrame(
            lidar_stamp_ns=lidar_stamp_ns, lidar=lidar,
            images={name: None for name in self.camera_names},
            image_stamps_ns={name: None for name in self.camera_names},
            missing={name: reason for name in self.camera_names}))

    def _emit_superseded_pending(self) -> list[SyncedFrame]:
        """Emit the pending sweep (if any) as zero_fill, missing cameras marked superseded."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        matches = self._match_all(pending.stamp_ns)
        return [self._emit_zero_fill(pending.stamp_ns, pending.message, matches, REASON_SUPERSEDED)]

    def _emit_pending_if_complete(self) -> list[SyncedFrame]:
        pending = self._pending
        if pending is None:
            return []
        matches = self._match_all(pending.stamp_ns)
        if not self._all_matched(matches):
            return []
        self._pending = None
        return [self._emit_zero_fill(pending.stamp_ns, pending.message, matches)]

    def _count(self, frame: SyncedFrame) -> SyncedFrame:
        self.emitted += 1
        return frame

    # -------------------------------------------------------------------------------- resets

    def _reset(self, reason: str) -> None:
        """Forget every buffered image, the pending sweep and the last lidar stamp."""
        for buffer in self._buffers.values():
            buffer.clear()
        if self._pending is not None:
            self._drops.append(DroppedSweep(self._pending.stamp_ns, DROP_RESET,
                                            f"pending sweep dropped by a time reset: {reason}"))
        self._pending = None
        self._last_lidar_stamp_ns = None
        self.resets += 1
        self.last_reset_reason = reason
