"""``--eval`` of a batch run: each frame's detections against the ground truth of its lidar stamp
(:mod:`bevfusion_ros.analysis.ground_truth`), per bag and pooled over all bags, with the metric
code of ``bevfusion-eval`` (:func:`bevfusion_ros.analysis.evaluation.evaluate`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bevfusion_ros.analysis.evaluation import EvalResult, evaluate
from bevfusion_ros.analysis.ground_truth import FrameTruth
from bevfusion_ros.batch.settings import EvalOptions
from bevfusion_ros.detections import BOX_COLUMNS, Detections


@dataclass
class EvalPairs:
    """Frames to evaluate: per frame the predictions and the ground truth tuple that
    :func:`evaluate` takes; ``answered``: frames with truth that the bag gave detections for."""

    predictions: list[Detections] = field(default_factory=list)
    ground_truth: list[tuple[Any, ...]] = field(default_factory=list)
    answered: int = 0

    def extend(self, other: "EvalPairs") -> None:
        self.predictions += other.predictions
        self.ground_truth += other.ground_truth
        self.answered += other.answered


def pair_with_truth(frames: Sequence[Detections], truths: Mapping[int, FrameTruth],
                    class_names: tuple[str, ...], keep_empty: bool) -> EvalPairs:
    """For each stamp with ground truth, in stamp order, the detections of that stamp (no boxes
    where the bag gave none: its objects count as missed) and the truth."""
    by_stamp = {detections.stamp_ns: detections for detections in frames}
    empty = Detections(np.zeros((0, len(BOX_COLUMNS)), np.float32), class_names)
    stamps = sorted(truths)
    return EvalPairs([by_stamp.get(stamp, empty) for stamp in stamps],
                     [truths[stamp].for_eval(keep_empty) for stamp in stamps],
                     sum(stamp in by_stamp for stamp in stamps))


def metrics(pairs: EvalPairs, class_names: tuple[str, ...], options: EvalOptions) -> EvalResult:
    """nuScenes-style metrics of ``pairs`` (``bevfusion-eval``'s)."""
    return evaluate(pairs.predictions, pairs.ground_truth, class_names, class_range=options.class_range)


def metrics_document(result: EvalResult | None, pairs: EvalPairs, reason: str = "") -> dict[str, Any]:
    """What ``metrics.json`` holds: frames with ground truth and answered, and the metrics (None
    with ``reason`` when there is no ground truth)."""
    return {"frames_with_ground_truth": len(pairs.ground_truth), "frames_answered": pairs.answered,
            "metrics": None if result is None else result.to_dict(), **({"reason": reason} if reason else {})}


def read_detections(path: Path) -> list[Detections]:
    """The frames of a bag's ``detections.json``."""
    document = json.loads(Path(path).read_text())
    return [Detections.from_dict(frame) for frame in document["frames"]]
