"""Frame assembly (ROS-free): converted sensor inputs in, complete pipeline :class:`Frame`\\ s out.

The node, the bag reader (:mod:`bevfusion_ros.ros.bag_frames`) and the batch mode feed a
:class:`FrameAssembler` the same way:

* inputs, from any thread, never blocking: :meth:`~FrameAssembler.add_image` (an RGB array, an
  :class:`EncodedImage` such as a JPEG, or the :class:`ImageError` of an unreadable one),
  :meth:`~FrameAssembler.set_intrinsics` / :meth:`~FrameAssembler.reject_intrinsics` /
  :meth:`~FrameAssembler.refuse_distortion` (CameraInfo K and lens distortion),
  :meth:`~FrameAssembler.add_transform` (TF), :meth:`~FrameAssembler.add_cloud` (points as
  decoded arrays) and :meth:`~FrameAssembler.poll` on a timer. Each returns an :class:`Ingest`:
  the sweeps now synchronised (``frames``), and what was dropped or reset, for the caller to report;
* :meth:`~FrameAssembler.assemble` (the worker) turns one synchronised sweep into an
  :class:`AssembledFrame`: past sweeps motion-compensated with TF odometry
  (:class:`~bevfusion_ros.streaming.sweeps.SweepAccumulator`), images decoded and checked, the
  calibration from CameraInfo K and distortion + TF (or the calibration file), and why cameras are
  missing.

Synchronisation is :class:`~bevfusion_ros.streaming.sync.LidarTriggeredSync`; the policies are
documented there and in ``docs/node.md``.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bevfusion_ros.camera.jpeg import ImageDecoder, ImageError
from bevfusion_ros.config import PipelineConfig
from bevfusion_ros.io.calibration import Calibration, CalibrationError, calibration_from_yaml
from bevfusion_ros.io.distortion import Distortion
from bevfusion_ros.io.frame import Frame, black_image
from bevfusion_ros.streaming.node_config import NodeConfig
from bevfusion_ros.streaming.sweeps import SweepAccumulator
from bevfusion_ros.streaming.sync import DROP_RESET, DroppedSweep, LidarTriggeredSync, SyncedFrame
from bevfusion_ros.streaming.transforms import TransformBuffer

#: Stand-in calibration of a camera without CameraInfo/TF yet: its image is black anyway.
PLACEHOLDER_K = np.array([[1000.0, 0, 800], [0, 1000, 450], [0, 0, 1]])


@dataclass(frozen=True)
class EncodedImage:
    """A compressed image (JPEG, PNG, ...) decoded at assembly, all cameras of a frame at once."""

    data: Any            # bytes or a uint8 array
    format: str = ""


@dataclass(frozen=True, eq=False)
class Sweep:
    """One lidar sweep as fed to :meth:`FrameAssembler.add_cloud`: ``points`` float32 [N, >=4]
    in ``frame_id``; ``received_s`` when it arrived (``time.monotonic()``: the odometry wait is
    counted from it); ``warnings`` from its conversion; ``context`` is the caller's (e.g. timings)."""

    stamp_ns: int
    frame_id: str
    points: np.ndarray
    received_s: float
    warnings: tuple[str, ...] = ()
    context: Any = None


@dataclass
class Ingest:
    """What one input did: ``frames`` synchronised now (for :meth:`FrameAssembler.assemble`),
    sweeps ``drops``-ped, ``reset`` (why the buffers were cleared: time went backwards) and
    ``image_refused`` (an image stamped too far in the future)."""

    frames: list[SyncedFrame] = field(default_factory=list)
    drops: list[DroppedSweep] = field(default_factory=list)
    reset: str | None = None
    image_refused: bool = False


@dataclass
class AssembledFrame:
    """A frame ready for the pipeline: ``cameras_used`` are the cameras whose images are real;
    ``missing`` says why each other camera is not; ``warnings`` why the frame is degraded."""

    frame: Frame
    sweep: Sweep
    cameras_used: tuple[str, ...]
    missing: dict[str, str]
    warnings: list[str]
    calibration_error: str | None = None     # the rig's calibration was invalid: the last valid one is used


def output_warnings(assembled: AssembledFrame, pipeline_warnings: Sequence[str]) -> tuple[str, ...]:
    """Why an output frame is degraded, as the node reports it (``FrameInfo.warnings``): the
    assembly's warnings, the pipeline's, then one line naming each missing camera and why."""
    warnings = [*assembled.warnings, *pipeline_warnings]
    if assembled.missing:
        warnings.append("cameras missing: " + "; ".join(f"{name} ({why})" for name, why in assembled.missing.items()))
    return tuple(warnings)


