"""Pipeline configuration as dataclasses, loaded from the node's ROS-parameter YAML.

The YAML file (a model folder's ``bevfusion.yaml``, or ``config/cuda-bevfusion-resnet50.yaml``
for NVIDIA's) is a ROS 2 parameter file: the values live under
``<node name or /**>: ros__parameters:``.  ``load_config`` reads that section (or a plain
mapping without the ROS wrapper) into :class:`PipelineConfig`, rejecting unknown keys and
invalid values with a message naming the key.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

NUSCENES_CAMERA_NAMES = ("FRONT", "FRONT_RIGHT", "FRONT_LEFT", "BACK", "BACK_LEFT", "BACK_RIGHT")
NUSCENES_CLASS_NAMES = (
    "car", "truck", "construction_vehicle", "bus", "trailer", "barrier",
    "motorcycle", "bicycle", "pedestrian", "traffic_cone",
)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config '{key}': {message}")


def _bins(bound: tuple[float, float, float]) -> int:
    """Number of cells of a (min, max, step) bound, rounded as mit-han-lab's gen_dx_bx does."""
    low, high, step = bound
    return int(round((high - low) / step))


@dataclass(frozen=True)
class ImageConfig:
    """Raw camera image -> network input: bilinear resize by ``resize_scale``, then crop.

    The crop keeps the horizontal centre and the bottom rows (spec 1.2/1.3).
    """

    input_width: int = 1600
    input_height: int = 900
    output_width: int = 704
    output_height: int = 256
    resize_scale: float = 0.48
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def resized_size(self) -> tuple[int, int]:
        """(width, height) after the resize, truncated to int like CUDA-BEVFusion."""
        return int(self.input_width * self.resize_scale), int(self.input_height * self.resize_scale)

    @property
    def crop(self) -> tuple[int, int]:
        """(crop_x, crop_y) offset of the network input inside the resized image."""
        width, height = self.resized_size
        return (width - self.output_width) // 2, height - self.output_height

    def for_input_size(self, width: int, height: int) -> "ImageConfig":
        """The same network input for cameras of ``width`` x ``height``: ``resize_scale`` chosen
        so that the resized width stays this config's (every camera is seen across its whole
        width, as on the rig this config was made for); self when the size is this config's.

        E.g. 1600x900 at 0.48 (768x432) -> 1280x720 at 0.6 (768x432). Raises
        :class:`ConfigError` when the resized height falls short of the network input.
        """
        if (width, height) == (self.input_width, self.input_height):
            return self
        _require(width > 0 and height > 0, "image.input_width/height",
                 f"must be positive, got {width}x{height}")
        resized_width = self.resized_size[0]
        scale = resized_width / width
        while int(width * scale) < resized_width:          # int() truncates, as resized_size does
            scale = math.nextafter(scale, math.inf)
        image = dataclasses.replace(self, input_width=width, input_height=height, resize_scale=scale)
        image.validate()
        return image

    def validate(self) -> None:
        for name in ("input_width", "input_height", "output_width", "output_height"):
            _require(getattr(self, name) > 0, f"image.{name}", "must be positive")
        _require(self.resize_scale > 0, "image.resize_scale", "must be positive")
        width, height = self.resized_size
        _require(width >= self.output_width and height >= self.output_height, "image.resize_scale",
                 f"resized image {width}x{height} is smaller than the network input "
                 f"{self.output_width}x{self.output_height}")
        _require(len(self.mean) == 3 and len(self.std) == 3, "image.mean/std", "need 3 values (RGB)")
        _require(all(s > 0 for s in self.std), "image.std", "must be positive")


@dataclass(frozen=True)
class CameraGeometryConfig:
    """LSS frustum and camera BEV grid (spec 3.1). Bounds are (min, max, step) in metres."""

    xbound: tuple[float, float, float] = (-54.0, 54.0, 0.3)
    ybound: tuple[float, float, float] = (-54.0, 54.0, 0.3)
    zbound: tuple[float, float, float] = (-10.0, 10.0, 20.0)
    dbound: tuple[float, float, float] = (1.0, 60.0, 0.5)
    feature_width: int = 88
    feature_height: int = 32
    camera_channels: int = 80

    @property
    def bev_size(self) -> tuple[int, int, int]:
        """(nx, ny, nz) cells of the camera BEV grid."""
        return _bins(self.xbound), _bins(self.ybound), _bins(self.zbound)

    @property
    def depth_bins(self) -> int:
        return _bins(self.dbound)

    def validate(self) -> None:
        for name in ("xbound", "ybound", "zbound", "dbound"):
            low, high, step = getattr(self, name)
            _require(high > low and step > 0, f"camera_geometry.{name}",
                     f"needs min < max and step > 0, got {(low, high, step)}")
        for name in ("feature_width", "feature_height", "camera_channels"):
            _require(getattr(self, name) > 0, f"camera_geometry.{name}", "must be positive")


