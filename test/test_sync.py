"""LidarTriggeredSync: matching, missing-camera policies, resets and buffers (no ROS).

Stamps are hand-computed in milliseconds and converted to integer nanoseconds with ``ms()``.
"""
from __future__ import annotations

import dataclasses
import random

import pytest

from bevfusion_ros.streaming.sync import (
    DROP_DUPLICATE,
    DROP_FUTURE,
    DROP_OUT_OF_ORDER,
    DROP_RESET,
    MISSING_CAMERA_POLICIES,
    REASON_NO_MATCH,
    REASON_STALE,
    REASON_SUPERSEDED,
    LidarTriggeredSync,
    SyncedFrame,
)

MS = 1_000_000  # nanoseconds per millisecond
S = 1_000_000_000  # nanoseconds per second


def ms(value: float) -> int:
    """Milliseconds -> integer nanoseconds."""
    return int(round(value * MS))


def image(camera: str, stamp_ns: int) -> tuple[str, str, int]:
    """An opaque, recognisable message for an image."""
    return ("image", camera, stamp_ns)


def add_images(sync: LidarTriggeredSync, camera: str, *stamps_ns: int) -> list[SyncedFrame]:
    frames: list[SyncedFrame] = []
    for stamp_ns in stamps_ns:
        frames += sync.add_image(camera, stamp_ns, image(camera, stamp_ns))
    return frames


def only(frames: list[SyncedFrame]) -> SyncedFrame:
    assert len(frames) == 1, frames
    return frames[0]


# ----------------------------------------------------------------------------- nearest match

def test_nearest_stamp_is_chosen_per_camera():
    sync = LidarTriggeredSync(["front", "back"], slop_s=0.05)
    add_images(sync, "front", ms(0), ms(40), ms(100))   # |diff| to 55: 55, 15, 45 -> 40
    add_images(sync, "back", ms(70), ms(50))            # |diff| to 55: 15, 5 -> 50
    frame = only(sync.add_lidar(ms(55), "sweep", now_ns=0))
    assert frame.lidar_stamp_ns == ms(55) and frame.lidar == "sweep"
    assert frame.image_stamps_ns == {"front": ms(40), "back": ms(50)}
    assert frame.images == {"front": image("front", ms(40)), "back": image("back", ms(50))}
    assert frame.missing == {}
    assert frame.cameras_used == ("front", "back")
    assert list(frame.images) == ["front", "back"]  # constructor order


def test_tie_prefers_earlier_stamp_regardless_of_arrival_order():
    sync = LidarTriggeredSync(["a", "b"], slop_s=0.05)
    add_images(sync, "a", ms(90), ms(110))
    add_images(sync, "b", ms(110), ms(90))
    frame = only(sync.add_lidar(ms(100), "sweep", now_ns=0))
    assert frame.image_stamps_ns == {"a": ms(90), "b": ms(90)}


def test_image_after_lidar_can_match():
    sync = LidarTriggeredSync(["a"], slop_s=0.05)
    add_images(sync, "a", ms(60), ms(130))  # |diff| to 100: 40, 30 -> 130
    assert only(sync.add_lidar(ms(100), "sweep", now_ns=0)).image_stamps_ns == {"a": ms(130)}


@pytest.mark.parametrize("offset_ns, accepted", [
    (-50 * MS, True), (50 * MS, True), (-50 * MS - 1, False), (50 * MS + 1, False), (0, True)])
def test_slop_boundary(offset_ns, accepted):
    sync = LidarTriggeredSync(["a"], slop_s=0.05)
    lidar_ns = 10 * S
    add_images(sync, "a", lidar_ns + offset_ns)
    frame = only(sync.add_lidar(lidar_ns, "sweep", now_ns=0))
    if accepted:
        assert frame.image_stamps_ns == {"a": lidar_ns + offset_ns} and frame.missing == {}
    else:
        assert frame.images == {"a": None} and frame.image_stamps_ns == {"a": None}
        assert frame.missing == {"a": REASON_NO_MATCH}


def test_images_are_reused_across_sweeps():
    sync = LidarTriggeredSync(["a"], slop_s=0.05)
    add_images(sync, "a", ms(100))
    first = only(sync.add_lidar(ms(80), "s1", now_ns=0))
    second = only(sync.add_lidar(ms(120), "s2", now_ns=0))
    assert first.image_stamps_ns == second.image_stamps_ns == {"a": ms(100)}
    assert sync.emitted == 2


