"""What one batch run depends on (:class:`BatchSettings`), built from the node's own parameter
files, so that a bag is read with the settings the node would have had.

The pipeline and node configs come from :func:`~bevfusion_ros.streaming.node_config.configs_from_parameters`
exactly as ``bevfusion_node`` makes them: the model folder's ``bevfusion.yaml`` is the geometry,
the parameter files (``--params``, merged in order, then ``--param NAME=VALUE`` overrides) give
the ``node.*`` settings and may change ``head.score_threshold``. ``node.model_dir`` is replaced
by ``--model``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from bevfusion_ros.analysis.evaluation import DEFAULT_CLASS_RANGE
from bevfusion_ros.config import ConfigError, PipelineConfig, _ros_parameters, config_to_dict, load_config
from bevfusion_ros.pipeline import CONFIG_FILE, ModelDirError
from bevfusion_ros.streaming.node_config import NodeConfig, configs_from_parameters, flatten_dotted, nest_dotted


@dataclass(frozen=True)
class EvalOptions:
    """``--eval``: nuScenes-style metrics against the bags' ground truth (as ``bevfusion-eval``)."""

    class_range: float | Mapping[str, float] = DEFAULT_CLASS_RANGE
    keep_empty_gt: bool = False


@dataclass(frozen=True)
class BatchSettings:
    """Everything a worker needs to run one bag as the node would (sent to every worker)."""

    model_dir: Path                    # absolute
    config: PipelineConfig
    node: NodeConfig                   # backend and precision as run
    threads: int | None = None         # ONNX Runtime intra-op threads of a CPU worker
    markers: bool = True               # write /bevfusion/markers too
    evaluation: EvalOptions | None = None
    prefetch_frames: int = 2           # frames a worker reads ahead while the pipeline runs (0: none)

    @property
    def backend(self) -> str:
        return self.node.backend

    def fingerprint(self) -> str:
        """sha256 of what a bag's outputs depend on: the model's files (names, sizes, times), the
        configs, the backend, markers and evaluation options (not ``prefetch_frames``: it changes
        when frames are read, not what they are). A completed bag is skipped on
        resume only when its fingerprint is this one."""
        files = {path.name: [path.stat().st_size, path.stat().st_mtime_ns]
                 for path in sorted(self.model_dir.iterdir()) if path.is_file()}
        document = {"model": str(self.model_dir), "files": files, "config": config_to_dict(self.config),
                    "node": dataclasses.asdict(self.node), "markers": self.markers,
                    "evaluation": dataclasses.asdict(self.evaluation) if self.evaluation else None}
        text = json.dumps(document, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()


def read_parameter_files(paths: Sequence[Path]) -> dict[str, Any]:
    """The parameters of ROS 2 parameter files (``/**: ros__parameters: ...`` or plain mappings)
    as dotted names, later files winning."""
    flat: dict[str, Any] = {}
    for path in paths:
        try:
            values = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"cannot read parameter file {path}: {error}") from error
        if not isinstance(values, Mapping):
            raise ConfigError(f"parameter file {path}: top level must be a mapping")
        flat.update(flatten_dotted(_ros_parameters(values)))
    return flat


def parse_parameter(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` (or ROS's ``NAME:=VALUE``) -> (dotted name, value parsed as YAML, as rcl does)."""
    name, separator, value = text.partition(":=") if ":=" in text else text.partition("=")
    if not separator or not name.strip():
        raise ValueError(f"expected NAME=VALUE (e.g. node.num_sweeps=1), got {text!r}")
    try:
        return name.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return name.strip(), value


def load_settings(model_dir: Path, parameter_files: Sequence[Path], overrides: Mapping[str, Any],
                  threads: int | None = None, markers: bool | None = None,
                  evaluation: EvalOptions | None = None, prefetch_frames: int = 2) -> BatchSettings:
    """:class:`BatchSettings` for ``model_dir`` from the parameter files and the dotted
    ``overrides`` (module docstring). With ``evaluation``, ``head.score_threshold`` is 0 unless
    ``overrides`` set it, as ``bevfusion-eval`` runs (every proposal counts for AP). ``markers``
    None: ``node.publish_markers``."""
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise ModelDirError(f"model folder {model_dir} does not exist")
    values = {**read_parameter_files(parameter_files), **overrides, "node.model_dir": str(model_dir)}
    if evaluation is not None and "head.score_threshold" not in overrides:
        values["head.score_threshold"] = 0.0
    model_config_path = model_dir / CONFIG_FILE
    model_config = load_config(model_config_path) if model_config_path.is_file() else None
    config, node = configs_from_parameters(nest_dotted(values), model_config, model_config_path)
    if prefetch_frames < 0:
        raise ConfigError(f"prefetch: frames read ahead must be >= 0, got {prefetch_frames}")
    return BatchSettings(model_dir, config, node, threads,
                         node.publish_markers if markers is None else markers, evaluation, prefetch_frames)
