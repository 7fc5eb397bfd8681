"""Ground truth as text (what a bag of generated scenes carries): float32 boxes read back bit for
bit, malformed records refused with a clear error."""
from __future__ import annotations

import numpy as np
import pytest

from bevfusion_ros.analysis.ground_truth import (
    FrameTruth,
    GroundTruthError,
    truth_from_text,
    truth_record,
    truth_to_text,
    truths_from_record,
)


def test_truth_round_trips_exactly():
    rng = np.random.default_rng(0)
    truth = FrameTruth(rng.normal(size=(7, 9)).astype(np.float32) * 50, rng.integers(0, 10, 7),
                       rng.integers(0, 400, 7))
    back = truths_from_record(truth_record({123: truth, 5: FrameTruth(np.zeros((0, 9), np.float32),
                                                                      np.zeros(0, np.int64), np.zeros(0, np.int64))}))
    assert sorted(back) == [5, 123] and back[5].boxes.shape == (0, 9)
    np.testing.assert_array_equal(back[123].boxes, truth.boxes)
    assert back[123].boxes.dtype == np.float32 and back[123].labels.dtype == np.int64
    np.testing.assert_array_equal(back[123].labels, truth.labels)
    boxes, labels, points = back[123].for_eval()
    np.testing.assert_array_equal(points, truth.num_points)
    assert back[123].for_eval(keep_empty=True)[2] is None


@pytest.mark.parametrize("text, match", [
    ("not json", "unreadable"),
    ('{"boxes": [[1, 2, 3]], "labels": [0], "num_points": [1]}', "unreadable"),   # 3 values, not 9
    ('{"boxes": [], "labels": [0], "num_points": []}', "0 boxes, 1 labels"),
    ('{"labels": [], "num_points": []}', "unreadable"),
])
def test_malformed_truth_is_refused(text, match):
    with pytest.raises(GroundTruthError, match=match):
        truth_from_text(text)


def test_a_record_with_a_bad_stamp_is_refused():
    text = truth_to_text(FrameTruth(np.zeros((0, 9), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)))
    with pytest.raises(GroundTruthError, match="ground-truth record"):
        truths_from_record({"soon": text})
