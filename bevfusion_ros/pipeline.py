"""``BEVFusionPipeline``: the CUDA-BEVFusion engine chain, ROS-free.

    pipeline = BEVFusionPipeline.from_model_dir("model/resnet50", backend="cpu")
    detections = pipeline.forward(frame)        # Frame: an RGB image per camera, points [N, 5], calibration

Stages, in the spec's order (each timed, milliseconds in ``detections.stage_ms``):
[``camera_geometry``, only when the calibration changed] ``upload_points``, ``upload_images``
(host -> device through pinned staging buffers on the GPU, :mod:`bevfusion_ros.runtime.upload`);
``normalize`` -> ``depth`` -> ``camera_backbone`` -> ``bevpool`` -> ``vtransform``;
``voxelize`` -> ``lidar_backbone``; ``fuser`` -> ``head`` -> ``decode``. The camera geometry
depends only on the calibration: :meth:`update` computes it once, and :meth:`forward`
recomputes it only when the frame brings a different calibration. Cameras whose calibration
carries a lens distortion are undistorted inside ``normalize``, from remap tables that
:meth:`update` builds with the geometry (:mod:`bevfusion_ros.camera.undistort`). On the GPU the camera and
lidar branches run on two streams and overlap until the fuser joins them; the camera branch is
queued from its own thread, because the lidar branch's host thread waits for a few sizes read
back from the GPU (voxel and site counts).

Input handling: images of the wrong count, size or dtype raise :class:`InputError`; point
rows with NaN/inf are dropped and counted; more than ``lidar.max_points`` points are
truncated (the first ones kept, as CUDA-BEVFusion does) with a warning; an empty cloud runs
camera-only (the lidar BEV is zero). Every such event is listed in ``detections.warnings``.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import yaml

from bevfusion_ros.camera.bevpool import bev_pool
from bevfusion_ros.camera.depth import depth_map
from bevfusion_ros.camera.geometry import CameraGeometry, compute_geometry
from bevfusion_ros.camera.normalize import check_images, normalize_images
from bevfusion_ros.camera.undistort import RemapTables, remap_tables
from bevfusion_ros.config import PipelineConfig, load_config
from bevfusion_ros.detections import Detections
from bevfusion_ros.engines import Engine, load_dense_engines
from bevfusion_ros.engines.select import GPU_BACKENDS, resolve_backend
from bevfusion_ros.head.decode import decode_boxes
from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.frame import Frame, black_image
from bevfusion_ros.lidar.scn import SparseEncoderRunner
from bevfusion_ros.lidar.voxelize import voxelize
from bevfusion_ros.runtime.array_module import is_cupy, to_numpy
from bevfusion_ros.runtime.upload import FrameUploader, source_row_band

LOG = logging.getLogger("bevfusion_ros.pipeline")
MODEL_FILES = ("camera.backbone.onnx", "camera.vtransform.onnx", "fuser.onnx", "head.bbox.onnx",
               "lidar.backbone.xyz.onnx")
CONFIG_FILE = "bevfusion.yaml"
GIL_SWITCH_INTERVAL_S = 2e-4          # see BEVFusionPipeline._run_branches
HIGHEST_STREAM_PRIORITY = -100        # CUDA clamps it to the device's highest (e.g. -5 on sm_90)


class InputError(ValueError):
    """A frame cannot be processed (wrong image count/size/dtype, malformed points)."""


class ModelDirError(FileNotFoundError):
    """A model folder lacks files of the CUDA-BEVFusion layout."""


@dataclass
class PreparedPoints:
    """Points ready for the chain: finite rows, at most ``max_points``, ``num_features`` columns."""

    points: np.ndarray                       # [N, num_features] float32
    warnings: list[str] = field(default_factory=list)


def prepare_points(points: np.ndarray, config: PipelineConfig) -> PreparedPoints:
    """Validate and clean a point cloud ``[N, C>=num_features]``; report what was changed."""
    lidar = config.lidar
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] < lidar.num_features:
        raise InputError(f"points must be [N, >={lidar.num_features}] (x, y, z, intensity, time lag), "
                         f"got shape {list(points.shape)}")
    points = points[:, :lidar.num_features].astype(np.float32, copy=False)
    warnings = []
    if not np.isfinite(points).all():                 # the per-row test only when needed: 40x slower
        finite = np.isfinite(points).all(axis=1)
        warnings.append(f"dropped {int((~finite).sum())} points with NaN/inf values")
        points = points[finite]
    if points.shape[0] > lidar.max_points:
        warnings.append(f"truncated {points.shape[0]} points to lidar.max_points={lidar.max_points}")
        points = points[:lidar.max_points]
    if points.shape[0] == 0:
        warnings.append("empty point cloud: camera-only result")
    return PreparedPoints(np.ascontiguousarray(points), warnings)


class StageTimer:
    """Milliseconds per named stage: wall clock on the CPU, CUDA events on the GPU.

    GPU work is asynchronous, so with ``cuda=True`` each stage records an event pair on the
    current stream (the span that stream spent in the stage, waits included) and :meth:`finish`
    synchronises and reads the elapsed times.
    """

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self._events: dict[str, tuple] = {}
        self._milliseconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.cuda:
            import cupy
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            yield
            end.record()
            self._events[name] = (start, end)
        else:
            begin = time.perf_counter()
            yield
            self._milliseconds[name] = (time.perf_counter() - begin) * 1e3

    def finish(self) -> dict[str, float]:
        """All stage times (waits for the GPU once when events are used)."""
        if self._events:
            import cupy
            for _, end in self._events.values():       # stages may run on several streams
                end.synchronize()
            self._milliseconds.update({name: cupy.cuda.get_elapsed_time(start, end)
                                       for name, (start, end) in self._events.items()})
            self._events.clear()
        return dict(self._milliseconds)


def model_info(model_dir: Path) -> dict:
    """A model folder's ``export.yaml`` (provenance of the weights), {} when it has none."""
    path = Path(model_dir) / "export.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def weights_note(info: dict) -> str:
    """What the weights of a model folder (its :func:`model_info`) are, for outputs: what they
    were trained on, UNTRAINED, or "" when the folder does not say."""
    if info.get("trained") is False:
        return "UNTRAINED random weights: boxes are meaningless"
    return f"weights trained on {info['trained_on']}" if info.get("trained_on") else ""