@dataclass(frozen=True)
class VoxelizationConfig:
    """Lidar voxelizer (spec 5.1): half-open range [min, max), voxel size in metres."""

    point_range_min: tuple[float, float, float] = (-54.0, -54.0, -5.0)
    point_range_max: tuple[float, float, float] = (54.0, 54.0, 3.0)
    voxel_size: tuple[float, float, float] = (0.075, 0.075, 0.2)
    max_points_per_voxel: int = 10
    max_voxels: int = 160000

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Voxel grid (nx, ny, nz) = round(range / size), e.g. (1440, 1440, 40)."""
        return tuple(  # type: ignore[return-value]
            int(round((high - low) / size))
            for low, high, size in zip(self.point_range_min, self.point_range_max, self.voxel_size)
        )

    @property
    def sparse_shape(self) -> tuple[int, int, int]:
        """Grid handed to the sparse encoder: z + 1, the SECOND convention (1440, 1440, 41)."""
        nx, ny, nz = self.grid_size
        return nx, ny, nz + 1

    def validate(self) -> None:
        for axis, (low, high, size) in enumerate(
                zip(self.point_range_min, self.point_range_max, self.voxel_size)):
            _require(high > low, "voxelization.point_range", f"axis {'xyz'[axis]}: max must exceed min")
            _require(size > 0, "voxelization.voxel_size", f"axis {'xyz'[axis]}: must be positive")
        _require(self.max_points_per_voxel > 0, "voxelization.max_points_per_voxel", "must be positive")
        _require(self.max_voxels > 0, "voxelization.max_voxels", "must be positive")


@dataclass(frozen=True)
class LidarConfig:
    """Point cloud input: columns x, y, z, intensity (0-255), time lag (s)."""

    num_features: int = 5
    max_points: int = 300000

    def validate(self) -> None:
        _require(self.num_features >= 4, "lidar.num_features", "need at least x, y, z, intensity")
        _require(self.max_points > 0, "lidar.max_points", "must be positive")


@dataclass(frozen=True)
class HeadConfig:
    """TransFusion head outputs and box decoding (spec 6.2-6.4)."""

    out_size_factor: int = 8
    num_proposals: int = 200
    score_threshold: float = 0.12
    post_center_range: tuple[float, ...] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    class_names: tuple[str, ...] = NUSCENES_CLASS_NAMES

    def validate(self) -> None:
        _require(self.out_size_factor > 0, "head.out_size_factor", "must be positive")
        _require(self.num_proposals > 0, "head.num_proposals", "must be positive")
        _require(0.0 <= self.score_threshold <= 1.0, "head.score_threshold", "must be in [0, 1]")
        _require(len(self.post_center_range) == 6, "head.post_center_range",
                 "needs 6 values: xmin, ymin, zmin, xmax, ymax, zmax")
        _require(len(self.class_names) > 0, "head.class_names", "must not be empty")
        _require(len(set(self.class_names)) == len(self.class_names), "head.class_names",
                 "must be unique")


@dataclass(frozen=True)
class PipelineConfig:
    """Everything the ROS-free pipeline needs; one instance per model/sensor set-up."""

    camera_names: tuple[str, ...] = NUSCENES_CAMERA_NAMES
    image: ImageConfig = field(default_factory=ImageConfig)
    camera_geometry: CameraGeometryConfig = field(default_factory=CameraGeometryConfig)
    voxelization: VoxelizationConfig = field(default_factory=VoxelizationConfig)
    lidar: LidarConfig = field(default_factory=LidarConfig)
    head: HeadConfig = field(default_factory=HeadConfig)

    @property
    def num_cameras(self) -> int:
        return len(self.camera_names)

    @property
    def bev_size(self) -> tuple[int, int]:
        """(X, Y) cells of the fused BEV: voxel grid / out_size_factor (e.g. 180 x 180)."""
        nx, ny, _ = self.voxelization.grid_size
        factor = self.head.out_size_factor
        return nx // factor, ny // factor

    @property
    def bev_cell_size(self) -> tuple[float, float]:
        """Metres per cell of the fused BEV (voxel size x out_size_factor), e.g. 0.6 m."""
        factor = self.head.out_size_factor
        return self.voxelization.voxel_size[0] * factor, self.voxelization.voxel_size[1] * factor

    def validate(self) -> "PipelineConfig":
        """Check every section and the cross-section invariants; return self."""
        _require(len(self.camera_names) > 0, "camera_names", "must not be empty")
        _require(len(set(self.camera_names)) == len(self.camera_names), "camera_names", "must be unique")
        for section in (self.image, self.camera_geometry, self.voxelization, self.lidar, self.head):
            section.validate()
        geometry = self.camera_geometry
        _require(self.image.output_width % geometry.feature_width == 0
                 and self.image.output_height % geometry.feature_height == 0,
                 "camera_geometry.feature_width/height",
                 "network input must be an integer multiple of the feature map")
        nx, ny, _ = self.voxelization.grid_size
        factor = self.head.out_size_factor
        _require(nx % factor == 0 and ny % factor == 0, "head.out_size_factor",
                 f"voxel grid {nx}x{ny} is not divisible by {factor}")
        lidar_bev = (nx // factor, ny // factor)
        camera_bev = geometry.bev_size[:2]
        _require(camera_bev[0] % lidar_bev[0] == 0 and camera_bev[1] % lidar_bev[1] == 0,
                 "camera_geometry.xbound/ybound",
                 f"camera BEV {camera_bev} must be an integer multiple of the lidar BEV {lidar_bev}")
        return self


def _coerce(default: Any, value: Any, key: str) -> Any:
    """Convert a YAML value to the type of the field's default; reject wrong kinds."""
    if dataclasses.is_dataclass(default):
        _require(isinstance(value, Mapping), key, f"expected a mapping, got {value!r}")
        return _section_from_mapping(type(default), value, f"{key}.")
    if isinstance(default, tuple):
        _require(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        element = default[0] if default else value[0] if value else None
        return tuple(_coerce(element, item, f"{key}[{i}]") for i, item in enumerate(value))
    if isinstance(default, bool) or isinstance(default, str):
        _require(isinstance(value, type(default)), key,
                 f"expected {type(default).__name__}, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                 f"expected a number, got {value!r}")
        _require(math.isfinite(value), key, "must be finite")
        _require(isinstance(default, float) or float(value).is_integer(), key,
                 f"expected an integer, got {value!r}")
        return type(default)(value)
    return value


def _section_from_mapping(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``values``; unknown keys are errors, types follow defaults."""
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    _require(not unknown, prefix.rstrip(".") or "<top level>",
             f"unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**{name: _coerce(getattr(defaults, name), value, f"{prefix}{name}")
                  for name, value in values.items()})


def config_from_dict(values: Mapping[str, Any]) -> PipelineConfig:
    """Build and validate a :class:`PipelineConfig` from a (possibly ROS-wrapped) mapping.

    Keys of the ROS node that are not pipeline settings (topics, QoS, ...) are listed in
    ``NODE_ONLY_KEYS`` and ignored here.
    """
    parameters = _ros_parameters(values)
    pipeline_values = {k: v for k, v in parameters.items() if k not in NODE_ONLY_KEYS}
    return _section_from_mapping(PipelineConfig, pipeline_values, "").validate()


def config_to_dict(config: PipelineConfig) -> dict[str, Any]:
    """Plain nested dict/list form of ``config`` (inverse of :func:`config_from_dict`)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (tuple, list)):
            return [plain(item) for item in value]
        return value
    return plain(dataclasses.asdict(config))


def save_config(config: PipelineConfig, path: str | Path, header: str = "",
                node: Mapping[str, Any] | None = None) -> None:
    """Write ``config`` as a ROS 2 parameter YAML (``/**: ros__parameters: ...``), with the
    node's own ``node`` section when given (a complete ``bevfusion_node`` parameter file)."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    parameters = {**config_to_dict(config), **({"node": dict(node)} if node else {})}
    body = yaml.safe_dump({"/**": {"ros__parameters": parameters}}, sort_keys=False)
    Path(path).write_text(comment + body)


def load_config(path: str | Path) -> PipelineConfig:
    """Load ``path`` (a ROS 2 parameter YAML or a plain mapping) into a validated config."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from error
    _require(isinstance(values, Mapping), str(path), "top level must be a mapping")
    return config_from_dict(values)


def _ros_parameters(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """Unwrap ``{node: {ros__parameters: {...}}}``; a mapping without the wrapper is returned as is."""
    wrapped = [v["ros__parameters"] for v in values.values()
               if isinstance(v, Mapping) and "ros__parameters" in v]
    if not wrapped:
        return values
    _require(len(wrapped) == 1, "ros__parameters", "expected exactly one node section")
    return wrapped[0]


# Parameters that only the ROS node reads: its ``node:`` section (bevfusion_ros.streaming.node_config).
NODE_ONLY_KEYS: frozenset[str] = frozenset({"node"})
