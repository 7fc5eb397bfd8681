"""Settings of the ROS node that are not pipeline settings: the ``node:`` section of the
parameter file (``config/nuscenes.yaml`` documents each one). ROS-free: the node builds a
:class:`NodeConfig` from its parameters, tests build one directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from bevfusion_ros.config import (NUSCENES_CAMERA_NAMES, ConfigError, PipelineConfig, _require,
                                  _ros_parameters, _section_from_mapping, config_from_dict)
from bevfusion_ros.engines.select import BACKENDS
from bevfusion_ros.sync import MISSING_CAMERA_POLICIES



def camera_topic(name: str) -> str:
    """The nuScenes-style image topic of a configured camera: FRONT -> /CAM_FRONT/image_raw."""
    return f"/CAM_{name}/image_raw"


def camera_info_topic(image_topic: str) -> str:
    """The CameraInfo topic beside an image topic (same namespace)."""
    return image_topic.rsplit("/", 1)[0] + "/camera_info"


NUSCENES_CAMERA_TOPICS = tuple(camera_topic(name) for name in NUSCENES_CAMERA_NAMES)
CALIBRATION_SOURCES = ("tf", "file")
INPUT_QOS = ("sensor_data", "reliable")


@dataclass(frozen=True)
class SyncSettings:
    slop_s: float = 0.1                 # max |camera stamp - lidar stamp| of a matched image
    missing_camera: str = "zero_fill"   # wait | zero_fill | lidar_only
    wait_timeout_s: float = 0.1         # `wait`: longest wait for late cameras (then zero_fill)
    max_image_age_s: float = 0.5        # a matched image older than this is stale (missing)

    def validate(self) -> None:
        _require(self.missing_camera in MISSING_CAMERA_POLICIES, "node.sync.missing_camera",
                 f"must be one of {list(MISSING_CAMERA_POLICIES)}, got {self.missing_camera!r}")
        for name in ("slop_s", "wait_timeout_s", "max_image_age_s"):
            _require(getattr(self, name) >= 0, f"node.sync.{name}", "must be >= 0")


@dataclass(frozen=True)
class NodeConfig:
    model_dir: str = "out/models/nuscenes-r50-fp16"
    backend: str = "auto"               # auto | tensorrt | gpu | cpu
    precision: str = "fp16"             # gpu backend: fp16 | fp32
    lidar_topic: str = "/LIDAR_TOP"
    camera_topics: tuple[str, ...] = NUSCENES_CAMERA_TOPICS       # one per camera_names entry
    camera_info_topics: tuple[str, ...] = ("",)  # empty: <image topic's namespace>/camera_info
    compressed_images: bool = False     # subscribe sensor_msgs/CompressedImage (<topic>/compressed)
    input_qos: str = "sensor_data"      # sensor_data (best effort) | reliable
    time_lag_field: str = ""            # cloud field holding each point's time lag (s), if any
    num_sweeps: int = 10                # sweeps fused, the current one included (1: no history)
    world_frame: str = "odom"           # fixed frame of the lidar odometry (TF) for sweeps
    calibration_source: str = "tf"      # tf: CameraInfo + TF; file: calibration_file
    calibration_file: str = ""          # CUDA-BEVFusion example-data folder or calibration YAML
    queue_size: int = 1                 # frames waiting for the worker; the oldest is dropped
    publish_markers: bool = True
    diagnostics_period_s: float = 1.0
    sync: SyncSettings = field(default_factory=SyncSettings)

    def validate(self, pipeline: PipelineConfig) -> "NodeConfig":
        cameras = len(pipeline.camera_names)
        _require(len(self.camera_topics) == cameras, "node.camera_topics",
                 f"needs one topic per camera ({cameras}: {list(pipeline.camera_names)})")
        _require(not self._given_info_topics() or len(self._given_info_topics()) == cameras,
                 "node.camera_info_topics", f"needs one topic per camera ({cameras}) or none")
        _require(self.backend in BACKENDS, "node.backend", f"unknown backend {self.backend!r}")
        _require(self.calibration_source in CALIBRATION_SOURCES, "node.calibration_source",
                 f"must be one of {list(CALIBRATION_SOURCES)}")
        _require(self.calibration_source != "file" or bool(self.calibration_file),
                 "node.calibration_file", "is required when calibration_source is file")
        _require(self.input_qos in INPUT_QOS, "node.input_qos", f"must be one of {list(INPUT_QOS)}")
        _require(self.num_sweeps >= 1, "node.num_sweeps", "must be >= 1")
        _require(self.queue_size >= 1, "node.queue_size", "must be >= 1")
        _require(self.diagnostics_period_s > 0, "node.diagnostics_period_s", "must be > 0")
        self.sync.validate()
        return self

    def _given_info_topics(self) -> tuple[str, ...]:
        return tuple(topic for topic in self.camera_info_topics if topic)

    def info_topics(self) -> tuple[str, ...]:
        """CameraInfo topic per camera: as configured, else beside each image topic."""
        if self._given_info_topics():
            return self._given_info_topics()
        return tuple(camera_info_topic(topic) for topic in self.camera_topics)


def configs_from_parameters(values: Mapping[str, Any],
                            model_config: PipelineConfig | None = None) -> tuple[PipelineConfig, NodeConfig]:
    """(pipeline config, node config) from a parameter mapping (nested, possibly ROS-wrapped).

    The pipeline sections come from the mapping when it has any, else ``model_config`` (the
    model folder's ``bevfusion.yaml``); the ``node`` section gives the node settings.
    """
    parameters = dict(_ros_parameters(values))
    node_values = parameters.pop("node", {}) or {}
    _require(isinstance(node_values, Mapping), "node", "expected a mapping")
    if parameters:
        pipeline = config_from_dict(parameters)
    elif model_config is not None:
        pipeline = model_config
    else:
        raise ConfigError("no pipeline settings: give the pipeline sections or a model folder config")
    node = _section_from_mapping(NodeConfig, node_values, "node.")
    return pipeline, node.validate(pipeline)


def nest_dotted(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a.c": 2}`` -> ``{"a": {"b": 1, "c": 2}}`` (ROS parameter names -> sections)."""
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        *sections, leaf = name.split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
        target[leaf] = value
    return nested
