"""Engine interface: one network file, tensors bound by name (spec 2.1-2.5, 9 "Engine bindings").

Every backend (ONNX Runtime, PyTorch-GPU, TensorRT) implements :class:`Engine` through
:class:`FileEngine`, which holds the file's path and binding specs.
The pipeline never looks inside an engine; it only reads :attr:`Engine.inputs` /
:attr:`Engine.outputs` and calls :meth:`Engine.run`. :func:`expected_interfaces` derives the
shape every dense file must have from a :class:`PipelineConfig`, and :func:`check_interface`
compares an engine against it, so a model folder that does not fit the configuration fails at
load time with a message naming the file, the tensor and both shapes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bevfusion_ros.config import PipelineConfig
from bevfusion_ros.head.decode import HEAD_OUTPUT_CHANNELS

CAMERA_BACKBONE = "camera.backbone.onnx"
CAMERA_VTRANSFORM = "camera.vtransform.onnx"
FUSER = "fuser.onnx"
HEAD = "head.bbox.onnx"
DENSE_MODEL_FILES = (CAMERA_BACKBONE, CAMERA_VTRANSFORM, FUSER, HEAD)

Shape = tuple[int | None, ...]
"""A tensor shape; ``None`` is a dimension that is free (expected) or dynamic (actual)."""
Interface = dict[str, Shape]
"""Ordered tensor name -> shape."""


class EngineError(RuntimeError):
    """A network file cannot be loaded or run."""


class EngineInterfaceError(EngineError):
    """An engine's tensors do not match what the configuration expects.

    ``problems`` lists one line per missing, unexpected or mis-shaped tensor.
    """

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class TensorSpec:
    """One input or output binding: name, shape (``None`` = dynamic dim) and element type."""

    name: str
    shape: Shape
    dtype: np.dtype


def format_shape(shape: Shape) -> str:
    """``[1, 6, 3, 256, 704]``; free or dynamic dimensions print as ``*``."""
    return "[" + ", ".join("*" if dim is None else str(dim) for dim in shape) + "]"


class Engine(ABC):
    """A loaded network: named input/output tensors and a ``run`` that maps feeds to outputs."""

    @property
    @abstractmethod
    def name(self) -> str:
        """File name of the network, e.g. ``camera.backbone.onnx`` (used in every message)."""

    @property
    @abstractmethod
    def backend(self) -> str:
        """What executes it, e.g. ``onnxruntime:CPUExecutionProvider``."""

    @property
    @abstractmethod
    def inputs(self) -> dict[str, TensorSpec]:
        """Input bindings in the file's order."""

    @property
    @abstractmethod
    def outputs(self) -> dict[str, TensorSpec]:
        """Output bindings in the file's order."""

    @abstractmethod
    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run once: every input by name -> every output by name."""

    def check_feeds(self, feeds: Mapping[str, Any]) -> None:
        """Raise :class:`EngineError` unless ``feeds`` has exactly the inputs, with their shapes."""
        unknown = sorted(set(feeds) - set(self.inputs))
        missing = [name for name in self.inputs if name not in feeds]
        if unknown or missing:
            raise EngineError(f"{self.name}: feeds {sorted(feeds)} do not match the inputs "
                              f"{list(self.inputs)} (unknown {unknown}, missing {missing})")
        for name, spec in self.inputs.items():
            shape = tuple(feeds[name].shape)
            if not shape_matches(shape, spec.shape):
                raise EngineError(f"{self.name}: feed '{name}' has shape {format_shape(shape)}, "
                                  f"expected {format_shape(spec.shape)}")

    def __repr__(self) -> str:
        def describe(specs: dict[str, TensorSpec]) -> str:
            return ", ".join(f"{spec.name} {format_shape(spec.shape)}" for spec in specs.values())
        return f"<{type(self).__name__} {self.name} on {self.backend}: ({describe(self.inputs)}) " \
               f"-> ({describe(self.outputs)})>"


class FileEngine(Engine):
    """An :class:`Engine` over one network file whose bindings are fixed when it is loaded.

    The backends' common part: a subclass sets :attr:`path` and, once it has read the file,
    ``_inputs`` / ``_outputs`` (name -> :class:`TensorSpec` in the file's order); this class
    provides :attr:`name` (the file name) and :attr:`inputs` / :attr:`outputs` (copies, so a
    caller cannot change the engine's own specs).
    """

    path: Path
    _inputs: dict[str, TensorSpec]
    _outputs: dict[str, TensorSpec]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def inputs(self) -> dict[str, TensorSpec]:
        return dict(self._inputs)

    @property
    def outputs(self) -> dict[str, TensorSpec]:
        return dict(self._outputs)


def shape_matches(actual: Shape, expected: Shape) -> bool:
    """Same rank and every dimension equal, where ``None`` in ``expected`` matches anything.

    A dynamic (``None``) dimension in ``actual`` only matches a free expected one: the
    CUDA-BEVFusion bindings are static (spec 2.1).
    """
    return len(actual) == len(expected) and all(
        want is None or have == want for have, want in zip(actual, expected))


def _compare(engine: Engine, kind: str, actual: dict[str, TensorSpec],
             expected: Mapping[str, Shape]) -> list[str]:
    problems = []
    for name, shape in expected.items():
        if name not in actual:
            problems.append(f"{engine.name}: missing {kind} '{name}' (expected {format_shape(shape)})")
        elif not shape_matches(actual[name].shape, shape):
            problems.append(f"{engine.name}: {kind} '{name}' has shape "
                            f"{format_shape(actual[name].shape)}, expected {format_shape(shape)}")
    problems.extend(f"{engine.name}: unexpected {kind} '{name}' {format_shape(spec.shape)}"
                    for name, spec in actual.items() if name not in expected)
    return problems


def check_interface(engine: Engine, expected_inputs: Mapping[str, Shape],
                    expected_outputs: Mapping[str, Shape]) -> None:
    """Raise :class:`EngineInterfaceError` listing every tensor that differs from the expectation.

    Names must match exactly (bindings are by name, so order does not matter); shapes must
    match except for ``None`` dimensions in the expectation.
    """
    problems = (_compare(engine, "input", engine.inputs, expected_inputs)
                + _compare(engine, "output", engine.outputs, expected_outputs))
    if problems:
        raise EngineInterfaceError(problems)


def check_camera_count(engine: Engine, config: PipelineConfig) -> None:
    """Raise :class:`EngineInterfaceError` naming both counts (and the configured cameras) unless
    ``camera.backbone``'s camera batch (dimension 1 of its input ``img``) is ``config``'s."""
    img = engine.inputs.get("img")
    if img is None or len(img.shape) != 5 or img.shape[1] == config.num_cameras:
        return                                   # check_interface reports other shapes
    raise EngineInterfaceError([
        f"{engine.name} was exported for {img.shape[1]} cameras (input 'img' {format_shape(img.shape)}), "
        f"the configuration has {config.num_cameras}: {list(config.camera_names)}; use a model "
        f"exported for this rig (bevfusion-export --rig RIG.yaml or --cameras NAME,...)"])


def check_dense_engines(engines: Mapping[str, Engine], config: PipelineConfig) -> None:
    """Raise :class:`EngineInterfaceError` unless the four dense engines fit ``config`` and the
    fuser's output ``middle`` has exactly the shape of the head's input. A camera count other
    than ``camera.backbone``'s is reported first, on its own (:func:`check_camera_count`)."""
    check_camera_count(engines[CAMERA_BACKBONE], config)
    for name, (inputs, outputs) in expected_interfaces(config).items():
        check_interface(engines[name], inputs, outputs)
    middle_out, middle_in = engines[FUSER].outputs["middle"].shape, engines[HEAD].inputs["middle"].shape
    if middle_out != middle_in:
        raise EngineInterfaceError([f"{FUSER} output 'middle' {format_shape(middle_out)} does not "
                                    f"match {HEAD} input 'middle' {format_shape(middle_in)}"])


def expected_interfaces(config: PipelineConfig, lidar_bev_channels: int | None = None
                        ) -> dict[str, tuple[Interface, Interface]]:
    """File name -> (inputs, outputs) of the four dense networks for ``config`` (spec 2.2-2.5).

    Shapes (N cameras, oh x ow network input, fH x fW features, C camera channels, D depth
    bins, camera BEV Xc x Yc, fused BEV X x Y, K proposals):

    * ``camera.backbone.onnx``: img ``[1, N, 3, oh, ow]``, depth ``[1, N, 1, oh, ow]`` ->
      camera_feature ``[N, fH, fW, C]`` (NHWC), camera_depth_weights ``[N, D, fH, fW]``;
    * ``camera.vtransform.onnx``: feat_in ``[1, C, Xc, Yc]`` -> feat_out ``[1, C, X, Y]``;
    * ``fuser.onnx``: camera ``[1, C, X, Y]``, lidar ``[1, L, X, Y]`` -> middle ``[1, *, X, Y]``;
    * ``head.bbox.onnx``: middle ``[1, *, X, Y]`` -> score ``[1, classes, K]``, rot ``[1, 2, K]``,
      dim ``[1, 3, K]``, reg ``[1, 2, K]``, height ``[1, 1, K]``, vel ``[1, 2, K]``.

    The config does not fix the decoder width (``*``) nor the lidar channels L unless
    ``lidar_bev_channels`` is given (``None`` accepts any).
    """
    image, geometry = config.image, config.camera_geometry
    cameras, channels = config.num_cameras, geometry.camera_channels
    feature = (geometry.feature_height, geometry.feature_width)
    camera_bev = geometry.bev_size[:2]
    bev = config.bev_size
    proposals, classes = config.head.num_proposals, len(config.head.class_names)
    head_outputs: Interface = {name: (1, classes if count is None else count, proposals)
                               for name, count in HEAD_OUTPUT_CHANNELS.items()}
    return {
        CAMERA_BACKBONE: (
            {"img": (1, cameras, 3, image.output_height, image.output_width),
             "depth": (1, cameras, 1, image.output_height, image.output_width)},
            {"camera_feature": (cameras, *feature, channels),
             "camera_depth_weights": (cameras, geometry.depth_bins, *feature)}),
        CAMERA_VTRANSFORM: ({"feat_in": (1, channels, *camera_bev)},
                            {"feat_out": (1, channels, *bev)}),
        FUSER: ({"camera": (1, channels, *bev), "lidar": (1, lidar_bev_channels, *bev)},
                {"middle": (1, None, *bev)}),
        HEAD: ({"middle": (1, None, *bev)}, head_outputs),
    }
