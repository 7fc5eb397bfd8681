"""bevfusion_ros.analysis.evaluation (nuScenes metrics through nuscenes-devkit) and bevfusion-eval.

Expected values come from hand-made cases and from the nuScenes AP definition written out
independently here (:func:`reference_ap`), not from the devkit:

* rank all predictions of a class by score (over all frames); walking down the list, each one
  is a TP when an unmatched GT of its class in its frame has its centre closer than the
  threshold in xy (the closest such GT is taken), else an FP; after k predictions
  precision_k = TP_k / k and recall_k = TP_k / #GT;
* the precision curve is sampled at the recalls 0, 0.01, ..., 1: at recall r, take the LAST
  ranked prediction with recall_k <= r and interpolate linearly towards the next one (whose
  recall is higher); left of the first prediction the first precision holds; past the highest
  recall reached the precision is 0; at exactly the highest recall it is the precision of the
  last prediction in the list (so trailing FPs cost the r = max-recall sample);
* AP = mean over the 90 samples r = 0.11 ... 1.00 (recall <= min_recall 0.1 dropped) of
  max(p - 0.1, 0) / (1 - 0.1) (min_precision 0.1).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("nuscenes.eval.detection.algo")

from bevfusion_ros.analysis.evaluation import (  # noqa: E402
    NUSCENES_CLASS_RANGE,
    EvalResult,
    count_points_in_boxes,
    evaluate,
    heading_quaternion,
)
from bevfusion_ros.config import NUSCENES_CLASS_NAMES  # noqa: E402
from bevfusion_ros.detections import Detections  # noqa: E402

NAMES = NUSCENES_CLASS_NAMES
CAR, TRUCK, BUS, BARRIER, PEDESTRIAN, CONE = (NAMES.index(name) for name in
                                              ("car", "truck", "bus", "barrier", "pedestrian",
                                               "traffic_cone"))
SIZES = {CAR: (1.9, 4.6, 1.7), TRUCK: (2.5, 7.0, 3.0), BUS: (2.9, 11.0, 3.5), BARRIER: (2.5, 0.5, 1.0),
         PEDESTRIAN: (0.7, 0.7, 1.75), CONE: (0.4, 0.4, 1.0)}
THRESHOLDS = (0.5, 1.0, 2.0, 4.0)


# ----------------------------------------------------------------------------- helpers
def reference_ap(ranked_tp: list[bool], num_gt: int, min_recall: float = 0.1,
                 min_precision: float = 0.1) -> float:
    """The nuScenes AP of a ranked TP/FP list, from the definition in the module docstring."""
    if not any(ranked_tp):
        return 0.0
    recalls, precisions, tp = [], [], 0
    for k, hit in enumerate(ranked_tp, 1):
        tp += bool(hit)
        recalls.append(tp / num_gt)
        precisions.append(tp / k)

    def precision_at(r: float) -> float:
        if r > recalls[-1]:
            return 0.0
        below = [k for k, recall in enumerate(recalls) if recall <= r]
        if not below:
            return precisions[0]
        k = below[-1]
        if k == len(recalls) - 1 or recalls[k] == r:
            return precisions[k]
        r0, r1, p0, p1 = recalls[k], recalls[k + 1], precisions[k], precisions[k + 1]
        return p0 + (p1 - p0) * (r - r0) / (r1 - r0)

    first = round(100 * min_recall) + 1
    samples = [precision_at(i / 100) for i in range(first, 101)]
    return sum(max(p - min_precision, 0.0) for p in samples) / len(samples) / (1 - min_precision)


def box(label: int, x: float, y: float, yaw: float = 0.3, vx: float = 1.0, vy: float = -0.5,
        scale: float = 1.0) -> np.ndarray:
    """A CUDA-layout GT row [9] of class ``label`` (z = centre of a box on z = -1.8)."""
    w, l, h = (scale * value for value in SIZES[label])
    return np.array([x, y, -1.8 + h / 2, w, l, h, yaw, vx, vy], dtype=np.float64)


def detections(rows: list[np.ndarray], labels: list[int], scores: list[float]) -> Detections:
    boxes = np.array([[*row, label, score] for row, label, score in zip(rows, labels, scores)],
                     dtype=np.float32).reshape(-1, 11)
    return Detections(boxes=boxes, class_names=NAMES)


def spread_scene(labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One GT box per label, 12 m apart on a ring (no two within 4 m of each other's shifts)."""
    angles = np.linspace(0, 2 * np.pi, len(labels), endpoint=False)
    radii = 15.0 + 3.0 * (np.arange(len(labels)) % 3)
    rows = [box(label, r * math.cos(a), r * math.sin(a), yaw=0.1 * i)
            for i, (label, r, a) in enumerate(zip(labels, radii, angles))]
    return np.array(rows), np.array(labels)


