"""Settings of the ROS node that are not pipeline settings: the ``node:`` section of the
parameter file (``config/nuscenes.yaml`` documents each one), and how the node's parameters and
its model folder's ``bevfusion.yaml`` combine (:func:`configs_from_parameters`). ROS-free: the
node builds a :class:`NodeConfig` from its parameters, tests build one directly.
"""
from __future__ import annotations

import dataclasses
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
from bevfusion_ros.streaming.score_thresholds import parse_class_thresholds
from bevfusion_ros.streaming.sync import MISSING_CAMERA_POLICIES

#: Pipeline settings a parameter file may change on a model folder that has a ``bevfusion.yaml``
#: (deployment choices, not the geometry the networks were exported with).
TUNABLE_PIPELINE_KEYS: frozenset[str] = frozenset({"head.score_threshold"})
#: The rig's settings a parameter file may also change (:func:`configs_from_parameters`): the
#: camera names (any, as many as the model's camera batch) and their one image size (the
#: resize then keeps the network input, :meth:`ImageConfig.for_input_size`, unless
#: ``image.resize_scale`` is changed too).
RIG_PIPELINE_KEYS: frozenset[str] = frozenset({"camera_names", "image.input_width", "image.input_height",
                                               "image.resize_scale"})


def camera_topic(name: str) -> str:
    """The nuScenes-style image topic of a configured camera: FRONT -> /CAM_FRONT/image_raw
    (``node.camera_topics`` when the parameters give none)."""
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
    camera_topics: tuple[str, ...] = NUSCENES_CAMERA_TOPICS   # one per camera (parameters: camera_topic(name) each)
    camera_info_topics: tuple[str, ...] = ("",)  # empty: <image topic's namespace>/camera_info
    compressed_images: bool = False     # subscribe sensor_msgs/CompressedImage (<topic>/compressed)
    input_qos: str = "sensor_data"      # sensor_data (best effort) | reliable
    time_lag_field: str = ""            # cloud field holding each point's time lag (s), if any
    num_sweeps: int = 10                # sweeps fused, the current one included (1: no history)
    world_frame: str = "odom"           # fixed frame of the lidar odometry (TF) for sweeps
    tf_timeout_s: float = 0.1           # longest wait for the odometry at a sweep's stamp (from arrival)
    calibration_source: str = "tf"      # tf: CameraInfo + TF; file: calibration_file
    calibration_file: str = ""          # CUDA-BEVFusion example-data folder or calibration YAML
    undistort: bool = True              # undo the lens distortion a CameraInfo states (false: images are undistorted)
    queue_size: int = 1                 # frames waiting for the worker; the oldest is dropped
    publish_markers: bool = True
    publish_autoware_objects: bool = False   # also ~/objects: autoware_perception_msgs/DetectedObjects
    output_frame: str = ""              # frame of every output ('': the lidar's); boxes moved there by TF
    class_score_thresholds: tuple[str, ...] = ("",)   # "class:threshold" entries; others: head.score_threshold
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
        parse_class_thresholds(self.class_score_thresholds, pipeline.head.class_names)
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
    :data:`TUNABLE_PIPELINE_KEYS` and the rig's :data:`RIG_PIPELINE_KEYS` (a camera count other
    than the model's is a :class:`ConfigError` naming both); any other difference is a
    :class:`ConfigError` naming each key. Without a model config the parameters must give the
    pipeline sections (NVIDIA's model folders have no ``bevfusion.yaml``). The ``node`` section
    gives the node settings; without ``camera_topics`` there is one per camera, :func:`camera_topic`.
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
    if "camera_topics" not in node_values:
        node_values = {**node_values, "camera_topics": [camera_topic(name) for name in pipeline.camera_names]}
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
    """``model_config`` with the parameters' tunable and rig values; a conflict is a ConfigError."""
    model_flat = flatten_dotted(config_to_dict(model_config))
    given = flatten_dotted(parameters)
    changeable = TUNABLE_PIPELINE_KEYS | RIG_PIPELINE_KEYS
    conflicts = [f"{key}={value!r} (the model says {model_flat[key]!r})" for key, value in given.items()
                 if key in model_flat and value != model_flat[key] and key not in changeable]
    if conflicts:
        raise ConfigError(
            f"the parameters set {', '.join(conflicts)}: {source} wins, because it is the geometry "
            f"the model's networks were exported with; remove these keys from the parameter file "
            f"(it should hold the node.* settings; of the pipeline only "
            f"{', '.join(sorted(changeable))} may differ)")
    _check_camera_count(model_config, given.get("camera_names", model_config.camera_names), source)
    merged = config_from_dict(nest_dotted({**model_flat, **given}))
    scale_changed = given.get("image.resize_scale", model_config.image.resize_scale) != model_config.image.resize_scale
    return _with_input_size(merged, model_config, scale_changed)


def _check_camera_count(model_config: PipelineConfig, camera_names: Any, source: str) -> None:
    """A ConfigError naming both unless ``camera_names`` are as many as the model's cameras (a
    value that is no list is left to the type check of :func:`config_from_dict`)."""
    if isinstance(camera_names, (list, tuple)) and len(camera_names) != model_config.num_cameras:
        raise ConfigError(
            f"config 'camera_names': the parameters name {len(camera_names)} cameras {list(camera_names)}, "
            f"the model of {source} was exported for {model_config.num_cameras} cameras "
            f"{list(model_config.camera_names)} (camera.backbone takes exactly that many images); "
            f"keep {model_config.num_cameras} camera names or export a model for this rig "
            f"(bevfusion-export or bevfusion-train with --rig RIG.yaml or --cameras NAME,...)")


def _with_input_size(config: PipelineConfig, model_config: PipelineConfig, scale_changed: bool) -> PipelineConfig:
    """``config`` whose image size the parameters changed gets the resize that keeps the model's
    network input (:meth:`ImageConfig.for_input_size`), unless they changed ``resize_scale`` too."""
    image = config.image
    if scale_changed or (image.input_width, image.input_height) == (model_config.image.input_width,
                                                                  model_config.image.input_height):
        return config
    fitted = model_config.image.for_input_size(image.input_width, image.input_height)
    return dataclasses.replace(config, image=fitted).validate()


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