# ---------------------------------------------------------------------------------- policies

def test_zero_fill_with_a_camera_never_published():
    sync = LidarTriggeredSync(["a", "b", "c"], slop_s=0.05, missing_camera="zero_fill")
    add_images(sync, "a", ms(100))
    add_images(sync, "c", ms(95))
    frame = only(sync.add_lidar(ms(100), "sweep", now_ns=0))
    assert frame.images == {"a": image("a", ms(100)), "b": None, "c": image("c", ms(95))}
    assert frame.image_stamps_ns == {"a": ms(100), "b": None, "c": ms(95)}
    assert frame.missing == {"b": REASON_NO_MATCH}
    assert frame.cameras_used == ("a", "c")


def test_lidar_only_uses_no_camera_when_one_is_missing():
    sync = LidarTriggeredSync(["a", "b", "c"], slop_s=0.05, missing_camera="lidar_only")
    add_images(sync, "a", ms(100))
    add_images(sync, "c", ms(95))
    frame = only(sync.add_lidar(ms(100), "sweep", now_ns=0))
    assert frame.images == {"a": None, "b": None, "c": None}
    assert frame.image_stamps_ns == {"a": None, "b": None, "c": None}
    assert frame.cameras_used == ()
    assert set(frame.missing) == {"a", "b", "c"}
    assert frame.missing["a"] == frame.missing["b"] == frame.missing["c"] == "lidar_only: camera b missing"


def test_lidar_only_names_every_missing_camera():
    sync = LidarTriggeredSync(["a", "b", "c"], slop_s=0.05, missing_camera="lidar_only")
    add_images(sync, "b", ms(100))
    frame = only(sync.add_lidar(ms(100), "sweep", now_ns=0))
    assert frame.missing["b"] == "lidar_only: cameras a, c missing"


def test_lidar_only_uses_all_cameras_when_all_match():
    sync = LidarTriggeredSync(["a", "b"], slop_s=0.05, missing_camera="lidar_only")
    add_images(sync, "a", ms(100))
    add_images(sync, "b", ms(130))
    frame = only(sync.add_lidar(ms(100), "sweep", now_ns=0))
    assert frame.cameras_used == ("a", "b") and frame.missing == {}
    assert frame.image_stamps_ns == {"a": ms(100), "b": ms(130)}


def test_wait_emits_a_complete_sweep_immediately():
    sync = LidarTriggeredSync(["a", "b"], missing_camera="wait")
    add_images(sync, "a", ms(100))
    add_images(sync, "b", ms(101))
    frame = only(sync.add_lidar(ms(100), "sweep", now_ns=ms(500)))
    assert frame.cameras_used == ("a", "b")
    assert sync.pending_lidar_stamp_ns is None


def test_wait_completed_by_add_image():
    sync = LidarTriggeredSync(["a", "b"], slop_s=0.05, missing_camera="wait")
    add_images(sync, "a", ms(100))
    assert sync.add_lidar(ms(100), "sweep", now_ns=ms(1000)) == []
    assert sync.pending_lidar_stamp_ns == ms(100)
    assert add_images(sync, "b", ms(151)) == []          # 51 ms away: outside slop
    assert add_images(sync, "a", ms(110)) == []          # a already matched; b still missing
    frame = only(add_images(sync, "b", ms(140)))         # 40 ms away: completes the sweep
    assert frame.lidar_stamp_ns == ms(100) and frame.lidar == "sweep"
    assert frame.image_stamps_ns == {"a": ms(100), "b": ms(140)}
    assert frame.missing == {}
    assert sync.pending_lidar_stamp_ns is None
    assert sync.poll(ms(5000)) == []
    assert sync.emitted == 1


def test_wait_emitted_by_poll_after_timeout():
    sync = LidarTriggeredSync(["a", "b"], slop_s=0.05, missing_camera="wait", wait_timeout_s=0.1)
    add_images(sync, "a", ms(100))
    assert sync.add_lidar(ms(100), "sweep", now_ns=ms(1000)) == []
    assert sync.poll(ms(1000)) == []
    assert sync.poll(ms(1100) - 1) == []                 # 1 ns before the timeout
    frame = only(sync.poll(ms(1100)))                     # exactly the timeout
    assert frame.lidar == "sweep"
    assert frame.images == {"a": image("a", ms(100)), "b": None}
    assert frame.missing == {"b": REASON_NO_MATCH}
    assert sync.poll(ms(2000)) == []                     # emitted once only
    assert sync.pending_lidar_stamp_ns is None


