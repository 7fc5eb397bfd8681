"""nuScenes-style detection metrics of pipeline output against ground-truth boxes.

    result = evaluate(predictions, ground_truth, class_names)   # -> EvalResult
    print(result.format_table()); json.dump(result.to_dict(), ...)

``predictions``: one :class:`~bevfusion_ros.detections.Detections` (or a float ``[M, 11]`` array
in its layout) per frame; ``ground_truth``: one ``(boxes [M, 9], labels [M])`` or
``(boxes, labels, num_points [M])`` per frame, boxes in the CUDA layout x, y, z (centre), w, l,
h, yaw (mmdet3d, clockwise), vx, vy and labels indexing ``class_names``.

The metric code is nuscenes-devkit's own. How a box is converted for it, which filters replace
what its ``DetectionEval`` does with a ``NuScenes`` object, and how every summary number (AP,
mAP, TP errors, NDS) is defined: docs/evaluation.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from bevfusion_ros.detections import LABEL, SCORE, VX, VY, YAW, Detections, H, L, W, X, Y, Z, rep103_heading

DIST_THS = (0.5, 1.0, 2.0, 4.0)
DIST_TH_TP = 2.0
MIN_RECALL = 0.1
MIN_PRECISION = 0.1
MAX_BOXES_PER_SAMPLE = 500
MEAN_AP_WEIGHT = 5
DEFAULT_CLASS_RANGE = 50.0                    # m, every class
NUSCENES_CLASS_RANGE = {"car": 50.0, "truck": 50.0, "bus": 50.0, "trailer": 50.0,
                        "construction_vehicle": 50.0, "pedestrian": 40.0, "motorcycle": 40.0,
                        "bicycle": 40.0, "traffic_cone": 30.0, "barrier": 30.0}
TP_METRICS = ("trans_err", "scale_err", "orient_err", "vel_err")      # attr_err: no attributes
NOT_APPLICABLE = {"traffic_cone": ("orient_err", "vel_err"), "barrier": ("vel_err",)}
MIN_SIZE = 1e-3                               # m, predicted sizes are clipped to this


def _devkit():
    """The devkit modules (imported on first use: they take ~1.5 s and are an optional extra)."""
    try:
        from nuscenes.eval.common.data_classes import EvalBoxes
        from nuscenes.eval.detection import algo
        from nuscenes.eval.detection.constants import DETECTION_NAMES
        from nuscenes.eval.detection.data_classes import DetectionBox, DetectionConfig, DetectionMetrics
    except ImportError as error:       # pragma: no cover - depends on the environment
        raise ImportError("evaluation needs nuscenes-devkit: pip install -e .[nuscenes] && "
                          "pip install --no-deps -r requirements/nuscenes.txt") from error
    return EvalBoxes, algo, DETECTION_NAMES, DetectionBox, DetectionConfig, DetectionMetrics


def detection_config(class_range: float | Mapping[str, float] = DEFAULT_CLASS_RANGE):
    """The devkit ``DetectionConfig`` used here: center_distance, thresholds 0.5/1/2/4 m, TP
    errors at 2 m, min recall/precision 0.1, 500 boxes per sample, mAP weight 5.

    ``class_range``: one radius (m) for every class, or a mapping over nuScenes' ten names.
    """
    _, _, names, _, DetectionConfig, _ = _devkit()
    if isinstance(class_range, Mapping):
        ranges = {name: float(class_range[name]) for name in names}
    else:
        ranges = {name: float(class_range) for name in names}
    return DetectionConfig(class_range=ranges, dist_fcn="center_distance", dist_ths=list(DIST_THS),
                           dist_th_tp=DIST_TH_TP, min_recall=MIN_RECALL, min_precision=MIN_PRECISION,
                           max_boxes_per_sample=MAX_BOXES_PER_SAMPLE, mean_ap_weight=MEAN_AP_WEIGHT)


def heading_quaternion(heading: float) -> tuple[float, float, float, float]:
    """(w, x, y, z) of a rotation by ``heading`` (rad, counter-clockwise) about +z."""
    return (math.cos(heading / 2), 0.0, 0.0, math.sin(heading / 2))


def count_points_in_boxes(points: np.ndarray, boxes: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """Lidar points inside each CUDA-layout box (z = centre), int ``[M]``.

    For frames without per-box counts (example-data folders): a point counts when it lies in
    the box footprint grown by ``margin`` on every side (points on the surface, float16
    rounding) and between ``margin`` above the box bottom (so ground returns under a box resting
    on the ground do not count) and ``margin`` above its top.
    """
    points = np.asarray(points, dtype=np.float64)[:, :3]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 9)
    counts = np.zeros(len(boxes), dtype=np.int64)
    for index, box in enumerate(boxes):
        heading = float(rep103_heading(box[YAW]))
        dx, dy = points[:, 0] - box[X], points[:, 1] - box[Y]
        along = math.cos(heading) * dx + math.sin(heading) * dy
        across = -math.sin(heading) * dx + math.cos(heading) * dy
        dz = points[:, 2] - box[Z]
        inside = ((np.abs(along) <= box[L] / 2 + margin) & (np.abs(across) <= box[W] / 2 + margin)
                  & (dz > -box[H] / 2 + margin) & (dz <= box[H] / 2 + margin))
        counts[index] = int(inside.sum())
    return counts


@dataclass
class EvalResult:
    """Metrics of one evaluation (docs/evaluation.md defines each).

    class_names:      the ten nuScenes detection names, in the evaluated model's order;
    num_frames:       frames evaluated; dist_ths: the matching thresholds (m);
    gt_counts / pred_counts: boxes per class after the filters;
    present_classes:  classes with ground truth (the ones ``mean_ap`` and ``mean_tp_errors`` average);
    ap:               class -> threshold -> AP; class_mean_ap: class -> mean AP over the thresholds;
    mean_ap:          mean of class_mean_ap over present classes (NaN when none is present);
    tp_errors:        class -> metric -> error (NaN: not applicable); mean_tp_errors: over present
                      classes; nuscenes_mean_ap / nuscenes_tp_errors: the devkit's, all ten classes;
    nds:              nuScenes detection score without the attribute term (present classes);
    filtered:         boxes dropped by each filter; config: the devkit DetectionConfig, serialized.
    """

    class_names: tuple[str, ...]
    num_frames: int
    dist_ths: tuple[float, ...]
    gt_counts: dict[str, int]
    pred_counts: dict[str, int]
    present_classes: tuple[str, ...]
    ap: dict[str, dict[float, float]]
    class_mean_ap: dict[str, float]
    mean_ap: float
    tp_errors: dict[str, dict[str, float]]
    mean_tp_errors: dict[str, float]
    nuscenes_mean_ap: float
    nuscenes_tp_errors: dict[str, float]
    nds: float
    filtered: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: thresholds become strings ("0.5"), NaN becomes None."""
        def number(value: float) -> float | None:
            return None if value is None or math.isnan(value) else float(value)

        return {
            "num_frames": self.num_frames,
            "class_names": list(self.class_names),
            "present_classes": list(self.present_classes),
            "mean_ap_over": "classes present in the ground truth (absent classes excluded)",
            "mean_ap": number(self.mean_ap),
            "mean_tp_errors": {key: number(value) for key, value in self.mean_tp_errors.items()},
            "nds": number(self.nds),
            "nuscenes_mean_ap": number(self.nuscenes_mean_ap),
            "nuscenes_tp_errors": {key: number(value) for key, value in self.nuscenes_tp_errors.items()},
            "dist_ths": list(self.dist_ths),
            "gt_counts": dict(self.gt_counts),
            "pred_counts": dict(self.pred_counts),
            "ap": {name: {str(th): number(value) for th, value in per.items()}
                   for name, per in self.ap.items()},
            "class_mean_ap": {name: number(value) for name, value in self.class_mean_ap.items()},
            "tp_errors": {name: {key: number(value) for key, value in per.items()}
                          for name, per in self.tp_errors.items()},
            "filtered": dict(self.filtered),
            "config": self.config,
        }

    def format_table(self) -> str:
        """Per-class table (AP per threshold, mAP, TP errors) and the summary lines."""
        def cell(value: float, width: int = 7) -> str:
            return f"{'-':>{width}}" if value is None or math.isnan(value) else f"{value:{width}.3f}"

        ths = [f"AP@{th:g}" for th in self.dist_ths]
        header = (f"{'class':<21}{'GT':>6}{'pred':>7}" + "".join(f"{name:>7}" for name in ths)
                  + f"{'mAP':>7}{'ATE':>7}{'ASE':>7}{'AOE':>7}{'AVE':>7}")
        lines = [header, "-" * len(header)]
        for name in self.class_names:
            present = name in self.present_classes
            row = f"{name:<21}{self.gt_counts[name]:>6}{self.pred_counts[name]:>7}"
            if present:
                row += "".join(cell(self.ap[name][th]) for th in self.dist_ths) + cell(self.class_mean_ap[name])
                row += "".join(cell(self.tp_errors[name][metric]) for metric in TP_METRICS)
            else:
                row += "   (absent from the ground truth: excluded from mAP)"
            lines.append(row)
        lines.append("-" * len(header))
        errors = ", ".join(f"{metric} {cell(self.mean_tp_errors[metric], 0)}" for metric in TP_METRICS)
        lines += [f"mAP over the {len(self.present_classes)} classes present in the ground truth: "
                  f"{cell(self.mean_ap, 0)}   (nuScenes mAP over all 10 classes: "
                  f"{cell(self.nuscenes_mean_ap, 0)})",
                  f"mean TP errors (present classes, 2 m matches): {errors}",
                  f"NDS without the attribute term: {cell(self.nds, 0)}   frames: {self.num_frames}"]
        if any(self.filtered.values()):
            lines.append("filtered: " + ", ".join(f"{key} {value}" for key, value in self.filtered.items()))
        return "\n".join(lines)


