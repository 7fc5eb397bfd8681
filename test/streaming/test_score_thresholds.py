"""Per-class score thresholds (node.class_score_thresholds), ROS-free: parsing, the boxes kept
(against a brute-force loop), and the head decoding with the lowest threshold so that a class
threshold below head.score_threshold keeps that class's weaker boxes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bevfusion_ros.config import NUSCENES_CLASS_NAMES, ConfigError, PipelineConfig
from bevfusion_ros.detections import Detections
from bevfusion_ros.head.decode import decode_boxes
from bevfusion_ros.streaming.score_thresholds import ScoreThresholds, parse_class_thresholds

NAMES = NUSCENES_CLASS_NAMES


def test_entries_parse_with_spaces_and_empty_entries_skipped():
    assert parse_class_thresholds(["car:0.3", " pedestrian : 0.25 ", "", "traffic_cone:1", "barrier:0"],
                                  NAMES) == {"car": 0.3, "pedestrian": 0.25, "traffic_cone": 1.0, "barrier": 0.0}
    assert parse_class_thresholds([""], NAMES) == {}
    assert parse_class_thresholds([], NAMES) == {}


@pytest.mark.parametrize("entry,message", [
    ("car", "not 'class:threshold'"), (":0.3", "not 'class:threshold'"), ("lorry:0.3", "unknown class 'lorry'"),
    ("car:high", "is not a number"), ("car:1.5", "must be in \\[0, 1\\]"), ("car:-0.1", "must be in \\[0, 1\\]"),
    ("car:nan", "must be in \\[0, 1\\]"), ("car:", "is not a number"),
])
def test_bad_entries_are_refused_naming_the_parameter(entry, message):
    with pytest.raises(ConfigError, match=f"node.class_score_thresholds: .*{message}"):
        parse_class_thresholds([entry], NAMES)


def test_a_class_given_twice_is_refused():
    with pytest.raises(ConfigError, match="'car' is given twice"):
        parse_class_thresholds(["car:0.3", "car:0.4"], NAMES)


def random_detections(seed: int, count: int) -> Detections:
    rng = np.random.default_rng(seed)
    boxes = rng.uniform(-5, 5, (count, 11)).astype(np.float32)
    boxes[:, 9] = rng.integers(0, len(NAMES), count)
    boxes[:, 10] = np.sort(rng.uniform(0, 1, count).astype(np.float32))[::-1]
    return Detections(boxes, NAMES)


def brute_force_kept(detections: Detections, default: float, per_class: dict[str, float]) -> np.ndarray:
    rows = []
    for row in detections.boxes:
        limit = per_class.get(NAMES[int(row[9])], default)
        if float(row[10]) >= limit:
            rows.append(row)
    return np.array(rows, dtype=detections.boxes.dtype).reshape(-1, 11)


def test_each_class_is_cut_at_its_threshold_and_the_rest_at_the_default():
    detections = random_detections(5, 400)
    per_class = {"car": 0.8, "pedestrian": 0.05, "barrier": 0.5}
    thresholds = ScoreThresholds.from_entries(0.3, [f"{k}:{v}" for k, v in per_class.items()], NAMES)
    scores = detections.boxes[:, 10].astype(np.float64)
    limits = np.array([0.8, 0.05, 0.5, 0.3])
    assert np.min(np.abs(scores[:, None] - limits[None])) > 1e-6        # no score on a threshold
    kept = thresholds.apply(detections)
    np.testing.assert_array_equal(kept.boxes, brute_force_kept(detections, 0.3, per_class))
    assert 0 < len(kept) < len(detections) and kept.class_names == NAMES
    assert thresholds.decode_threshold == 0.05
    np.testing.assert_array_equal(thresholds.per_label(), [0.8 if n == "car" else 0.05 if n == "pedestrian"
                                                           else 0.5 if n == "barrier" else 0.3 for n in NAMES])


def test_run_time_changes_give_new_thresholds():
    thresholds = ScoreThresholds.from_entries(0.2, ["car:0.5"], NAMES)
    lowered = thresholds.with_default(0.1).with_entries(["bus:0.9"])
    assert (lowered.default, dict(lowered.per_class), lowered.decode_threshold) == (0.1, {"bus": 0.9}, 0.1)
    assert dict(thresholds.per_class) == {"car": 0.5}                  # the original is unchanged
    with pytest.raises(ConfigError, match="unknown class 'lorry'"):
        thresholds.with_entries(["lorry:0.1"])


def test_without_class_thresholds_nothing_is_cut_beyond_the_head():
    detections = random_detections(6, 50)
    assert ScoreThresholds.from_entries(0.9, [""], NAMES).apply(detections) is detections


def test_detections_of_other_classes_are_refused():
    other = Detections(np.zeros((0, 11), np.float32), ("a", "b"))
    with pytest.raises(ValueError, match="classes"):
        ScoreThresholds.from_entries(0.1, ["car:0.3"], NAMES).apply(other)


def test_head_decoding_at_the_lowest_threshold_then_cut_equals_a_brute_force_per_class_decode():
    """A class threshold below head.score_threshold (pedestrian 0.05 < 0.4): decoding at the
    default would lose those boxes; decoding at decode_threshold then cutting keeps exactly the
    boxes a per-class decode would."""
    config = PipelineConfig()
    classes, proposals = len(config.head.class_names), 300
    rng = np.random.default_rng(11)
    outputs = {"score": rng.uniform(0, 0.5, (1, classes, proposals)).astype(np.float32),
               "rot": rng.normal(0, 1, (1, 2, proposals)).astype(np.float32),
               "dim": rng.normal(0, 0.5, (1, 3, proposals)).astype(np.float32),
               "reg": rng.uniform(0, 180, (1, 2, proposals)).astype(np.float32),
               "height": rng.normal(0, 1, (1, 1, proposals)).astype(np.float32),
               "vel": rng.normal(0, 3, (1, 2, proposals)).astype(np.float32)}
    per_class = {"pedestrian": 0.05, "car": 0.9}
    thresholds = ScoreThresholds.from_entries(0.4, [f"{k}:{v}" for k, v in per_class.items()], NAMES)
    def at(threshold):
        return dataclasses.replace(config, head=dataclasses.replace(config.head, score_threshold=threshold))
    decoded = Detections(decode_boxes(outputs, at(thresholds.decode_threshold)), NAMES)
    everything = Detections(decode_boxes(outputs, at(0.0)), NAMES)
    expected = brute_force_kept(everything, 0.4, per_class)
    np.testing.assert_array_equal(thresholds.apply(decoded).boxes, expected)
    pedestrian = NAMES.index("pedestrian")
    weak_pedestrians = (expected[:, 9] == pedestrian) & (expected[:, 10] < 0.4)
    assert weak_pedestrians.any()                                    # kept only thanks to decode_threshold
