"""bevfusion_ros.train: targets, assignment, losses, training forward, overfitting, CLI (tiny, CPU)."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bevfusion_ros.head.decode import decode_boxes as decode_boxes_numpy  # noqa: E402
from bevfusion_ros.model.bevfusion import build_model  # noqa: E402
from bevfusion_ros.model.checkpoint import load_checkpoint  # noqa: E402
from bevfusion_ros.model.export import MODEL_FILES, calibrate_random_weights  # noqa: E402
from bevfusion_ros.model.presets import NUSCENES_R50, TINY  # noqa: E402
from bevfusion_ros.model.reference import BEVFusionReference, decode_boxes  # noqa: E402
from bevfusion_ros.train import targets as T  # noqa: E402
from bevfusion_ros.train.data import SceneDataset, calibration_for_preset, parse_scene_range  # noqa: E402
from bevfusion_ros.train.loop import TrainConfig, forward_train, learning_rate, train  # noqa: E402
from bevfusion_ros.train.losses import gaussian_focal_loss, sigmoid_focal_loss  # noqa: E402

SCENE_SEED = 0


@pytest.fixture(autouse=True, scope="module")
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Preprocessed scenes shared by every test of this module (generated once)."""
    return tmp_path_factory.mktemp("scene-cache")


@pytest.fixture(scope="module")
def dataset(cache_dir):
    return SceneDataset(TINY, [SCENE_SEED], cache_dir=cache_dir, memory_cache=True)


def _random_boxes(rng, count):
    boxes = np.zeros((count, 9))
    boxes[:, 0:2] = rng.uniform(-50, 50, (count, 2))
    boxes[:, 3:6] = rng.uniform(0.3, 12.0, (count, 3))
    boxes[:, 2] = rng.uniform(-3, 1, count)
    boxes[:, 6] = rng.uniform(-math.pi, math.pi, count)
    boxes[:, 7:9] = rng.uniform(-15, 15, (count, 2))
    return boxes


def split_code(code: np.ndarray) -> dict[str, np.ndarray]:
    """``[..., 10]`` -> {center, height, dim, rot, vel}: ``[..., channels]`` views."""
    parts, start = {}, 0
    for name, channels in T.BOX_CODE_LAYOUT:
        parts[name] = code[..., start:start + channels]
        start += channels
    return parts


def _fake_outputs(code, labels, num_classes):
    """Head outputs [1, *, K] whose decode is the encoded boxes; distinct, descending scores."""
    count = len(code)
    score = np.zeros((1, num_classes, count))
    score[0, labels, np.arange(count)] = np.linspace(0.9, 0.5, count)
    parts = split_code(code)
    return {"score": score, "rot": parts["rot"].T[None], "dim": parts["dim"].T[None],
            "reg": parts["center"].T[None], "height": parts["height"].T[None],
            "vel": parts["vel"].T[None]}


def _assert_boxes_equal(decoded, boxes, atol):
    np.testing.assert_allclose(decoded[:, [0, 1, 2, 3, 4, 5, 7, 8]], boxes[:, [0, 1, 2, 3, 4, 5, 7, 8]],
                               rtol=0, atol=atol)
    yaw_error = np.angle(np.exp(1j * (decoded[:, 6] - boxes[:, 6])))   # modulo 2 pi
    assert np.abs(yaw_error).max() < atol


# ----------------------------------------------------------------------------- targets
@pytest.mark.parametrize("preset", [TINY, NUSCENES_R50], ids=lambda p: p.name)
def test_encode_then_decode_returns_the_boxes(preset):
    rng = np.random.default_rng(1)
    boxes = _random_boxes(rng, 40)
    labels = rng.integers(0, preset.num_classes, 40)
    code = T.encode_boxes(boxes, preset)
    assert code.shape == (40, 10)
    outputs = _fake_outputs(code, labels, preset.num_classes)
    # The torch reference decode (float64) and the deploy NumPy decode (float32 output).
    torch_boxes = decode_boxes(*(torch.from_numpy(outputs[name]) for name in
                                 ("score", "rot", "dim", "reg", "height", "vel")), preset=preset).numpy()
    numpy_boxes = decode_boxes_numpy(outputs, preset.pipeline)
    assert len(torch_boxes) == len(numpy_boxes) == 40
    _assert_boxes_equal(torch_boxes, boxes, 1e-9)
    np.testing.assert_array_equal(torch_boxes[:, 9], labels)
    _assert_boxes_equal(numpy_boxes.astype(np.float64), boxes, 1e-5)