def _names(class_names: Sequence[str], name_map: Mapping[str, str] | None,
           detection_names: Sequence[str]) -> list[str]:
    """nuScenes detection name per class index."""
    mapped = [name_map.get(name, name) if name_map else name for name in class_names]
    unknown = sorted(set(mapped) - set(detection_names))
    if unknown:
        raise ValueError(f"class names {unknown} are not nuScenes detection names "
                         f"({list(detection_names)}); pass name_map")
    return mapped


def _box(DetectionBox, token: str, row: np.ndarray, name: str, score: float = -1.0,
         num_pts: int = -1):
    centre = (float(row[X]), float(row[Y]), float(row[Z]))
    return DetectionBox(
        sample_token=token, translation=centre,
        size=(float(row[W]), float(row[L]), float(row[H])),
        rotation=heading_quaternion(float(rep103_heading(row[YAW]))),
        velocity=(float(row[VX]), float(row[VY])), ego_translation=centre, num_pts=int(num_pts),
        detection_name=name, detection_score=float(score), attribute_name="")


def _in_range(row: np.ndarray, name: str, config) -> bool:
    """The devkit's distance filter: xy distance from the ego (lidar origin) < class range."""
    return math.hypot(float(row[X]), float(row[Y])) < config.class_range[name]


def _ground_truth_boxes(token: str, index: int, truth: tuple[Any, ...], names: Sequence[str], config,
                        filtered: dict[str, int]) -> list:
    """Devkit boxes of frame ``index``'s ground truth that pass the range and point filters
    (the others are counted in ``filtered``)."""
    _, _, _, DetectionBox, _, _ = _devkit()
    boxes = np.asarray(truth[0], dtype=np.float64).reshape(-1, 9)
    labels = np.asarray(truth[1]).reshape(-1).astype(np.int64)
    num_points = (np.asarray(truth[2]).reshape(-1) if len(truth) > 2 and truth[2] is not None
                  else np.full(len(boxes), -1))
    if not len(boxes) == len(labels) == len(num_points):
        raise ValueError(f"frame {index}: {len(boxes)} boxes, {len(labels)} labels, "
                         f"{len(num_points)} point counts")
    kept = []
    for row, label, count in zip(boxes, labels, num_points):
        name = names[label]
        if not _in_range(row, name, config):
            filtered["gt_out_of_range"] += 1
        elif count == 0:
            filtered["gt_without_points"] += 1
        else:
            kept.append(_box(DetectionBox, token, row, name, num_pts=int(count)))
    return kept