def test_wait_with_a_camera_never_published_never_blocks():
    sync = LidarTriggeredSync(["a", "b"], slop_s=0.05, missing_camera="wait", wait_timeout_s=0.1)
    frames: list[SyncedFrame] = []
    for k in range(5):  # 10 Hz lidar, camera a in step, camera b dead; poll every 50 ms
        add_images(sync, "a", ms(100 * k))
        frames += sync.add_lidar(ms(100 * k), f"s{k}", now_ns=ms(100 * k))
        frames += sync.poll(ms(100 * k + 50))
    frames += sync.poll(ms(10_000))
    assert [frame.lidar for frame in frames] == [f"s{k}" for k in range(5)]
    assert all(frame.cameras_used == ("a",) for frame in frames)


def test_wait_superseded_by_newer_sweep():
    sync = LidarTriggeredSync(["a", "b"], slop_s=0.05, missing_camera="wait", wait_timeout_s=1.0)
    add_images(sync, "a", ms(100))
    assert sync.add_lidar(ms(100), "s1", now_ns=ms(100)) == []
    add_images(sync, "a", ms(200))
    add_images(sync, "b", ms(200))
    superseded, complete = sync.add_lidar(ms(200), "s2", now_ns=ms(200))
    assert superseded.lidar == "s1"
    assert superseded.images == {"a": image("a", ms(100)), "b": None}
    assert superseded.missing == {"b": REASON_SUPERSEDED}
    assert complete.lidar == "s2" and complete.cameras_used == ("a", "b")
    assert sync.pending_lidar_stamp_ns is None
    assert sync.emitted == 2


def test_wait_superseded_then_new_sweep_pending():
    sync = LidarTriggeredSync(["a", "b"], slop_s=0.05, missing_camera="wait", wait_timeout_s=1.0)
    assert sync.add_lidar(ms(100), "s1", now_ns=ms(100)) == []
    superseded = only(sync.add_lidar(ms(200), "s2", now_ns=ms(200)))
    assert superseded.lidar == "s1"
    assert superseded.missing == {"a": REASON_SUPERSEDED, "b": REASON_SUPERSEDED}
    assert sync.pending_lidar_stamp_ns == ms(200)
    assert sync.poll(ms(1199)) == []                     # timeout counts from s2's arrival
    assert only(sync.poll(ms(1200))).lidar == "s2"


# ------------------------------------------------------------------------------------ stale

def test_stale_image_within_slop_is_missing():
    sync = LidarTriggeredSync(["a", "b", "c"], slop_s=1.0, max_image_age_s=0.5)
    lidar_ns = 10 * S
    add_images(sync, "a", lidar_ns - ms(500))       # exactly max age: used
    add_images(sync, "b", lidar_ns - ms(500) - 1)   # 1 ns older than max age: stale
    add_images(sync, "c", lidar_ns + ms(800))       # newer than the lidar: never stale
    frame = only(sync.add_lidar(lidar_ns, "sweep", now_ns=0))
    assert frame.image_stamps_ns == {"a": lidar_ns - ms(500), "b": None, "c": lidar_ns + ms(800)}
    assert frame.missing == {"b": REASON_STALE}


def test_stale_camera_keeps_wait_pending_until_fresh_image():
    sync = LidarTriggeredSync(["a"], slop_s=1.0, max_image_age_s=0.5, missing_camera="wait")
    add_images(sync, "a", ms(400))
    assert sync.add_lidar(ms(1000), "sweep", now_ns=0) == []   # 600 ms old: stale
    frame = only(add_images(sync, "a", ms(1300)))              # |diff| 300 < 600
    assert frame.image_stamps_ns == {"a": ms(1300)}


# ----------------------------------------------------------------------------------- resets