def test_encoding_of_a_known_box():
    box = np.array([[3.0, -6.0, -1.0, 2.0, 4.0, 1.5, 0.5, 1.0, -2.0]])
    code = T.encode_boxes(box, TINY)[0]                  # tiny: cells of 3 m from -54 m
    np.testing.assert_allclose(code, [19.0, 16.0, -0.25, math.log(2.0), math.log(4.0), math.log(1.5),
                                      math.sin(0.5), math.cos(0.5), 1.0, -2.0])


def _independent_radius(w_cells, l_cells, overlap=0.1, min_radius=2):
    """mmdet3d gaussian_radius((l, w), overlap) re-derived in float64, then max(2, int(r))."""
    h, w = l_cells, w_cells
    r1 = ((h + w) + np.sqrt((h + w) ** 2 - 4 * w * h * (1 - overlap) / (1 + overlap))) / 2
    r2 = (2 * (h + w) + np.sqrt((2 * (h + w)) ** 2 - 16 * (1 - overlap) * w * h)) / 2
    r3 = (-2 * overlap * (h + w) + np.sqrt((2 * overlap * (h + w)) ** 2
                                           - 16 * overlap * (overlap - 1) * w * h)) / 2
    return max(min_radius, int(min(r1, r2, r3)))


@pytest.mark.parametrize("preset,box,label", [
    (TINY, [4.1, -7.3, -1.0, 1.9, 4.6, 1.7, 0.3, 0, 0], 0),            # car, radius = min radius
    (NUSCENES_R50, [10.2, 5.5, -0.5, 2.9, 11.0, 3.5, 1.0, 0, 0], 3),   # bus on 0.6 m cells
    (NUSCENES_R50, [-20.0, 30.0, -0.5, 2.5, 7.0, 3.0, 0.0, 0, 0], 1),  # truck
])
def test_heatmap_peak_and_radius(preset, box, label):
    box = np.array([box])
    heatmap = T.heatmap_targets(box, np.array([label]), preset)
    x_cells, y_cells = preset.bev_size
    assert heatmap.shape == (preset.num_classes, x_cells, y_cells) and heatmap.dtype == np.float32
    cell = preset.pipeline.bev_cell_size
    low = preset.pipeline.voxelization.point_range_min
    ix, iy = int((box[0, 0] - low[0]) / cell[0]), int((box[0, 1] - low[1]) / cell[1])
    assert heatmap[label, ix, iy] == 1.0
    assert heatmap.max() == 1.0 and (heatmap == 1.0).sum() == 1
    assert heatmap[np.arange(preset.num_classes) != label].max() == 0.0
    radius = _independent_radius(box[0, 3] / cell[0], box[0, 4] / cell[1])
    assert T.heatmap_radii(box, preset)[0] == radius
    sigma = (2 * radius + 1) / 6
    channel = heatmap[label].astype(np.float64)
    for dx, dy in [(radius, 0), (0, -radius), (1, 1), (-radius, radius)]:
        expected = math.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma))
        assert channel[ix + dx, iy + dy] == pytest.approx(expected, rel=1e-6)
    support = np.argwhere(channel > 0)
    assert (np.abs(support - [ix, iy]).max(axis=0) == radius).all()      # square of side 2r + 1
    if preset is NUSCENES_R50 and label == 3:
        assert radius > 2                                                # formula, not the floor


