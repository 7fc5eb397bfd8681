"""Settings of the ROS node that are not pipeline settings: the ``node:`` section of the
parameter file (``config/nuscenes.yaml`` documents each one), and how the node's parameters and
its model folder's ``bevfusion.yaml`` combine (:func:`configs_from_parameters`). ROS-free: the
node builds a :class:`NodeConfig` from its parameters, tests build one directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from bevfusion_ros.config import (
    NUSCENES_CAMERA_NAMES,
    ConfigError,
    PipelineConfig,
    _require,
    _ros_parameters,
    _section_from_mapping,
    config_from_dict,
    config_to_dict,
)
from bevfusion_ros.engines.select import BACKENDS
from bevfusion_ros.streaming.sync import MISSING_CAMERA_POLICIES

#: Pipeline settings a parameter file may change on a model folder that has a ``bevfusion.yaml``
#: (deployment choices, not the geometry the networks were exported with).
TUNABLE_PIPELINE_KEYS: frozenset[str] = frozenset({"head.score_threshold"})


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
    backwards_tolerance_s: float = 1.0  # older stamps within this: dropped (out of order); beyond: reset
    max_future_s: float = 5.0           # stamps further ahead of the node's clock are dropped (0: off)

    def validate(self) -> None:
        _require(self.missing_camera in MISSING_CAMERA_POLICIES, "node.sync.missing_camera",
                 f"must be one of {list(MISSING_CAMERA_POLICIES)}, got {self.missing_camera!r}")
        for name in ("slop_s", "wait_timeout_s", "max_image_age_s", "backwards_tolerance_s", "max_future_s"):
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
    tf_timeout_s: float = 0.1           # longest wait for the odometry at a sweep's stamp (from arrival)
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
        _require(self.tf_timeout_s >= 0, "node.tf_timeout_s", "must be >= 0")
        self.sync.validate()
        return self

    def _given_info_topics(self) -> tuple[str, ...]:
        return tuple(topic for topic in self.camera_info_topics if topic)

    def info_topics(self) -> tuple[str, ...]:
        """CameraInfo topic per camera: as configured, else beside each image topic."""
        if self._given_info_topics():
            return self._given_info_topics()
        return tuple(camera_info_topic(topic) for topic in self.camera_topics)


def configs_from_parameters(values: Mapping[str, Any], model_config: PipelineConfig | None = None,
                            model_config_path: str | Path = "the model folder's bevfusion.yaml"
                            ) -> tuple[PipelineConfig, NodeConfig]:
    """(pipeline config, node config) from a parameter mapping (nested, possibly ROS-wrapped).

    ``model_config`` (read from ``model_config_path``, the model folder's ``bevfusion.yaml``) is
    the pipeline's geometry: the parameters may repeat its values, and may change only
    :data:`TUNABLE_PIPELINE_KEYS`; any other difference is a :class:`ConfigError` naming each
    key. Without a model config the parameters must give the pipeline sections (NVIDIA's model
    folders have no ``bevfusion.yaml``). The ``node`` section gives the node settings.
    """
    parameters = dict(_ros_parameters(values))
    node_values = parameters.pop("node", {}) or {}
    _require(isinstance(node_values, Mapping), "node", "expected a mapping")
    if model_config is not None:
        pipeline = _model_config_with(model_config, parameters, str(model_config_path))
    elif parameters:
        pipeline = config_from_dict(parameters)
    else:
        raise ConfigError(f"no pipeline settings: {model_config_path} is missing and the parameters "
                          "have no pipeline sections (pass the model's geometry as a second "
                          "--params-file, e.g. config/cuda-bevfusion-resnet50.yaml for NVIDIA's model/resnet50)")
    node = _section_from_mapping(NodeConfig, node_values, "node.")
    return pipeline, node.validate(pipeline)


def flatten_dotted(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (the inverse of :func:`nest_dotted`)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _model_config_with(model_config: PipelineConfig, parameters: Mapping[str, Any], source: str) -> PipelineConfig:
    """``model_config`` with the parameters' tunable values; a conflict is a ConfigError."""
    model_flat = flatten_dotted(config_to_dict(model_config))
    given = flatten_dotted(parameters)
    conflicts = [f"{key}={value!r} (the model says {model_flat[key]!r})" for key, value in given.items()
                 if key in model_flat and value != model_flat[key] and key not in TUNABLE_PIPELINE_KEYS]
    if conflicts:
        raise ConfigError(
            f"the parameters set {', '.join(conflicts)}: {source} wins, because it is the geometry "
            f"the model's networks were exported with; remove these keys from the parameter file "
            f"(it should hold the node.* settings; of the pipeline only "
            f"{', '.join(sorted(TUNABLE_PIPELINE_KEYS))} may differ)")
    merged = config_from_dict(nest_dotted({**model_flat, **given}))
    return merged


def command_line_parameters(argv: Sequence[str], node_name: str = "bevfusion") -> dict[str, Any]:
    """The ``-p NAME:=VALUE`` / ``--param NAME:=VALUE`` parameters of a ROS command line for
    ``node_name`` (``NODE:NAME:=VALUE`` of another node left out), values parsed as YAML like
    rcl does. rcl silently keeps a parameter file's value when a ``-p`` value has another type;
    reading them here lets the node refuse such a value instead of ignoring it."""
    parameters: dict[str, Any] = {}
    in_ros_args = False
    args = list(argv)
    for index, arg in enumerate(args):
        if arg == "--ros-args":
            in_ros_args = True
        elif arg == "--":
            in_ros_args = False
        elif in_ros_args and arg in ("-p", "--param") and index + 1 < len(args) and ":=" in args[index + 1]:
            target, text = args[index + 1].split(":=", 1)
            node, _, name = target.rpartition(":")
            if node in ("", node_name):
                parameters[name] = _yaml_value(text)
    return parameters


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


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