def test_lidar_going_backwards_resets_and_next_frame_is_processed():
    sync = LidarTriggeredSync(["a", "b"], slop_s=0.05)
    add_images(sync, "a", 10 * S)
    add_images(sync, "b", 10 * S)
    assert only(sync.add_lidar(10 * S, "s1", now_ns=0)).cameras_used == ("a", "b")
    looped = only(sync.add_lidar(1 * S, "s2", now_ns=0))   # bag loop: 9 s back
    assert sync.resets == 1
    assert "lidar" in sync.last_reset_reason and "backwards" in sync.last_reset_reason
    assert looped.lidar == "s2"
    assert looped.missing == {"a": REASON_NO_MATCH, "b": REASON_NO_MATCH}  # old images forgotten
    add_images(sync, "a", 1 * S + ms(100))
    add_images(sync, "b", 1 * S + ms(110))
    frame = only(sync.add_lidar(1 * S + ms(100), "s3", now_ns=0))
    assert frame.image_stamps_ns == {"a": 1 * S + ms(100), "b": 1 * S + ms(110)}
    assert sync.resets == 1


def drop_reasons(sync: LidarTriggeredSync) -> list[tuple[int, str]]:
    return [(drop.stamp_ns, drop.reason) for drop in sync.take_drops()]


def test_repeated_lidar_stamp_is_dropped_as_duplicate_not_a_reset():
    sync = LidarTriggeredSync(["a"])
    assert only(sync.add_lidar(ms(100), "s1", now_ns=0)).lidar == "s1"
    assert sync.add_lidar(ms(100), "s2", now_ns=0) == []
    assert drop_reasons(sync) == [(ms(100), DROP_DUPLICATE)]
    assert sync.resets == 0 and sync.last_reset_reason == "" and sync.emitted == 1
    assert sync.take_drops() == []                       # handed out once


def test_lidar_jitter_backwards_within_tolerance_is_dropped_and_keeps_the_images():
    """A sweep 30 ms older than the last one (defect: it cleared every image buffer, so the next
    good frame ran with every camera black) is dropped; the next sweep still finds its images."""
    sync = LidarTriggeredSync(["a", "b"], slop_s=0.05, backwards_tolerance_s=0.5)
    add_images(sync, "a", ms(1000), ms(1100))
    add_images(sync, "b", ms(1000), ms(1100))
    only(sync.add_lidar(ms(1000), "s1", now_ns=0))
    assert sync.add_lidar(ms(970), "late", now_ns=0) == []
    drops = sync.take_drops()
    assert [(d.stamp_ns, d.reason) for d in drops] == [(ms(970), DROP_OUT_OF_ORDER)]
    assert "0.030 s older" in drops[0].detail and "backwards_tolerance_s" in drops[0].detail
    assert sync.resets == 0
    frame = only(sync.add_lidar(ms(1100), "s2", now_ns=0))
    assert frame.missing == {} and frame.image_stamps_ns == {"a": ms(1100), "b": ms(1100)}
    assert sync.add_lidar(ms(1100) - ms(500), "at tolerance", now_ns=0) == []   # exactly 0.5 s: dropped
    assert sync.add_lidar(ms(1100) - ms(500) - 1, "beyond", now_ns=0) != []     # 1 ns more: a reset
    assert sync.resets == 1


def test_future_lidar_stamp_is_dropped_and_does_not_poison_later_sweeps():
    """A sweep a day ahead of the clock (defect: the next good sweep counted as going backwards
    and cleared every buffer) is dropped; without a clock there is no check."""
    day = 86_400 * S
    sync = LidarTriggeredSync(["a"], slop_s=0.05, max_future_s=5.0)
    add_images(sync, "a", 100 * S)
    assert sync.add_lidar(100 * S + day, "future", now_ns=0, clock_ns=100 * S) == []
    drops = sync.take_drops()
    assert [(d.stamp_ns, d.reason) for d in drops] == [(100 * S + day, DROP_FUTURE)]
    assert "86400.000 s in the future" in drops[0].detail
    frame = only(sync.add_lidar(100 * S, "good", now_ns=0, clock_ns=100 * S))
    assert frame.missing == {} and sync.resets == 0
    assert only(sync.add_lidar(101 * S + 5 * S, "5 s ahead", now_ns=0, clock_ns=101 * S))   # at the limit
    assert only(sync.add_lidar(200 * S + day, "no clock", now_ns=0, clock_ns=None))


def test_future_image_is_not_buffered():
    day = 86_400 * S
    sync = LidarTriggeredSync(["a"], slop_s=0.05)
    add_images(sync, "a", 100 * S)
    assert sync.add_image("a", 100 * S + day, "future", clock_ns=100 * S) == []
    assert sync.future_images == 1 and sync.buffered_image_count("a") == 1
    sync.add_image("a", 100 * S + ms(100), "next", clock_ns=100 * S)   # not "backwards by a day"
    assert sync.resets == 0 and sync.buffered_image_count("a") == 2