def test_heatmap_clips_at_the_border_and_drops_boxes_outside():
    boxes = np.array([[-53.5, 53.0, -1, 1.9, 4.6, 1.7, 0, 0, 0],    # corner cell (0, 35)
                      [60.0, 0.0, -1, 1.9, 4.6, 1.7, 0, 0, 0]])      # outside the grid
    heatmap = T.heatmap_targets(boxes, np.array([0, 0]), TINY)
    assert heatmap[0, 0, 35] == 1.0 and (heatmap == 1.0).sum() == 1
    np.testing.assert_array_equal(T.boxes_in_grid(boxes, TINY), [True, False])


# ----------------------------------------------------------------------------- assignment
def test_hungarian_matches_brute_force():
    rng = np.random.default_rng(3)
    for rows, cols in [(1, 1), (3, 3), (4, 6), (6, 4), (5, 5), (2, 7)]:
        for _ in range(5):
            cost = rng.uniform(0, 10, (rows, cols))
            cost[rng.random((rows, cols)) < 0.2] = 1e6
            r, c = T.linear_sum_assignment(cost)
            assert len(r) == len(c) == min(rows, cols)
            assert len(set(r)) == len(r) and len(set(c)) == len(c)
            best = min(sum(cost[i, j] for i, j in zip(range(rows), perm))
                       for perm in itertools.permutations(range(cols), rows)) if rows <= cols else \
                min(sum(cost[i, j] for i, j in zip(perm, range(cols)))
                    for perm in itertools.permutations(range(rows), cols))
            assert cost[r, c].sum() == pytest.approx(best)


def test_assignment_on_a_hand_made_case():
    # tiny grid: 3 m cells from -54 m. GT 0 car at cell (20.5, 20.5), GT 1 car at (10.5, 30.5),
    # GT 2 pedestrian at (5.5, 5.5).
    gt = np.array([[7.5, 7.5, -1, 1.9, 4.6, 1.7, 0, 0, 0],
                   [-22.5, 37.5, -1, 1.9, 4.6, 1.7, 0, 0, 0],
                   [-37.5, -37.5, -1, 0.7, 0.7, 1.7, 0, 0, 0]])
    labels = np.array([0, 0, 8])
    proposal_class = np.array([1, 0, 0, 0, 8, 0])
    cells = np.array([[20.5, 20.5],     # 0: truck on GT 0's cell: wrong class
                      [21.5, 20.5],     # 1: car one cell from GT 0
                      [10.5, 31.5],     # 2: car next to GT 1, predicts far
                      [11.5, 30.5],     # 3: car next to GT 1, predicts GT 1's centre
                      [15.5, 15.5],     # 4: pedestrian far (> radius 2 + 1) from GT 2
                      [30.5, 5.5]])     # 5: car far from everything
    pred = cells.copy()
    pred[2] = [14.0, 34.0]
    pred[3] = [10.5, 30.5]
    logits = np.zeros((10, 6))
    assignment = T.assign_proposals(proposal_class, cells, pred, logits, gt, labels, TINY)
    np.testing.assert_array_equal(assignment.proposal, [1, 3])
    np.testing.assert_array_equal(assignment.gt, [0, 1])
    targets, positive = T.regression_targets(assignment, gt, 6, TINY)
    np.testing.assert_array_equal(positive, [False, True, False, True, False, False])
    np.testing.assert_allclose(targets[:, 3], T.encode_boxes(gt[1:2], TINY)[0], rtol=1e-6)
    classes = T.class_targets(assignment, labels, 10, 6)
    assert classes.sum() == 2 and classes[0, 1] == 1 and classes[0, 3] == 1


def test_assignment_uses_the_class_cost_between_close_proposals():
    gt = np.array([[7.5, 7.5, -1, 1.9, 4.6, 1.7, 0, 0, 0]])
    cells = np.array([[20.5, 20.5], [20.5, 21.5]])
    logits = np.zeros((10, 2))
    logits[0] = [-3.0, 3.0]               # proposal 1 is confident it is a car
    assignment = T.assign_proposals(np.array([0, 0]), cells, cells, logits, gt, np.array([0]), TINY)
    np.testing.assert_array_equal(assignment.proposal, [1])


def test_no_ground_truth_gives_no_positives():
    assignment = T.assign_proposals(np.array([0]), np.zeros((1, 2)), np.zeros((1, 2)),
                                    np.zeros((10, 1)), np.zeros((0, 9)), np.zeros(0, int), TINY)
    assert len(assignment) == 0