class BEVFusionPipeline:
    """The full chain over one model folder; not thread-safe (one worker owns it)."""

    def __init__(self, config: PipelineConfig, engines: dict[str, Engine],
                 lidar_backbone: SparseEncoderRunner, model_info: dict | None = None,
                 backend: str = "cpu"):
        self.config = config
        self.engines = engines
        self.lidar_backbone = lidar_backbone
        self.model_info = model_info or {}
        self.backend = backend
        self.device = "cuda" if backend in GPU_BACKENDS else "cpu"
        self._streams = _branch_streams(self.device)
        self._uploader = None if self.device == "cpu" else FrameUploader(
            config.image, config.num_cameras, config.lidar.max_points, config.lidar.num_features)
        self._camera_thread = None if self.device == "cpu" else ThreadPoolExecutor(
            1, thread_name_prefix="bevfusion-camera")
        self.calibration: Calibration | None = None
        self.geometry: CameraGeometry | None = None
        self._projection: tuple = ()               # lidar2image, img_aug_matrix (float32, on device)
        self._remap_host: RemapTables | None = None  # undistortion of the distorted cameras (NumPy)
        self._remap: RemapTables | None = None       # the same where the pipeline computes
        self._zero_bev: Any = None                 # camera BEV of a lidar-only frame

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: PipelineConfig | None = None,
                       backend: str = "cpu", precision: str = "fp16",
                       threads: int | None = None) -> "BEVFusionPipeline":
        """Load a CUDA-BEVFusion folder; ``config`` defaults to its ``bevfusion.yaml``.

        ``backend``: ``cpu``, ``gpu``, ``tensorrt`` or ``auto`` (see
        :mod:`bevfusion_ros.engines.select`). ``precision`` (``gpu`` backend): ``fp16``, the fast
        path (dense networks and sparse encoder in float16 with float32 accumulation), or
        ``fp32`` (everything float32, for parity with the CPU path). ``threads``: intra-op threads
        of each ONNX Runtime session (None: ORT's default, one per physical core), e.g. one batch
        worker's share of the CPUs.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelDirError(f"model folder {model_dir} does not exist (or is not a folder)")
        missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
        if config is None and not (model_dir / CONFIG_FILE).is_file():
            missing.append(f"{CONFIG_FILE} (or pass a config)")
        if missing:
            raise ModelDirError(f"model folder {model_dir} lacks: {', '.join(missing)}")
        config = config or load_config(model_dir / CONFIG_FILE)
        backend = resolve_backend(backend)
        engines = load_dense_engines(model_dir, config, backend, threads=threads, precision=precision)
        sparse_dtype = np.float16 if backend in GPU_BACKENDS and precision == "fp16" else np.float32
        lidar_backbone = SparseEncoderRunner.from_onnx(model_dir / "lidar.backbone.xyz.onnx",
                                                       sparse_dtype, output_dtype=sparse_dtype)
        if backend in GPU_BACKENDS:                  # engines built on torch's stream: let them land
            import cupy
            cupy.cuda.Device().synchronize()
        pipeline = cls(config, engines, lidar_backbone, model_info(model_dir), backend)
        gc.freeze()       # the loaded models' objects leave the collector: no 10 ms full collection
        return pipeline   # walking them in the middle of a frame

    def _to_device(self, array: np.ndarray):
        """``array`` where the pipeline computes: itself on the CPU, a CuPy copy on the GPU."""
        if self.device == "cpu":
            return array
        import cupy
        return cupy.asarray(array)

    def _check_images(self, images: list) -> None:
        """:func:`check_images` for this pipeline, as :class:`InputError`: NumPy images on the
        CPU; NumPy or CuPy images (on the pipeline's device) on the GPU."""
        device_images = [index for index, image in enumerate(images) if is_cupy(image)]
        if device_images and self.device == "cpu":
            raise InputError(
                f"camera {device_images[0]}: a CuPy (GPU) image was given to a CPU pipeline "
                f"(backend {self.backend!r}); pass NumPy images (cupy.asnumpy) or load the "
                f"pipeline with a GPU backend")
        try:
            if self.device == "cpu":
                check_images(images, self.config.image, self.config.num_cameras)
            else:
                import cupy
                check_images(images, self.config.image, self.config.num_cameras, (np.ndarray, cupy.ndarray))
        except ValueError as error:
            raise InputError(str(error)) from error
        for index in device_images:
            if images[index].device.id != self._uploader.device_id:
                raise InputError(f"camera {index}: image on GPU {images[index].device.id}, the "
                                 f"pipeline computes on GPU {self._uploader.device_id}")

    def _upload_images(self, images) -> object:
        """The N raw images as one [N, H, W, 3] uint8 array where the pipeline computes (on the GPU
        through the pinned staging buffers, only the rows normalization reads; CuPy images are
        copied device to device)."""
        if self._uploader is None:
            return np.stack(images)
        import cupy
        return self._uploader.images(images, cupy.cuda.get_current_stream())

    def _upload_points(self, points: np.ndarray) -> object:
        """Prepared points [P, C] where the pipeline computes (GPU: through pinned staging)."""
        if self._uploader is None:
            return points
        import cupy
        return self._uploader.points(points, cupy.cuda.get_current_stream())

    @property
    def trained(self) -> bool | None:
        """Whether the exported weights are trained (None when the folder does not say)."""
        return self.model_info.get("trained")

    @property
    def weights_note(self) -> str:
        """:func:`weights_note` of the model folder."""
        return weights_note(self.model_info)

    @property
    def remap_tables(self) -> RemapTables | None:
        """The undistortion tables of the current calibration where the pipeline computes (None
        while no camera is distorted; :mod:`bevfusion_ros.camera.undistort`)."""
        return self._remap

    def set_score_threshold(self, score_threshold: float) -> None:
        """Keep boxes scoring at least ``score_threshold`` from the next frame on (a run-time
        setting: the networks do not depend on it)."""
        head = dataclasses.replace(self.config.head, score_threshold=float(score_threshold))
        head.validate()
        self.config = dataclasses.replace(self.config, head=head)

    def update(self, calibration: Calibration) -> None:
        """Recompute the camera geometry for ``calibration`` (validated first), and the remap
        tables of its distorted cameras (kept when their K and distortion did not change)."""
        calibration.validate()
        if calibration.num_cameras != self.config.num_cameras:
            raise InputError(f"calibration has {calibration.num_cameras} cameras, the model "
                             f"expects {self.config.num_cameras} ({list(self.config.camera_names)})")
        geometry = compute_geometry(calibration, self.config)
        with self._streams[0]:
            self.geometry = geometry if self.device == "cpu" else geometry.to_device()
            self._projection = (self._to_device(calibration.lidar2image.astype(np.float32)),
                                self._to_device(calibration.img_aug_matrix.astype(np.float32)))
            self._update_remap(calibration)
        if self.device == "cuda":                    # both branch streams read these
            self._streams[0].synchronize()
        self.calibration = calibration

    def _update_remap(self, calibration: Calibration) -> None:
        """The undistortion tables of ``calibration`` (:mod:`bevfusion_ros.camera.undistort`),
        built and uploaded only when a camera's K or distortion changed; the GPU uploader then
        stages the raw rows they read."""
        remap = remap_tables(calibration, self.config.image, self._remap_host)
        if remap is not self._remap_host:
            self._remap = remap if remap is None or self.device == "cpu" else remap.to_device()
            self._remap_host = remap
        if self._uploader is not None:
            self._uploader.row_band = source_row_band(self.config.image) if remap is None else remap.source_rows

    def _ensure_geometry(self, calibration: Calibration, timer: StageTimer) -> None:
        """Recompute the geometry (timed as stage ``camera_geometry``) if the calibration changed."""
        if self.calibration is not calibration and not _same_calibration(self.calibration, calibration):
            with timer.stage("camera_geometry"):
                self.update(calibration)

    def forward(self, frame: Frame, cameras_used: Sequence[str] | None = None) -> Detections:
        """Run the whole chain on ``frame``; raises :class:`InputError` on unusable input.

        ``cameras_used`` (default: all) names the cameras whose images are valid. The others are
        replaced by black images (what a dropped camera looks like to the network; the node's
        ``missing_camera: zero_fill``); with none, the camera branch is skipped and the fuser
        gets an all-zero camera BEV (lidar only). The result's ``cameras_used`` says which.

        Images are NumPy ``[H, W, 3]`` uint8 arrays; a GPU pipeline also takes CuPy arrays on its
        device (e.g. from :class:`~bevfusion_ros.camera.jpeg.ImageDecoder`), mixed with NumPy
        ones if need be (e.g. :meth:`black_image` for a missing camera): they are copied device
        to device, with no host round trip. CuPy images are read after the work queued so far
        on the caller's current CuPy stream (the camera stream waits for it), so images written
        asynchronously on that stream need no synchronisation.
        """
        timer = StageTimer(cuda=self.device == "cuda")
        self._ensure_geometry(frame.calibration, timer)
        used = self._cameras_used(cameras_used)
        images = self._frame_images(frame, used)
        camera_bev, lidar_bev, lidar_done, prepared = self._run_branches(frame.points, images, used, timer)
        boxes = self._fuse_and_decode(camera_bev, lidar_bev, lidar_done, timer)
        for warning in prepared.warnings:
            LOG.warning(warning)
        return Detections(boxes=boxes, class_names=self.config.head.class_names,
                          stamp_ns=frame.lidar_stamp_ns, stage_ms=timer.finish(),
                          cameras_used=used, warnings=tuple(prepared.warnings))

    def _frame_images(self, frame: Frame, used: tuple[str, ...]) -> list:
        """The frame's images, those of cameras not in ``used`` replaced by :meth:`black_image`;
        :class:`InputError` when they do not fit the model."""
        images = list(frame.images)
        if len(images) == self.config.num_cameras:           # else check_images says so
            images = [image if name in used else self.black_image()
                      for name, image in zip(self.config.camera_names, images)]
        self._check_images(images)
        return images

    def _run_branches(self, points: np.ndarray, images: list, used: tuple[str, ...],
                      timer: StageTimer) -> tuple[Any, Any, Any, PreparedPoints]:
        """Both branches up to their BEVs: (camera BEV, lidar BEV, event recorded after the lidar
        branch, the prepared points).

        On the GPU the camera side starts first, in the camera thread (image upload and
        normalization need no points), while this thread cleans and uploads the points, hands
        them over through ``points_ready`` and queues the lidar branch. On the CPU (no camera
        thread) the camera side runs after the lidar side in this thread, and a lidar-only frame
        only takes the zero camera BEV: both are :class:`_Deferred` calls, run by
        ``camera.result()``, which have the camera thread's Future methods, so one code path
        serves every case. While two threads queue GPU work, :func:`_short_gil_switches` lets a
        thread waiting for the GIL get it after GIL_SWITCH_INTERVAL_S instead of Python's default
        5 ms: a branch thread returning from a GPU wait must not idle behind the other thread's
        Python code (it made p99 latency 3x the median).
        """
        # Device images: the camera stream waits for what the caller queued on its stream.
        images_ready = (_record_event(self.device) if self.device == "cuda" and any(map(is_cupy, images))
                        else None)
        lidar_stream = self._streams[1]
        points_ready: Future = Future()     # (device points, event recorded after their upload)
        with _short_gil_switches(self._camera_thread is not None and bool(used)):
            if not used:
                camera: Any = _Deferred(self._zero_camera_bev)
            elif self._camera_thread is None:
                camera = _Deferred(self._camera_side, images, points_ready, timer, images_ready)
            else:
                camera = self._camera_thread.submit(self._camera_side, images, points_ready, timer,
                                                    images_ready)
            try:
                prepared = prepare_points(points, self.config)
                with lidar_stream:           # overlaps the camera branch on the GPU
                    with timer.stage("upload_points"):
                        device_points = self._upload_points(prepared.points)
                    points_ready.set_result((device_points, _record_event(self.device)))
                    lidar_bev = self._lidar_branch(device_points, timer)
                    lidar_done = _record_event(self.device)
            except BaseException as error:   # release the camera side, never leave it running
                if not points_ready.done():
                    points_ready.set_exception(error)
                camera.exception()
                raise
            return camera.result(), lidar_bev, lidar_done, prepared

    def _fuse_and_decode(self, camera_bev, lidar_bev, lidar_done, timer: StageTimer) -> np.ndarray:
        """fuser -> head -> decode on the camera stream, once the lidar branch is done: boxes
        ``[M, 11]`` as NumPy."""
        camera_stream = self._streams[0]
        with camera_stream:
            _wait_event(camera_stream, lidar_done)
            with timer.stage("fuser"):
                middle = self.engines["fuser.onnx"].run({"camera": camera_bev, "lidar": lidar_bev})["middle"]
            with timer.stage("head"):
                head_outputs = self.engines["head.bbox.onnx"].run({"middle": middle})
            with timer.stage("decode"):
                return to_numpy(decode_boxes(head_outputs, self.config))

    def _cameras_used(self, cameras_used: Sequence[str] | None) -> tuple[str, ...]:
        """The configured cameras named in ``cameras_used`` (all when None), in config order."""
        names = self.config.camera_names
        if cameras_used is None:
            return tuple(names)
        unknown = sorted(set(cameras_used) - set(names))
        if unknown:
            raise InputError(f"unknown camera(s) {unknown}; configured: {list(names)}")
        return tuple(name for name in names if name in cameras_used)

    def black_image(self) -> np.ndarray:
        """A read-only all-zero input image, shared by every missing camera (what the pipeline
        feeds a camera left out of ``cameras_used``; a caller may put it in the missing slots)."""
        return black_image(self.config.image)

    def _zero_camera_bev(self):
        """The camera BEV of a lidar-only frame: zeros of the vtransform output's shape and
        dtype, where the pipeline computes (allocated once)."""
        if self._zero_bev is None:
            spec = self.engines["camera.vtransform.onnx"].outputs["feat_out"]
            with self._streams[0]:
                self._zero_bev = self._to_device(np.zeros(spec.shape, dtype=spec.dtype))
        return self._zero_bev

    def _camera_side(self, raw_images, points_ready: Future, timer: StageTimer, images_ready=None):
        """Camera branch on the camera stream: raw images [N, H, W, 3] uint8 -> camera BEV
        [1, C, X/2, Y/2]. Upload and normalization run at once; the depth map waits for the
        points [P, C] and their upload event from ``points_ready``."""
        image = self.config.image
        camera_stream = self._streams[0]
        with camera_stream:
            _wait_event(camera_stream, images_ready)    # device images written on the caller's stream
            with timer.stage("upload_images"):
                uploaded = self._upload_images(raw_images)
            with timer.stage("normalize"):
                images = normalize_images(uploaded, image, self.config.num_cameras, remap=self._remap)
            points, points_uploaded = points_ready.result()
            _wait_event(camera_stream, points_uploaded)
            with timer.stage("depth"):
                depth = depth_map(points, *self._projection, image.output_height, image.output_width)
            with timer.stage("camera_backbone"):
                features = self.engines["camera.backbone.onnx"].run({"img": images[None], "depth": depth[None]})
            with timer.stage("bevpool"):
                pooled = bev_pool(features["camera_feature"], features["camera_depth_weights"], self.geometry)
            with timer.stage("vtransform"):
                return self.engines["camera.vtransform.onnx"].run({"feat_in": pooled})["feat_out"]

    def _lidar_branch(self, points, timer: StageTimer):
        """points [P, C] -> lidar BEV [1, 2C, X, Y]."""
        with timer.stage("voxelize"):
            voxels = voxelize(points, self.config.voxelization)
        with timer.stage("lidar_backbone"):          # an empty frame gives a zero BEV
            return self.lidar_backbone.run(voxels.features, voxels.coords,
                                           self.config.voxelization.sparse_shape)


@contextmanager
def _short_gil_switches(active: bool) -> Iterator[None]:
    """Python's (process-wide) GIL switch interval is GIL_SWITCH_INTERVAL_S while ``active``,
    restored afterwards (why: :meth:`BEVFusionPipeline._run_branches`)."""
    if not active:
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


class _Deferred:
    """A call run by the first :meth:`result`, with a ``Future``'s two methods (why:
    :meth:`BEVFusionPipeline._run_branches`)."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self._function, self._args = function, args

    def result(self) -> Any:
        return self._function(*self._args)

    def exception(self) -> None:
        """Never started: nothing to wait for."""
        return None


def _branch_streams(device: str) -> tuple:
    """(camera stream, lidar stream): two non-blocking CuPy streams on the GPU, so the two branches
    overlap until the fuser joins them; no-op contexts on the CPU. The lidar branch is the longer
    one (its many small kernels wait on the host): its stream has the higher priority, so that
    its kernels' blocks go ahead of the camera backbone's queued ones."""
    if device == "cpu":
        return nullcontext(), nullcontext()
    import cupy
    return (cupy.cuda.Stream(non_blocking=True),
            cupy.cuda.Stream(non_blocking=True, priority=HIGHEST_STREAM_PRIORITY))


def _record_event(device: str):
    """A CUDA event recorded on the current stream (None on the CPU)."""
    if device == "cpu":
        return None
    import cupy
    event = cupy.cuda.Event(disable_timing=True)
    event.record()
    return event


def _wait_event(stream, event) -> None:
    """Make ``stream`` wait for ``event`` (nothing on the CPU)."""
    if event is not None:
        stream.wait_event(event)


def _same_calibration(a: Calibration | None, b: Calibration) -> bool:
    if a is None or a.camera_names != b.camera_names or a.distortions != b.distortions:
        return False
    return all(np.array_equal(getattr(a, name), getattr(b, name)) for name in
               ("camera2lidar", "camera_intrinsics", "lidar2image", "img_aug_matrix"))