def _prediction_boxes(token: str, rows: np.ndarray, names: Sequence[str], config,
                      filtered: dict[str, int]) -> list:
    """Devkit boxes of one frame's predictions: finite rows only, the
    ``max_boxes_per_sample`` best, sizes clipped to MIN_SIZE, within range (drops counted in
    ``filtered``)."""
    _, _, _, DetectionBox, _, _ = _devkit()
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 11)
    finite = np.isfinite(rows).all(axis=1)
    filtered["pred_non_finite"] += int((~finite).sum())
    rows = rows[finite]
    rows = rows[np.argsort(-rows[:, SCORE], kind="stable")]
    filtered["pred_over_max_boxes"] += max(0, len(rows) - config.max_boxes_per_sample)
    rows = rows[:config.max_boxes_per_sample].copy()
    rows[:, [W, L, H]] = np.maximum(rows[:, [W, L, H]], MIN_SIZE)
    kept = []
    for row in rows:
        name = names[int(row[LABEL])]
        if _in_range(row, name, config):
            kept.append(_box(DetectionBox, token, row, name, score=float(row[SCORE])))
        else:
            filtered["pred_out_of_range"] += 1
    return kept


def _eval_boxes(predictions: Sequence[Detections | np.ndarray], ground_truth: Sequence[tuple[Any, ...]],
                gt_names: Sequence[str], name_map: Mapping[str, str] | None, config):
    """(ground-truth EvalBoxes, prediction EvalBoxes, boxes dropped per filter), one sample
    ``frame-{i}`` per frame."""
    EvalBoxes, _, detection_names, _, _, _ = _devkit()
    filtered = {"gt_out_of_range": 0, "gt_without_points": 0, "pred_out_of_range": 0,
                "pred_non_finite": 0, "pred_over_max_boxes": 0}
    gt_boxes, pred_boxes = EvalBoxes(), EvalBoxes()
    for index, (prediction, truth) in enumerate(zip(predictions, ground_truth)):
        token = f"frame-{index}"
        gt_boxes.add_boxes(token, _ground_truth_boxes(token, index, truth, gt_names, config, filtered))
        if isinstance(prediction, Detections):
            rows, names = prediction.boxes, _names(prediction.class_names, name_map, detection_names)
        else:
            rows, names = prediction, gt_names
        pred_boxes.add_boxes(token, _prediction_boxes(token, rows, names, config, filtered))
    return gt_boxes, pred_boxes, filtered