def gt_as_predictions(boxes: np.ndarray, labels: np.ndarray, score: float = 1.0) -> Detections:
    return detections(list(boxes), list(labels), [score] * len(labels))


# ----------------------------------------------------------------------------- AP definition
def test_reference_ap_matches_hand_computed_values():
    assert reference_ap([True] * 4, 4) == pytest.approx(1.0)
    # 4 TPs then 3 FPs: precision 1 everywhere except the sample at recall 1.0 (4/7).
    assert reference_ap([True] * 4 + [False] * 3, 4) == pytest.approx((89 * 0.9 + (4 / 7 - 0.1)) / 81)
    # TP, FP, TP, TP with 4 GT: recalls .25 .25 .5 .75, precisions 1 .5 2/3 3/4.
    samples = ([1.0] * 14 + [0.5] + [0.5 + (1 / 6) * (i - 25) / 25 for i in range(26, 50)] + [2 / 3]
               + [2 / 3 + (1 / 12) * (i - 50) / 25 for i in range(51, 75)] + [0.75] + [0.0] * 25)
    assert len(samples) == 90
    expected = sum(max(p - 0.1, 0) for p in samples) / 90 / 0.9
    assert reference_ap([True, False, True, True], 4) == pytest.approx(expected)
    # By hand: sum of (p - 0.1) = 14 * 0.9 + 0.4 + (24 * 0.4 + 300 / 150) + (2/3 - 0.1)
    #          + (24 * (2/3 - 0.1) + 300 / 300) + 0.65 = 40.41667, over 90 * 0.9 = 81.
    assert expected == pytest.approx(40.416666667 / 81)
    assert reference_ap([False, False], 3) == 0.0


def test_ranked_tp_fp_pattern_across_frames_gives_the_reference_ap():
    """4 GT cars in two frames; ranked predictions TP, FP, TP, TP (the 4th car is missed)."""
    frame0 = np.array([box(CAR, 10, 0), box(CAR, 20, 5)])
    frame1 = np.array([box(CAR, -15, 10), box(CAR, 0, -25)])
    gt = [(frame0, [CAR, CAR]), (frame1, [CAR, CAR])]
    predictions = [detections([frame0[0], frame0[1]], [CAR, CAR], [0.9, 0.7]),
                   detections([box(CAR, 30, 30), frame1[0]], [CAR, CAR], [0.8, 0.6])]
    result = evaluate(predictions, gt, NAMES)
    expected = reference_ap([True, False, True, True], 4)
    for threshold in THRESHOLDS:
        assert result.ap["car"][threshold] == pytest.approx(expected, abs=1e-9)
    assert result.class_mean_ap["car"] == pytest.approx(expected)
    assert result.present_classes == ("car",)
    assert result.mean_ap == pytest.approx(expected)             # only car is present
    assert result.nuscenes_mean_ap == pytest.approx(expected / 10)
    assert result.gt_counts["car"] == 4 and result.pred_counts["car"] == 4


