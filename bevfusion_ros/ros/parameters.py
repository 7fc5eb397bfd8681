"""The node's parameters as ROS parameters that ``ros2 param describe`` explains.

Every field of :class:`~bevfusion_ros.config.PipelineConfig` (``camera_names``, ``image.*``, ...,
``head.*``) and of :class:`~bevfusion_ros.streaming.node_config.NodeConfig` (``node.*``) is
declared with a ``ParameterDescriptor``: its type from the dataclass field, its description from
the comment beside it in the shipped parameter files (``config/nuscenes.yaml``,
``config/cuda-bevfusion-resnet50.yaml``: one home for what a parameter means), ``read_only``
unless it is in :data:`RUNTIME_PARAMETERS` (those take effect on the next frame), and a range
where one is fixed (:data:`RANGES`).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any, Iterator

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

from bevfusion_ros.config import PipelineConfig
from bevfusion_ros.streaming.node_config import NodeConfig

#: Parameters a running node accepts (``ros2 param set``); all others need a restart (read_only).
RUNTIME_PARAMETERS: frozenset[str] = frozenset({"head.score_threshold", "node.class_score_thresholds",
                                                "node.sync.missing_camera", "node.publish_markers"})
#: Fixed ranges: (from, to) inclusive.
RANGES: dict[str, tuple[float, float]] = {"head.score_threshold": (0.0, 1.0), "node.num_sweeps": (1, 100),
                                          "node.queue_size": (1, 1000)}
PARAMETER_FILES = ("nuscenes.yaml", "cuda-bevfusion-resnet50.yaml")
_TYPES = {"int": ParameterType.PARAMETER_INTEGER, "float": ParameterType.PARAMETER_DOUBLE,
          "str": ParameterType.PARAMETER_STRING, "bool": ParameterType.PARAMETER_BOOL}
_ARRAY_TYPES = {"int": ParameterType.PARAMETER_INTEGER_ARRAY, "float": ParameterType.PARAMETER_DOUBLE_ARRAY,
                "str": ParameterType.PARAMETER_STRING_ARRAY}
_KEY = re.compile(r"^(/\*\*|[A-Za-z_]\w*):(.*)$")


def parameter_type(annotation: str) -> int:
    """The ParameterType of a dataclass field annotation (``float``, ``tuple[str, ...]``, ...)."""
    if annotation.startswith("tuple["):
        element = annotation[len("tuple["):].split(",")[0].strip(" ]")
        return _ARRAY_TYPES[element]
    return _TYPES[annotation]


def yaml_comments(text: str) -> dict[str, str]:
    """Dotted key -> its comment in a parameter YAML: the comment on the key's line and the
    comment-only lines indented deeper right after it, else the comment lines just above it
    (``/**`` and ``ros__parameters`` are left out of the names). Deeper lines after a key
    without a comment of its own (a section such as ``ros__parameters:``) are above the next key."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    above: list[str] = []
    last: tuple[int, str] | None = None          # the key whose line comment goes on
    for line in text.splitlines():
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            if last is not None and indent > last[0]:
                comments[last[1]] = f"{comments[last[1]]} {stripped[1:].strip()}".strip()
            else:
                above.append(stripped[1:].strip())
                last = None
            continue
        match = _KEY.match(stripped)
        if not match:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(1)))
        name = ".".join(key for _, key in stack if key not in ("/**", "ros__parameters"))
        inline = match.group(2).split("#", 1)[1].strip() if "#" in match.group(2) else ""
        comments[name] = inline or " ".join(above)
        above, last = [], (indent, name) if inline else None
    return comments


def config_dir() -> Path:
    """The shipped ``config/`` folder: the checkout's (source or editable install), else the
    installed package's share folder."""
    checkout = Path(__file__).resolve().parents[2] / "config"
    if checkout.is_dir():
        return checkout
    from ament_index_python.packages import get_package_share_directory
    return Path(get_package_share_directory("bevfusion_ros")) / "config"


@functools.lru_cache(maxsize=1)
def parameter_descriptions() -> dict[str, str]:
    """Dotted parameter name -> description, from the shipped parameter files."""
    descriptions: dict[str, str] = {}
    for name in PARAMETER_FILES:
        path = config_dir() / name
        if path.is_file():
            descriptions.update((key, text) for key, text in yaml_comments(path.read_text()).items() if text)
    return descriptions


def _fields(instance: Any, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """(dotted name, type annotation, value) of every leaf field of a config dataclass."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if dataclasses.is_dataclass(value):
            yield from _fields(value, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", str(field.type), value


def parameter_values(config: PipelineConfig, settings: NodeConfig) -> dict[str, Any]:
    """Dotted name -> value (lists for tuples, floats for float fields) of every parameter."""
    return {name: _ros_value(annotation, value)
            for name, annotation, value in (*_fields(config), *_fields(settings, "node."))}


def _ros_value(annotation: str, value: Any) -> Any:
    if isinstance(value, tuple):
        return [float(v) if parameter_type(annotation) == ParameterType.PARAMETER_DOUBLE_ARRAY else v
                for v in value]
    return float(value) if annotation == "float" else value


def descriptors(config: PipelineConfig, settings: NodeConfig) -> dict[str, ParameterDescriptor]:
    """A ParameterDescriptor per parameter (module docstring)."""
    texts = parameter_descriptions()
    out = {}
    for name, annotation, _ in (*_fields(config), *_fields(settings, "node.")):
        section = name.rsplit(".", 1)[0] if "." in name else ""
        descriptor = ParameterDescriptor(
            name=name, type=parameter_type(annotation), read_only=name not in RUNTIME_PARAMETERS,
            description=texts.get(name) or texts.get(section, "") or f"see config/{PARAMETER_FILES[0]}")
        if name in RANGES:
            low, high = RANGES[name]
            if descriptor.type == ParameterType.PARAMETER_DOUBLE:
                descriptor.floating_point_range = [FloatingPointRange(from_value=float(low), to_value=float(high))]
            else:
                descriptor.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=1)]
        out[name] = descriptor
    return out