def test_zero_max_future_disables_the_check():
    sync = LidarTriggeredSync(["a"], max_future_s=0.0)
    assert only(sync.add_lidar(10**6 * S, "far", now_ns=0, clock_ns=S))


def test_image_going_backwards_more_than_one_second_resets():
    sync = LidarTriggeredSync(["a", "b"], slop_s=0.05)
    add_images(sync, "a", 10 * S)
    add_images(sync, "b", 10 * S)
    add_images(sync, "a", 9 * S)                 # exactly 1 s older: out of order, not a reset
    assert sync.resets == 0
    assert sync.buffered_image_count("a") == 2
    add_images(sync, "a", 9 * S - 1)             # 1 s + 1 ns older: reset
    assert sync.resets == 1
    assert "camera a" in sync.last_reset_reason
    assert sync.buffered_image_count("a") == 1   # the new image, kept after the reset
    assert sync.buffered_image_count("b") == 0
    # The lidar stamp memory was cleared too: the looped lidar does not reset a second time.
    add_images(sync, "b", 9 * S)
    frame = only(sync.add_lidar(9 * S, "sweep", now_ns=0))
    assert frame.image_stamps_ns == {"a": 9 * S - 1, "b": 9 * S}
    assert sync.resets == 1


def test_reset_drops_pending_sweep():
    sync = LidarTriggeredSync(["a", "b"], missing_camera="wait")
    add_images(sync, "a", 10 * S)
    assert sync.add_lidar(10 * S, "s1", now_ns=0) == []
    assert sync.add_lidar(2 * S, "s2", now_ns=0) == []    # reset: s1 dropped, s2 pending
    assert sync.resets == 1 and sync.pending_lidar_stamp_ns == 2 * S
    assert drop_reasons(sync) == [(10 * S, DROP_RESET)]
    assert [frame.lidar for frame in sync.poll(10 * S)] == ["s2"]
    assert sync.emitted == 1


# ---------------------------------------------------------------------------------- buffers

def test_buffer_keeps_newest_and_counts_evictions():
    sync = LidarTriggeredSync(["a"], slop_s=0.05, buffer_size=3)
    add_images(sync, "a", ms(0), ms(100), ms(200), ms(300), ms(400))
    assert sync.dropped_images == 2
    assert sync.buffered_image_count("a") == 3
    assert only(sync.add_lidar(ms(10), "s", now_ns=0)).missing == {"a": REASON_NO_MATCH}  # 0 evicted
    assert only(sync.add_lidar(ms(210), "s", now_ns=0)).image_stamps_ns == {"a": ms(200)}
    add_images(sync, "a", ms(150))   # older than the whole full buffer: dropped at once
    assert sync.dropped_images == 3
    assert only(sync.add_lidar(ms(220), "s", now_ns=0)).image_stamps_ns == {"a": ms(200)}
    add_images(sync, "a", ms(250))   # out of order but newer than the oldest: evicts 200
    assert sync.dropped_images == 4
    assert only(sync.add_lidar(ms(230), "s", now_ns=0)).image_stamps_ns == {"a": ms(250)}


def test_same_stamp_replaces_image():
    sync = LidarTriggeredSync(["a"], buffer_size=2)
    sync.add_image("a", ms(100), "old")
    sync.add_image("a", ms(100), "new")
    assert sync.buffered_image_count("a") == 1 and sync.dropped_images == 0
    assert only(sync.add_lidar(ms(100), "s", now_ns=0)).images == {"a": "new"}


def test_buffers_are_per_camera():
    sync = LidarTriggeredSync(["a", "b"], buffer_size=2)
    add_images(sync, "a", ms(0), ms(10), ms(20))
    add_images(sync, "b", ms(0))
    assert sync.buffered_image_count("a") == 2 and sync.buffered_image_count("b") == 1
    assert sync.dropped_images == 1