def test_trailing_false_positives_cost_only_the_max_recall_sample():
    gt_boxes, labels = spread_scene([CAR] * 4)
    far = [box(CAR, 40, -20 + 6 * i) for i in range(3)]           # > 4 m from every GT car
    prediction = detections([*gt_boxes, *far], [CAR] * 7, [0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1])
    result = evaluate([prediction], [(gt_boxes, labels)], NAMES)
    expected = (89 * 0.9 + (4 / 7 - 0.1)) / 81                    # = reference_ap(4 TP, 3 FP)
    assert expected == pytest.approx(reference_ap([True] * 4 + [False] * 3, 4))
    assert result.ap["car"][2.0] == pytest.approx(expected)
    assert result.ap["car"][2.0] > 0.994
    # The same FPs ranked first pull precision down over the whole recall range.
    early = detections([*far, *gt_boxes], [CAR] * 7, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    worse = evaluate([early], [(gt_boxes, labels)], NAMES).ap["car"][2.0]
    assert worse == pytest.approx(reference_ap([False] * 3 + [True] * 4, 4))
    assert worse < 0.5


# ----------------------------------------------------------------------------- whole pipeline cases
@pytest.fixture(scope="module")
def sim_ground_truth():
    from bevfusion_ros.sim.scene import generate_scene
    return [generate_scene(seed) for seed in (3, 4)]


def test_ground_truth_as_predictions_scores_perfectly(sim_ground_truth):
    gt = [(scene.gt_boxes, scene.gt_labels) for scene in sim_ground_truth]
    predictions = [gt_as_predictions(boxes, labels) for boxes, labels in gt]
    result = evaluate(predictions, gt, NAMES)
    present = {NAMES[label] for scene in sim_ground_truth for label in scene.gt_labels}
    assert set(result.present_classes) == present and len(present) >= 5
    for name in present:
        assert all(result.ap[name][th] == pytest.approx(1.0) for th in THRESHOLDS), name
        for metric, error in result.tp_errors[name].items():
            not_applicable = (name == "traffic_cone" and metric in ("orient_err", "vel_err")
                              or name == "barrier" and metric == "vel_err")
            assert math.isnan(error) if not_applicable else error == pytest.approx(0.0, abs=1e-5)
    assert result.mean_ap == pytest.approx(1.0)
    assert result.nuscenes_mean_ap == pytest.approx(len(present) / 10)
    assert all(error == pytest.approx(0.0, abs=1e-5) for error in result.mean_tp_errors.values())
    assert result.nds == pytest.approx(1.0)


def test_predictions_shifted_by_0p7_m_match_only_from_1_m_on():
    labels = [CAR, CAR, TRUCK, BUS, BARRIER, PEDESTRIAN, PEDESTRIAN, CONE]
    gt_boxes, labels = spread_scene(labels)
    shifted = gt_boxes.copy()
    shifted[:, 0] += 0.7 * math.cos(0.5)
    shifted[:, 1] += 0.7 * math.sin(0.5)
    shifted[:, 2] += 0.4                                          # z does not count (xy distance)
    result = evaluate([gt_as_predictions(shifted, labels, 0.8)], [(gt_boxes, labels)], NAMES)
    for name in ("car", "truck", "bus", "barrier", "pedestrian", "traffic_cone"):
        assert result.ap[name] == pytest.approx({0.5: 0.0, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0}), name
        assert result.class_mean_ap[name] == pytest.approx(0.75)
        assert result.tp_errors[name]["trans_err"] == pytest.approx(0.7, abs=1e-5)
        assert result.tp_errors[name]["scale_err"] == pytest.approx(0.0, abs=1e-6)
    assert result.mean_ap == pytest.approx(0.75)
    assert result.mean_tp_errors["trans_err"] == pytest.approx(0.7, abs=1e-5)
    assert result.nuscenes_mean_ap == pytest.approx(0.75 * 6 / 10)


def test_missing_class_gets_ap_0_and_unmatched_tp_errors_1():
    gt_boxes, labels = spread_scene([CAR, CAR, PEDESTRIAN, PEDESTRIAN, TRUCK])
    keep = labels != PEDESTRIAN
    result = evaluate([gt_as_predictions(gt_boxes[keep], labels[keep])], [(gt_boxes, labels)], NAMES)
    assert all(result.ap["pedestrian"][th] == 0.0 for th in THRESHOLDS)
    assert result.tp_errors["pedestrian"] == {"trans_err": 1.0, "scale_err": 1.0, "orient_err": 1.0,
                                              "vel_err": 1.0}
    assert result.class_mean_ap["car"] == pytest.approx(1.0)
    assert result.class_mean_ap["truck"] == pytest.approx(1.0)
    assert result.mean_ap == pytest.approx(2 / 3)                 # car 1, truck 1, pedestrian 0
    assert result.mean_tp_errors["trans_err"] == pytest.approx(1 / 3, abs=1e-6)


def test_classes_absent_from_gt_are_excluded_from_mean_ap_but_not_from_nuscenes_map():
    gt_boxes, labels = spread_scene([CAR, CAR])
    bus_fp = box(BUS, -30, -30)
    prediction = detections([*gt_boxes, bus_fp], [CAR, CAR, BUS], [0.9, 0.8, 0.95])
    result = evaluate([prediction], [(gt_boxes, labels)], NAMES)
    assert result.present_classes == ("car",)
    assert result.ap["car"][0.5] == pytest.approx(1.0)            # a bus FP is not a car FP
    assert result.pred_counts["bus"] == 1 and result.gt_counts["bus"] == 0
    assert result.mean_ap == pytest.approx(1.0)
    assert result.nuscenes_mean_ap == pytest.approx(0.1)
    table = result.format_table()
    assert "absent from the ground truth" in table and "1 classes present" in table


def test_tp_errors_follow_the_rep103_heading_size_and_velocity():
    gt_boxes, labels = spread_scene([CAR, CAR, BARRIER, BARRIER, CONE, CONE])
    flipped = gt_boxes.copy()
    flipped[:, 6] += np.pi                                        # heading reversed
    result = evaluate([gt_as_predictions(flipped, labels)], [(gt_boxes, labels)], NAMES)
    assert result.tp_errors["car"]["orient_err"] == pytest.approx(np.pi, abs=1e-5)
    assert result.tp_errors["barrier"]["orient_err"] == pytest.approx(0.0, abs=1e-5)   # period pi
    assert math.isnan(result.tp_errors["traffic_cone"]["orient_err"])

    changed = gt_boxes.copy()
    changed[:, 6] -= 0.3                                          # yaw, heading +0.3
    changed[:, 3:6] *= 1.2
    changed[:, 7] += 0.3
    changed[:, 8] += 0.4
    result = evaluate([gt_as_predictions(changed, labels)], [(gt_boxes, labels)], NAMES)
    car = result.tp_errors["car"]
    assert car["orient_err"] == pytest.approx(0.3, abs=1e-5)
    assert car["scale_err"] == pytest.approx(1 - 1 / 1.2 ** 3, abs=1e-5)
    assert car["vel_err"] == pytest.approx(0.5, abs=1e-5)
    assert math.isnan(result.tp_errors["barrier"]["vel_err"])
    assert result.ap["car"][0.5] == pytest.approx(1.0)            # errors do not affect matching


def test_heading_quaternion_is_a_rotation_about_z():
    from nuscenes.eval.common.utils import quaternion_yaw
    from pyquaternion import Quaternion
    for heading in (-3.0, -1.0, 0.0, 0.4, 2.9):
        assert quaternion_yaw(Quaternion(heading_quaternion(heading))) == pytest.approx(heading)


def test_range_and_point_filters_match_the_devkit_filter():
    """Our filter against the devkit's filter_eval_boxes (with a NuScenes stand-in that has no
    bike racks, the only thing it reads from the database)."""
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.common.loaders import filter_eval_boxes
    from nuscenes.eval.detection.data_classes import DetectionBox

    class NoBikeRacks:
        def get(self, table, token):
            return {"anns": []}

    rng = np.random.default_rng(0)
    labels = rng.choice([CAR, BARRIER, PEDESTRIAN, CONE, BUS], size=80)
    radius, angle = rng.uniform(5, 60, size=80), rng.uniform(-np.pi, np.pi, size=80)
    gt_boxes = np.array([box(label, r * math.cos(a), r * math.sin(a))
                         for label, r, a in zip(labels, radius, angle)])
    num_points = rng.integers(0, 3, size=80)
    result = evaluate([gt_as_predictions(gt_boxes, labels)], [(gt_boxes, labels, num_points)], NAMES,
                      class_range=NUSCENES_CLASS_RANGE)

    devkit = EvalBoxes()
    devkit.add_boxes("s", [DetectionBox(sample_token="s", translation=tuple(row[:3]), size=(1, 1, 1),
                                        rotation=(1, 0, 0, 0), ego_translation=tuple(row[:3]),
                                        num_pts=int(count), detection_name=NAMES[label])
                           for row, label, count in zip(gt_boxes, labels, num_points)])
    kept = filter_eval_boxes(NoBikeRacks(), devkit, NUSCENES_CLASS_RANGE)["s"]
    expected = {name: sum(b.detection_name == name for b in kept) for name in NAMES}
    assert result.gt_counts == expected
    out_of_range = sum(math.hypot(*row[:2]) >= NUSCENES_CLASS_RANGE[NAMES[label]]
                       for row, label in zip(gt_boxes, labels))
    assert 0 < out_of_range < 80
    assert result.filtered["gt_out_of_range"] == out_of_range
    assert result.filtered["gt_without_points"] == (80 - out_of_range) - len(kept)
    assert result.filtered["pred_out_of_range"] == out_of_range    # predictions: range only
    # Predictions of dropped GT boxes are FPs now, so AP < 1 where boxes without points exist.
    assert result.mean_ap < 1.0


def test_prediction_sanitising_keeps_500_best_and_drops_non_finite():
    gt_boxes, labels = spread_scene([CAR])
    rng = np.random.default_rng(1)
    extra = [box(CAR, *rng.uniform(-30, -20, size=2)) for _ in range(600)]
    scores = [1.0] + list(rng.uniform(0.01, 0.5, size=600))
    prediction = detections([gt_boxes[0], *extra], [CAR] * 601, scores)
    prediction.boxes[5, 0] = np.nan
    result = evaluate([prediction], [(gt_boxes, labels)], NAMES)
    assert result.filtered["pred_non_finite"] == 1
    assert result.filtered["pred_over_max_boxes"] == 100
    assert result.pred_counts["car"] == 500
    # The TP ranks first, the 499 FPs after it only cost the recall-1.0 sample (precision 1/500).
    assert result.ap["car"][0.5] == pytest.approx(reference_ap([True] + [False] * 499, 1))
    assert result.ap["car"][0.5] == pytest.approx(89 / 90)


def test_inputs_are_checked():
    gt_boxes, labels = spread_scene([CAR])
    with pytest.raises(ValueError, match="prediction frames"):
        evaluate([], [(gt_boxes, labels)], NAMES)
    with pytest.raises(ValueError, match="not nuScenes detection names"):
        evaluate([np.zeros((0, 11))], [(gt_boxes, [0])], ("vehicle",))
    renamed = evaluate([np.zeros((0, 11))], [(gt_boxes, [0])], ("vehicle",), name_map={"vehicle": "car"})
    assert renamed.gt_counts["car"] == 1 and renamed.ap["car"][4.0] == 0.0


def test_result_serialises_to_json_and_table():
    gt_boxes, labels = spread_scene([CAR, CONE])
    result = evaluate([gt_as_predictions(gt_boxes, labels)], [(gt_boxes, labels)], NAMES)
    assert isinstance(result, EvalResult)
    document = json.loads(json.dumps(result.to_dict()))
    assert document["mean_ap"] == pytest.approx(1.0)
    assert document["ap"]["car"] == pytest.approx({"0.5": 1.0, "1.0": 1.0, "2.0": 1.0, "4.0": 1.0})
    assert document["tp_errors"]["traffic_cone"]["orient_err"] is None      # NaN -> null
    assert document["config"]["dist_ths"] == [0.5, 1.0, 2.0, 4.0]
    assert {"present_classes", "nuscenes_mean_ap", "mean_tp_errors", "nds", "class_mean_ap",
            "gt_counts", "pred_counts", "filtered"} <= set(document)
    table = result.format_table()
    assert table.splitlines()[0].split()[:8] == ["class", "GT", "pred", "AP@0.5", "AP@1", "AP@2",
                                                 "AP@4", "mAP"]
    assert "2 classes present" in table


def test_points_in_boxes_find_the_boxes_the_lidar_missed(sim_ground_truth):
    for scene in sim_ground_truth:
        exact = np.bincount(scene.point_objects[scene.point_objects >= 0], minlength=len(scene.gt_boxes))
        counted = count_points_in_boxes(scene.points.astype(np.float16), scene.gt_boxes)
        assert np.array_equal(exact == 0, counted == 0)
        assert (exact == 0).any()


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("torch")
    from bevfusion_ros.model.export import export_model_set
    from bevfusion_ros.model.presets import TINY
    return export_model_set(TINY, "fp16", tmp_path_factory.mktemp("tiny-eval"), seed=0).out_dir


def test_cli_on_two_generated_scenes_and_their_folders(tiny_model, tmp_path, capsys):
    from bevfusion_ros.sim.scene import generate_scene, write_example_folder
    from bevfusion_ros.tools.eval import main

    out = tmp_path / "metrics.json"
    assert main(["--model", str(tiny_model), "--seeds", "7:9", "--backend", "cpu",
                 "--progress-every", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[1/2] seed 7" in text and "[2/2] seed 8" in text and "AP@0.5" in text
    document = json.loads(out.read_text())
    assert {"model", "backend", "precision", "trained", "source", "frames", "seconds", "metrics"} <= set(document)
    assert document["backend"] == "cpu" and document["trained"] is False
    assert document["source"]["seeds"] == [7, 9] and document["frames"] == ["seed 7", "seed 8"]
    metrics = document["metrics"]
    assert metrics["num_frames"] == 2
    assert {"mean_ap", "nuscenes_mean_ap", "ap", "class_mean_ap", "tp_errors", "mean_tp_errors",
            "present_classes", "gt_counts", "pred_counts", "nds", "filtered"} <= set(metrics)
    assert 0.0 <= metrics["mean_ap"] <= 1.0                        # untrained: ~0
    assert sum(metrics["pred_counts"].values()) > 0                # score threshold 0

    data = tmp_path / "scenes"
    for seed in (7, 8):
        write_example_folder(generate_scene(seed), data / f"scene-{seed}")
    out2 = tmp_path / "folders.json"
    assert main(["--model", str(tiny_model), "--data", str(data), "--backend", "cpu",
                 "--json", str(out2)]) == 0
    folders = json.loads(out2.read_text())
    assert folders["frames"] == ["scene-7", "scene-8"]
    # Same scenes, same GT after the filters (point counts from the ray caster vs points in boxes).
    assert folders["metrics"]["gt_counts"] == metrics["gt_counts"]


def test_cli_errors(tiny_model, tmp_path, capsys):
    from bevfusion_ros.tools.eval import main, parse_seeds
    assert parse_seeds("3:6") == range(3, 6) and parse_seeds("4") == range(4, 5)
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_model), "--seeds", "5:5"])
    assert main(["--model", str(tmp_path), "--seeds", "0:1", "--backend", "cpu"]) == 1
    assert "lacks" in capsys.readouterr().err
    assert main(["--model", str(tiny_model), "--data", str(tmp_path / "none"), "--backend", "cpu"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_scene_generation_in_worker_processes_gives_the_same_frames():
    from bevfusion_ros.tools.eval import synthetic_frames
    inline = list(synthetic_frames(range(100_000, 100_002), None, False))
    pooled = list(synthetic_frames(range(100_000, 100_002), None, False, workers=2))
    assert [f.name for f in pooled] == [f.name for f in inline] == ["seed 100000", "seed 100001"]
    for a, b in zip(inline, pooled):
        np.testing.assert_array_equal(a.frame.points, b.frame.points)
        np.testing.assert_array_equal(a.gt_boxes, b.gt_boxes)
        np.testing.assert_array_equal(a.num_points, b.num_points)
        assert all(np.array_equal(x, y) for x, y in zip(a.frame.images, b.frame.images))