def _class_metrics(gt_boxes, pred_boxes, names: Sequence[str], config, metrics
                   ) -> tuple[dict[str, dict[float, float]], dict[str, dict[str, float]]]:
    """As DetectionEval.evaluate: per class, accumulate the matches at each distance threshold,
    then AP per threshold and the TP errors at ``dist_th_tp`` (also added to ``metrics``)."""
    _, algo, _, _, _, _ = _devkit()
    ap: dict[str, dict[float, float]] = {}
    tp_errors: dict[str, dict[str, float]] = {}
    for name in names:
        ap[name] = {}
        for threshold in config.dist_ths:
            data = algo.accumulate(gt_boxes, pred_boxes, name, config.dist_fcn_callable, threshold)
            ap[name][threshold] = algo.calc_ap(data, config.min_recall, config.min_precision)
            metrics.add_label_ap(name, threshold, ap[name][threshold])
            if threshold == config.dist_th_tp:
                tp_data = data
        tp_errors[name] = {}
        for metric in TP_METRICS:
            error = (float("nan") if metric in NOT_APPLICABLE.get(name, ())
                     else algo.calc_tp(tp_data, config.min_recall, metric))
            tp_errors[name][metric] = error
            metrics.add_label_tp(name, metric, error)
    return ap, tp_errors