# ----------------------------------------------------------------------------- losses
def test_focal_losses():
    target = torch.zeros(1, 2, 5, 5)
    target[0, 1, 2, 2] = 1.0
    target[0, 1, 2, 3] = 0.5
    good = torch.where(target == 1, torch.tensor(9.0), torch.tensor(-9.0))
    bad = -good
    assert gaussian_focal_loss(good, target) < 1e-3 < gaussian_focal_loss(bad, target)
    # mmdet formula at one positive / one negative cell, float64 re-derivation.
    logits = torch.tensor([0.3, -0.7])
    p = 1 / (1 + np.exp(-np.array([0.3, -0.7])))
    expected = -np.log(p[0]) * (1 - p[0]) ** 2 + -np.log(1 - p[1]) * p[1] ** 2 * (1 - 0.5) ** 4
    assert float(gaussian_focal_loss(logits, torch.tensor([1.0, 0.5]))) == pytest.approx(expected, rel=1e-5)
    expected = (-0.25 * np.log(p[0]) * (1 - p[0]) ** 2) + (-0.75 * np.log(1 - p[1]) * p[1] ** 2)
    assert float(sigmoid_focal_loss(logits, torch.tensor([1.0, 0.0]))) == pytest.approx(expected, rel=1e-5)


def test_learning_rate_schedules():
    assert learning_rate(0, 100, 1e-3, "constant") == 1e-3
    assert learning_rate(0, 100, 1e-3, "onecycle") == pytest.approx(1e-4)
    peak = max(learning_rate(step, 100, 1e-3, "onecycle") for step in range(100))
    assert peak == pytest.approx(1e-3, rel=1e-3)
    assert learning_rate(99, 100, 1e-3, "onecycle") == pytest.approx(1e-7)
    assert learning_rate(99, 100, 1e-3, "cosine") == pytest.approx(1e-6)


# ----------------------------------------------------------------------------- data + forward
def test_scene_ranges():
    assert parse_scene_range("0:3") == [0, 1, 2]
    assert parse_scene_range(":2") == [0, 1]
    assert parse_scene_range("4,7") == [4, 7]
    with pytest.raises(ValueError):
        parse_scene_range("3:3")


def test_sample_contents(dataset):
    sample = dataset[0]
    image = TINY.pipeline.image
    assert sample["images"].shape == (6, 3, image.output_height, image.output_width)
    assert sample["images"].dtype == torch.float16 and sample["depth"].shape == (6, 1, 128, 256)
    assert (sample["depth"] > 0).sum() > 1000                       # lidar reaches the cameras
    assert sample["voxel_coords"].shape[1] == 4 and sample["voxel_features"].shape[1] == 5
    assert sample["heatmap"].shape == (10, *TINY.bev_size)
    assert int((sample["heatmap"] == 1).sum()) >= len(sample["gt_boxes"]) - 2   # few shared cells
    assert sample["point_ids"].numel() == sample["cells"].numel() > 0