# ------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, message", [
    ({"camera_names": []}, "empty"),
    ({"camera_names": ["a", "b", "a"]}, "duplicate"),
    ({"camera_names": "front"}, "sequence"),
    ({"camera_names": ["a", ""]}, "non-empty"),
    ({"camera_names": ["a"], "missing_camera": "drop"}, "unknown missing_camera"),
    ({"camera_names": ["a"], "slop_s": -0.001}, "slop_s"),
    ({"camera_names": ["a"], "slop_s": float("nan")}, "slop_s"),
    ({"camera_names": ["a"], "wait_timeout_s": -1.0}, "wait_timeout_s"),
    ({"camera_names": ["a"], "max_image_age_s": -0.5}, "max_image_age_s"),
    ({"camera_names": ["a"], "buffer_size": 0}, "buffer_size"),
    ({"camera_names": ["a"], "buffer_size": 2.5}, "buffer_size"),
    ({"camera_names": ["a"], "backwards_tolerance_s": -0.1}, "backwards_tolerance_s"),
    ({"camera_names": ["a"], "max_future_s": float("inf")}, "max_future_s"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LidarTriggeredSync(**kwargs)


def test_policies_constant_and_zero_durations_accepted():
    assert set(MISSING_CAMERA_POLICIES) == {"wait", "zero_fill", "lidar_only"}
    for policy in MISSING_CAMERA_POLICIES:
        LidarTriggeredSync(["a"], slop_s=0.0, missing_camera=policy, wait_timeout_s=0.0,
                           max_image_age_s=0.0, buffer_size=1)


def test_unknown_camera_rejected():
    sync = LidarTriggeredSync(["a"])
    with pytest.raises(ValueError, match="unknown camera 'z'"):
        sync.add_image("z", 0, "msg")


def test_synced_frame_is_frozen():
    frame = only(LidarTriggeredSync(["a"]).add_lidar(0, "s", now_ns=0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.lidar = "other"  # type: ignore[misc]


# ------------------------------------------------------------------- brute-force reference

def reference_match(images: list[int], lidar_ns: int, buffer_size: int, slop_ns: int,
                    max_age_ns: int) -> tuple[int | None, str | None]:
    """O(N^2) reference: (stamp, None) or (None, reason) for one camera.

    ``images`` holds every stamp added so far (distinct); the buffer is the newest
    ``buffer_size`` of them. The nearest is found by scanning every candidate against every
    other (earlier stamp on a tie).
    """
    buffered = [s for s in images if sum(other > s for other in images) < buffer_size]
    best = None
    for candidate in buffered:
        if all(abs(candidate - lidar_ns) < abs(other - lidar_ns)
               or (abs(candidate - lidar_ns) == abs(other - lidar_ns) and candidate <= other)
               for other in buffered):
            best = candidate
    if best is None or abs(best - lidar_ns) > slop_ns:
        return None, REASON_NO_MATCH
    if lidar_ns - best > max_age_ns:
        return None, REASON_STALE
    return best, None


@pytest.mark.parametrize("seed", range(20))
def test_matches_agree_with_brute_force_reference(seed):
    rng = random.Random(seed)
    cameras = ["c0", "c1", "c2"]
    buffer_size = rng.randint(1, 6)
    slop_ns = rng.choice([ms(5), ms(20), ms(50), ms(300)])
    max_age_ns = rng.choice([ms(10), ms(100), ms(1000)])
    sync = LidarTriggeredSync(cameras, slop_s=slop_ns / S, max_image_age_s=max_age_ns / S,
                              buffer_size=buffer_size)
    added: dict[str, list[int]] = {camera: [] for camera in cameras}
    t_ms = 0.0
    lidar_ns = 0
    for _ in range(300):
        t_ms += rng.uniform(0, 15)
        if rng.random() < 0.2:
            lidar_ns = max(lidar_ns + 1, ms(t_ms + rng.uniform(-30, 30)))  # always forwards
            frame = only(sync.add_lidar(lidar_ns, "sweep", now_ns=0))
            for camera in cameras:
                stamp, reason = reference_match(added[camera], lidar_ns, buffer_size, slop_ns, max_age_ns)
                assert frame.image_stamps_ns[camera] == stamp
                assert frame.missing.get(camera) == reason
                assert frame.images[camera] == (image(camera, stamp) if stamp is not None else None)
        else:
            camera = rng.choice(cameras)
            stamp = ms(t_ms + rng.uniform(-40, 40))  # jittered, sometimes out of order
            if stamp in added[camera]:
                continue
            added[camera].append(stamp)
            sync.add_image(camera, stamp, image(camera, stamp))
    assert sync.resets == 0
    expected_dropped = sum(max(0, len(stamps) - buffer_size) for stamps in added.values())
    assert sync.dropped_images == expected_dropped