def _class_counts(boxes, names: Sequence[str]) -> dict[str, int]:
    """Boxes per detection name, every name of ``names`` included (0 when none)."""
    counts = {name: 0 for name in names}
    for box in boxes.all:
        counts[box.detection_name] += 1
    return counts


def evaluate(predictions: Sequence[Detections | np.ndarray],
             ground_truth: Sequence[tuple[Any, ...]],
             class_names: Sequence[str],
             class_range: float | Mapping[str, float] = DEFAULT_CLASS_RANGE,
             name_map: Mapping[str, str] | None = None) -> EvalResult:
    """nuScenes detection metrics of ``predictions`` against ``ground_truth`` (one entry per frame).

    ``class_names`` names the ground-truth labels (and the labels of prediction arrays;
    :class:`Detections` bring their own ``class_names``). ``name_map`` renames classes to
    nuScenes detection names. docs/evaluation.md describes the conversion and the filters.
    """
    _, _, detection_names, _, _, DetectionMetrics = _devkit()
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} prediction frames but {len(ground_truth)} "
                         "ground-truth frames")
    config = detection_config(class_range)
    gt_names = _names(class_names, name_map, detection_names)
    gt_boxes, pred_boxes, filtered = _eval_boxes(predictions, ground_truth, gt_names, name_map, config)
    # Order: the model's classes first, then any other nuScenes names.
    ordered = list(dict.fromkeys([*gt_names, *detection_names]))
    gt_counts = _class_counts(gt_boxes, ordered)
    present = tuple(name for name in ordered if gt_counts[name] > 0)
    metrics = DetectionMetrics(config)
    ap, tp_errors = _class_metrics(gt_boxes, pred_boxes, ordered, config, metrics)
    class_mean_ap = {name: float(np.mean(list(ap[name].values()))) for name in ordered}
    mean_ap = float(np.mean([class_mean_ap[name] for name in present])) if present else float("nan")
    mean_tp = {metric: _nanmean([tp_errors[name][metric] for name in present]) for metric in TP_METRICS}
    devkit_tp = {metric: metrics.tp_errors[metric] for metric in TP_METRICS}   # nanmean, 10 classes
    nds = (config.mean_ap_weight * mean_ap + sum(1.0 - min(1.0, error) for error in mean_tp.values()
                                                 if not math.isnan(error))
           ) / (config.mean_ap_weight + len(TP_METRICS))
    return EvalResult(class_names=tuple(ordered), num_frames=len(ground_truth), dist_ths=tuple(DIST_THS),
                      gt_counts=gt_counts, pred_counts=_class_counts(pred_boxes, ordered),
                      present_classes=present, ap=ap, class_mean_ap=class_mean_ap, mean_ap=mean_ap,
                      tp_errors=tp_errors, mean_tp_errors=mean_tp,
                      nuscenes_mean_ap=float(metrics.mean_ap), nuscenes_tp_errors=devkit_tp,
                      nds=float(nds), filtered=filtered, config=config.serialize())


def _nanmean(values: Sequence[float]) -> float:
    """Mean ignoring NaN; NaN when nothing is left."""
    kept = [value for value in values if not math.isnan(value)]
    return float(np.mean(kept)) if kept else float("nan")