def test_training_forward_matches_the_reference(dataset):
    """Eval mode: the batched training forward reproduces BEVFusionReference's dataflow."""
    model = build_model(TINY, seed=2)
    calibrate_random_weights(model, seed=2)
    reference = BEVFusionReference(model)
    scene_sample = dataset[0]
    from bevfusion_ros.sim.scene import generate_scene
    scene = generate_scene(SCENE_SEED)
    calibration = calibration_for_preset(scene.calibration, TINY)
    points = torch.from_numpy(scene.points)
    with torch.no_grad():
        middle = reference.fuse(reference.camera_bev(scene.images, points, calibration),
                                reference.lidar_bev(points))
        expected = model.heads.object(middle)
        output = forward_train(model.eval(), [scene_sample, scene_sample], "cpu")
    assert output.dense_heatmap.shape == (2, 10, *TINY.bev_size)
    for b in range(2):                 # float32 BEVPool here, float64 in the reference
        for name in ("dense_heatmap", "center", "score"):
            got, want = getattr(output, name)[b], getattr(expected, name)[0]
            assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max()), name
        assert torch.equal(output.proposal_index[b], expected.proposal_index[0])


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def overfit(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("overfit")
    config = TrainConfig(preset=TINY, seeds=[SCENE_SEED], out_dir=out, epochs=40, lr=3e-3,
                         schedule="constant", cache_dir=cache_dir, memory_cache=True,
                         precise_bn=1, export=True, log=None)
    return train(config)


def test_overfitting_one_scene_drops_the_loss(overfit):
    losses = [record["loss"] for record in overfit.history]
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.5 * losses[0]
    assert overfit.history[-1]["heatmap"] < 0.2 * overfit.history[0]["heatmap"]
    assert overfit.history[-1]["pos"] > 0.8 * overfit.history[-1]["objects"]
    log_lines = (overfit.checkpoint.parent / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in log_lines] == losses


def test_overfitted_model_detects_the_scene(overfit):
    """Eval mode, through the reference forward and decode: the GT boxes come back."""
    from bevfusion_ros.sim.scene import generate_scene
    model = build_model(TINY)
    load_checkpoint(model, overfit.checkpoint)
    scene = generate_scene(SCENE_SEED)
    boxes = BEVFusionReference(model)(scene.images, scene.points,
                                      calibration_for_preset(scene.calibration, TINY)).numpy()
    top = boxes[:len(scene.gt_boxes)]
    found = [((np.linalg.norm(top[:, :2] - gt[:2], axis=1) < 2.0) & (top[:, 9] == label)).any()
             for gt, label in zip(scene.gt_boxes, scene.gt_labels)]
    assert np.mean(found) > 0.7


def test_checkpoint_exports(overfit, tmp_path):
    assert overfit.export_dir is not None
    assert all((overfit.export_dir / name).is_file() for name in MODEL_FILES)
    from bevfusion_ros.model.export import export_model_set
    result = export_model_set(TINY, "fp16", tmp_path, checkpoint=overfit.checkpoint)
    assert set(result.files) == set(MODEL_FILES)
    assert "trained: true" in (tmp_path / "export.yaml").read_text()


def test_cli_is_deterministic_and_resumes(cache_dir, tmp_path):
    from bevfusion_ros.tools.train import main
    common = ["--preset", "tiny", "--scenes", f"{SCENE_SEED}:{SCENE_SEED + 1}", "--lr", "1e-3",
              "--cache", str(cache_dir), "--schedule", "cosine"]
    assert main(common + ["--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--epochs", "2", "--out", str(tmp_path / "b"), "--max-steps", "1"]) == 0
    assert main(common + ["--epochs", "2", "--out", str(tmp_path / "b"),
                          "--resume", str(tmp_path / "b" / "model.pt")]) == 0
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() == build_model(TINY).state_dict().keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    losses = [json.loads(line)["loss"] for line in
              (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    resumed = [json.loads(line)["loss"] for line in
               (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert losses == resumed and len(losses) == 2


def test_a_paused_run_resumes_mid_epoch_to_the_same_weights(cache_dir, tmp_path):
    """Two scenes per epoch, paused after step 1 (mid-epoch) and after step 3: the resumed run
    sees the same samples and learning rates and ends bit-identical to the uninterrupted one."""
    from bevfusion_ros.tools.train import main
    common = ["--preset", "tiny", "--scenes", f"{SCENE_SEED}:{SCENE_SEED + 2}", "--lr", "1e-3",
              "--cache", str(cache_dir), "--epochs", "2", "--precise-bn", "0"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--out", str(tmp_path / "b"), "--stop-after", "1"]) == 0
    for stop in ("3", "4"):
        assert main(common + ["--out", str(tmp_path / "b"), "--resume", str(tmp_path / "b"),
                              "--stop-after", stop]) == 0
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(a[name], b[name]) for name in a)
    records = [[json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
               for run in ("a", "b")]
    assert [r["step"] for r in records[1]] == [1, 2, 3, 4]
    assert [(r["loss"], r["lr"]) for r in records[0]] == [(r["loss"], r["lr"]) for r in records[1]]
