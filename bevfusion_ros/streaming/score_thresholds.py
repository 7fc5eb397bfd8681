"""Per-class score thresholds (``node.class_score_thresholds``), ROS-free.

The parameter is a list of ``"class:threshold"`` strings, e.g. ``[car:0.3, pedestrian:0.2]``
(``ros2 param set /bevfusion node.class_score_thresholds "[car:0.3, pedestrian:0.2]"``); empty
entries are ignored (``['']``, the default, sets none: ROS cannot declare an empty string list).
A box is kept when its score is at least its class's threshold, ``head.score_threshold`` for a
class without one. The head decodes with the lowest of all thresholds
(:attr:`ScoreThresholds.decode_threshold`), so a class threshold below ``head.score_threshold``
keeps that class's weaker boxes too; :meth:`ScoreThresholds.apply` then cuts each class.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from bevfusion_ros.config import ConfigError
from bevfusion_ros.detections import LABEL, SCORE, Detections

PARAMETER = "node.class_score_thresholds"
SEPARATOR = ":"


def parse_class_thresholds(entries: Sequence[str], class_names: Sequence[str]) -> dict[str, float]:
    """``["car:0.3", ...]`` -> ``{"car": 0.3, ...}``; raises :class:`ConfigError` naming the
    parameter for an entry without ``class:threshold``, an unknown class, a threshold that is no
    number in [0, 1], or a class given twice. Empty entries are skipped."""
    thresholds: dict[str, float] = {}
    for entry in entries:
        text = entry.strip()
        if not text:
            continue
        name, separator, value = text.rpartition(SEPARATOR)
        name = name.strip()
        if not separator or not name:
            raise ConfigError(f"{PARAMETER}: entry {entry!r} is not 'class:threshold' (e.g. 'car:0.3')")
        if name not in class_names:
            raise ConfigError(f"{PARAMETER}: unknown class {name!r} in {entry!r}; the model's classes: "
                              f"{list(class_names)}")
        if name in thresholds:
            raise ConfigError(f"{PARAMETER}: class {name!r} is given twice")
        thresholds[name] = _threshold(value, entry)
    return thresholds


def _threshold(text: str, entry: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{PARAMETER}: threshold {text.strip()!r} in {entry!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{PARAMETER}: threshold {value} in {entry!r} must be in [0, 1]")
    return value


@dataclass(frozen=True)
class ScoreThresholds:
    """``default`` (``head.score_threshold``) and the ``per_class`` exceptions (class name ->
    threshold) of the model's ``class_names``."""

    default: float
    class_names: tuple[str, ...]
    per_class: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_entries(cls, default: float, entries: Sequence[str], class_names: Sequence[str]) -> "ScoreThresholds":
        """From the parameter's strings (:func:`parse_class_thresholds`)."""
        names = tuple(class_names)
        return cls(float(default), names, parse_class_thresholds(entries, names))

    def with_default(self, default: float) -> "ScoreThresholds":
        return dataclasses.replace(self, default=float(default))

    def with_entries(self, entries: Sequence[str]) -> "ScoreThresholds":
        return dataclasses.replace(self, per_class=parse_class_thresholds(entries, self.class_names))

    def per_label(self) -> np.ndarray:
        """Threshold of each class index, float64 ``[C]``."""
        return np.array([self.per_class.get(name, self.default) for name in self.class_names], dtype=np.float64)

    @property
    def decode_threshold(self) -> float:
        """The lowest threshold: what the head must keep for :meth:`apply` to choose from."""
        return min([self.default, *self.per_class.values()])

    def apply(self, detections: Detections) -> Detections:
        """``detections`` without the boxes scoring below their class's threshold (order kept).
        Scores are compared in their own precision, as the head's decoding compares them."""
        if detections.class_names != self.class_names:
            raise ValueError(f"detections of classes {list(detections.class_names)}, thresholds of "
                             f"{list(self.class_names)}")
        if not self.per_class:
            return detections
        scores = detections.boxes[:, SCORE]
        limits = self.per_label()[detections.boxes[:, LABEL].astype(np.int64)].astype(scores.dtype)
        return dataclasses.replace(detections, boxes=detections.boxes[scores >= limits])