def settings_calibration(settings: NodeConfig, config: PipelineConfig) -> Calibration | None:
    """The calibration file of ``node.calibration_source: file`` (an example-data folder or a
    YAML), None with ``tf`` (CameraInfo + TF give it)."""
    if settings.calibration_source != "file":
        return None
    path = Path(settings.calibration_file)
    if path.is_dir():
        return Calibration.from_example_data(path, config.camera_names)
    return calibration_from_yaml(path, config)


class FrameAssembler:
    """Synchronisation, TF buffer, sweep accumulation and calibration of one rig (module
    docstring). ``config``: the pipeline's (cameras, image size); ``settings``: the node's (sync
    policy, ``num_sweeps``, ``world_frame``, ``tf_timeout_s``, ``time_lag_field``, calibration
    source); ``file_calibration`` when ``settings.calibration_source`` is ``file``; ``decoder``
    decodes :class:`EncodedImage` inputs (default: OpenCV threads)."""

    def __init__(self, config: PipelineConfig, settings: NodeConfig, file_calibration: Calibration | None = None,
                 decoder: ImageDecoder | None = None) -> None:
        if settings.calibration_source == "file" and file_calibration is None:
            raise CalibrationError("node.calibration_source is 'file' but no calibration was given")
        self.config, self.settings = config, settings
        if file_calibration is not None and not settings.undistort:    # images taken as undistorted
            file_calibration = dataclasses.replace(file_calibration, distortions=())
        sync = settings.sync
        self.sync = LidarTriggeredSync(config.camera_names, sync.slop_s, sync.missing_camera, sync.wait_timeout_s,
                                       sync.max_image_age_s, backwards_tolerance_s=sync.backwards_tolerance_s,
                                       max_future_s=sync.max_future_s)
        self._lock = threading.Lock()
        self.transforms = TransformBuffer()
        self.sweeps = SweepAccumulator(settings.num_sweeps)
        self._history: collections.deque[Sweep] = collections.deque(maxlen=settings.num_sweeps)
        # camera -> (K, lens distortion): one entry, replaced at once (a frame never pairs a K
        # with another CameraInfo's distortion)
        self._lenses: dict[str, tuple[np.ndarray, Distortion | None]] = {}
        self._refused_distortions: dict[str, str] = {}     # camera -> why its images cannot be undistorted
        self._camera_frames: dict[str, str] = {}
        self._rejected_intrinsics: dict[str, str] = {}     # camera -> why its last K was refused
        self._calibration = file_calibration
        self._decoder = decoder

    def close(self) -> None:
        """Stop the image decoder's threads."""
        if self._decoder is not None:
            self._decoder.close()

    # ------------------------------------------------------------------ inputs
    def add_image(self, camera: str, stamp_ns: int, frame_id: str, image: Any, clock_ns: int | None = None) -> Ingest:
        """An image of ``camera``: RGB ``[H, W, 3]`` uint8, :class:`EncodedImage` or :class:`ImageError`.
        ``clock_ns``: the receiver's clock in the stamps' time base (None: unknown)."""
        self._camera_frames[camera] = frame_id
        with self._lock:
            refused = self.sync.future_images
            ingest = self._step(self.sync.add_image, camera, stamp_ns, image, clock_ns)
            ingest.image_refused = self.sync.future_images != refused
        return ingest

    def set_intrinsics(self, camera: str, intrinsics: np.ndarray, distortion: Distortion | None = None) -> None:
        """The 3x3 K of ``camera`` and its lens ``distortion`` (from its CameraInfo; None: not
        distorted). With ``node.undistort`` false the distortion is ignored: the images are taken
        as undistorted ones whose camera matrix is K."""
        self._lenses[camera] = (np.asarray(intrinsics, dtype=np.float64),
                                distortion if self.settings.undistort else None)
        self._rejected_intrinsics.pop(camera, None)
        self._refused_distortions.pop(camera, None)

    def refuse_distortion(self, camera: str, intrinsics: np.ndarray, reason: str) -> bool:
        """A CameraInfo of ``camera`` (K ``intrinsics``) whose distortion cannot be undone
        (``reason``: an unsupported model, malformed coefficients). With ``node.undistort`` the
        camera is missing, with the reason, until a usable CameraInfo comes (a wrong image is
        worse than a missing camera): returns True. Without, the distortion does not matter and
        K is used (False)."""
        if not self.settings.undistort:
            self.set_intrinsics(camera, intrinsics)
            return False
        self._refused_distortions[camera] = reason        # first: no frame takes the camera in between
        self._lenses[camera] = (np.asarray(intrinsics, dtype=np.float64), None)
        self._rejected_intrinsics.pop(camera, None)
        return True

    def reject_intrinsics(self, camera: str, reason: str) -> None:
        """A CameraInfo of ``camera`` could not be used: the last valid K stays, and ``reason``
        is a warning of each frame until a valid one comes."""
        self._rejected_intrinsics[camera] = reason

    def add_transform(self, parent: str, child: str, stamp_ns: int, matrix: np.ndarray, static: bool) -> None:
        """A TF transform (child -> parent, 4x4); raises ValueError/TransformError for a bad one."""
        self.transforms.set_transform(parent, child, stamp_ns, matrix, static)

    def add_cloud(self, sweep: Sweep, clock_ns: int | None = None, now_ns: int | None = None) -> Ingest:
        """A lidar sweep: kept as a candidate past sweep (unless the synchroniser drops it) and
        synchronised. ``now_ns``: the time a ``wait`` for late cameras counts from (default
        ``time.monotonic_ns()``; a bag reader gives the log time, and the same clock to :meth:`poll`)."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        with self._lock:
            self._history.append(sweep)
            ingest = self._step(self.sync.add_lidar, sweep.stamp_ns, sweep, now_ns, clock_ns)
            if ingest.reset:                         # forget the sweeps of the time before
                self._history.clear()
                self._history.append(sweep)
            if any(drop.stamp_ns == sweep.stamp_ns and drop.reason != DROP_RESET for drop in ingest.drops):
                self._history.remove(sweep)          # a dropped sweep is no past sweep either
        return ingest

    def poll(self, monotonic_ns: int | None = None) -> Ingest:
        """Emit sweeps whose wait for late cameras timed out (``missing_camera: wait``)."""
        with self._lock:
            return self._step(self.sync.poll, time.monotonic_ns() if monotonic_ns is None else monotonic_ns)

    def _step(self, step: Callable[..., list[SyncedFrame]], *args: Any) -> Ingest:
        resets = self.sync.resets
        frames = step(*args)
        reset = self.sync.last_reset_reason if self.sync.resets != resets else None
        return Ingest(frames=frames, drops=self.sync.take_drops(), reset=reset)

    # ------------------------------------------------------------------ assembly (the worker)
    def assemble(self, synced: SyncedFrame, lap: Callable[[str], None] = lambda phase: None) -> AssembledFrame:
        """The :class:`Frame` of a synchronised sweep; ``lap`` is called after the points,
        the images and the calibration (phase names ``points``, ``images``, ``calibration``).
        Raises CalibrationError when no valid calibration was ever available."""
        sweep: Sweep = synced.lidar                  # type: ignore[assignment]
        warnings = list(sweep.warnings)
        points = self._points(sweep, warnings)
        lap("points")
        missing = dict(synced.missing)
        images = self._images(synced, missing)
        lap("images")
        calibration, calibration_error = self._current_calibration(sweep.frame_id, missing, warnings)
        used = tuple(name for name in self.config.camera_names if name not in missing)
        frame = Frame(images, points, calibration, lidar_stamp_ns=synced.lidar_stamp_ns)
        lap("calibration")
        return AssembledFrame(frame, sweep, used, missing, warnings, calibration_error)

    def _points(self, sweep: Sweep, warnings: list[str]) -> np.ndarray:
        """[N, 5] float32 (x, y, z, intensity, time lag s): the sweep's own lag channel
        (``time_lag_field``), or the last ``num_sweeps`` sweeps motion-compensated into this one."""
        if self.settings.time_lag_field:
            return sweep.points
        pose = None
        if self.settings.num_sweeps > 1:
            self._remember_skipped_sweeps(sweep)
            self.sweeps.refresh_poses(lambda past_stamp: self._lidar_pose(sweep.frame_id, past_stamp))
            pose = self._sweep_pose(sweep, warnings)
        points = self.sweeps.add(sweep.points, sweep.stamp_ns, pose)
        if self.sweeps.last_warning and self.settings.num_sweeps > 1:
            warnings.append(self.sweeps.last_warning)
        return points

    def _remember_skipped_sweeps(self, sweep: Sweep) -> None:
        """Give the accumulator the sweeps received since its newest one and before this one."""
        stored = self.sweeps.stored_stamps
        newest = stored[-1] if stored else -1
        with self._lock:
            past = [old for old in self._history if newest < old.stamp_ns < sweep.stamp_ns]
        for old in past:
            self.sweeps.remember(old.points, old.stamp_ns, self._lidar_pose(sweep.frame_id, old.stamp_ns))

    def _lidar_pose(self, lidar_frame: str, stamp_ns: int) -> np.ndarray | None:
        try:
            return self.transforms.lookup(self.settings.world_frame, lidar_frame, stamp_ns)
        except LookupError:
            return None

    def _sweep_pose(self, sweep: Sweep, warnings: list[str]) -> np.ndarray | None:
        """The odometry at the sweep's stamp, waited for until ``tf_timeout_s`` after the sweep
        arrived; None (and a warning) when it did not come."""
        settings = self.settings
        timeout_s = sweep.received_s + settings.tf_timeout_s - time.monotonic()
        try:
            return self.transforms.wait_for_transform(settings.world_frame, sweep.frame_id, sweep.stamp_ns, timeout_s)
        except LookupError as error:
            warnings.append(f"no odometry {settings.world_frame} <- {sweep.frame_id} at the sweep's stamp "
                            f"within node.tf_timeout_s = {settings.tf_timeout_s:g} s: {error}")
            return None

    def _decoded(self, synced: SyncedFrame) -> dict[str, Any]:
        """Each present camera's RGB image, or the ImageError of an undecodable one; encoded
        images decoded all at once (:class:`ImageDecoder`: nvJPEG on the GPU, else threads)."""
        present = {camera: image for camera, image in synced.images.items() if image is not None}
        encoded = [camera for camera, image in present.items() if isinstance(image, EncodedImage)]
        if encoded:
            if self._decoder is None:
                self._decoder = ImageDecoder()
            decoded = self._decoder.decode([present[camera].data for camera in encoded], names=encoded)
            present.update(zip(encoded, decoded))
        return present

    def _images(self, synced: SyncedFrame, missing: dict[str, str]) -> list[Any]:
        """RGB images in camera order (NumPy, or CuPy from the GPU decoder); a missing camera gets
        a black image, an image that cannot be decoded or has the wrong size joins ``missing``."""
        expected = (self.config.image.input_height, self.config.image.input_width, 3)
        decoded = self._decoded(synced)
        images: list[Any] = []
        for camera in self.config.camera_names:
            image = decoded.get(camera)
            if isinstance(image, ImageError):
                missing[camera] = f"bad image: {image}"
                image = None
            elif image is not None and image.shape != expected:
                missing[camera] = (f"bad image: size {image.shape[1]}x{image.shape[0]}, expected "
                                   f"{expected[1]}x{expected[0]}")
                image = None
            images.append(image if image is not None else black_image(self.config.image))
        return images

    def _current_calibration(self, lidar_frame: str, missing: dict[str, str], warnings: list[str]
                             ) -> tuple[Calibration, str | None]:
        """The rig calibration now: from the file, or from CameraInfo + TF (cameras without
        either are marked missing and get a placeholder); the last valid one if it is invalid
        (said in ``warnings`` and returned as the error)."""
        if self.settings.calibration_source == "file":
            assert self._calibration is not None
            return self._calibration, None
        warnings.extend(self._rejected_intrinsics.values())
        names = self.config.camera_names
        intrinsics, extrinsics, distortions = zip(*(self._camera_calibration(camera, lidar_frame, missing)
                                                    for camera in names))
        try:
            self._calibration = Calibration.from_camera2lidar(np.stack(intrinsics), np.stack(extrinsics),
                                                              self.config.image, names, distortions)
        except CalibrationError as error:
            if self._calibration is None:
                raise
            message = f"invalid calibration ({error}); keeping the last valid one"
            warnings.append(message)
            return self._calibration, message
        return self._calibration, None

    def _camera_calibration(self, camera: str, lidar_frame: str, missing: dict[str, str]
                            ) -> tuple[np.ndarray, np.ndarray, Distortion | None]:
        """(K, camera2lidar, lens distortion) of ``camera``; placeholders, and ``missing`` says why,
        when unknown; a camera whose distortion was refused is missing too."""
        K, distortion = self._lenses.get(camera, (None, None))
        camera2lidar, reason = None, ""
        frame_id = self._camera_frames.get(camera)
        if frame_id:
            try:
                camera2lidar = self.transforms.lookup(lidar_frame, frame_id, 0)
            except LookupError as error:
                reason = f"no TF {lidar_frame} <- {frame_id}: {error}"
        else:
            reason = "camera frame unknown (no image yet)"
        if K is None:
            reason = "no CameraInfo yet"
        refused = self._refused_distortions.get(camera)
        if refused is not None:
            missing.setdefault(camera, f"lens distortion cannot be undone: {refused}")
        if K is None or camera2lidar is None:
            missing.setdefault(camera, f"not calibrated: {reason}")
        return ((K if K is not None else PLACEHOLDER_K), (camera2lidar if camera2lidar is not None else np.eye(4)),
                distortion)
