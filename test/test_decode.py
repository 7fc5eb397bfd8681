"""NumPy box decode (spec 6.3) against a per-proposal loop and the PyTorch reference decode."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bevfusion_ros.head import BOX_COLUMNS, decode_boxes
from bevfusion_ros.model.presets import NUSCENES_R50, TINY


def random_outputs(seed, proposals, classes=10, bev_cells=180, dtype=np.float64):
    """Head outputs with centres reaching 10 % past both edges of a ``bev_cells`` wide BEV."""
    rng = np.random.default_rng(seed)
    reg = rng.uniform(-0.1 * bev_cells, 1.1 * bev_cells, (1, 2, proposals))
    outputs = dict(score=rng.random((1, classes, proposals)), rot=rng.normal(size=(1, 2, proposals)),
                   dim=rng.normal(0, 0.5, (1, 3, proposals)), reg=reg,
                   height=rng.normal(0, 5, (1, 1, proposals)), vel=rng.normal(size=(1, 2, proposals)))
    return {name: value.astype(dtype) for name, value in outputs.items()}


def outputs_for(rows):
    """Head outputs ``[1, C, K]`` from per-proposal dicts (score list, reg, height, dim, rot, vel)."""
    def stack(key):
        return np.array([row[key] for row in rows], dtype=np.float64).T[None]
    return {key: stack(key) for key in ("score", "rot", "dim", "reg", "height", "vel")}


def proposal(scores, reg=(90.0, 90.0), height=0.5, dim=(0.0, 0.0, 0.0), rot=(0.0, 1.0), vel=(0.0, 0.0)):
    return dict(score=scores, reg=reg, height=(height,), dim=dim, rot=rot, vel=vel)


def test_decode_matches_loop(loop_decode):
    k = NUSCENES_R50.pipeline.head.num_proposals
    outputs = random_outputs(4, k)
    boxes = decode_boxes(outputs, NUSCENES_R50.pipeline)
    expected = loop_decode(outputs)
    assert 20 < len(expected) < k and boxes.dtype == np.float32 and boxes.shape[1] == len(BOX_COLUMNS)
    np.testing.assert_allclose(boxes, expected, rtol=1e-6, atol=1e-6)


def test_first_maximum_wins_and_equal_scores_keep_proposal_order():
    tie = [0.1, 0.5, 0.2, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]              # classes 1 and 3 tie
    rows = [proposal([0.3] + [0.0] * 9, reg=(10.0, 10.0)),
            proposal(tie, reg=(20.0, 20.0)),
            proposal([0.0] * 9 + [0.5], reg=(30.0, 30.0)),
            proposal([0.9] + [0.0] * 9, reg=(40.0, 40.0))]
    boxes = decode_boxes(outputs_for(rows), NUSCENES_R50.pipeline)
    np.testing.assert_array_equal(boxes[:, 9], [0, 1, 9, 0])
    np.testing.assert_allclose(boxes[:, 0], [40 * 0.6 - 54, 20 * 0.6 - 54, 30 * 0.6 - 54, 10 * 0.6 - 54])


def test_threshold_and_post_center_range_are_inclusive():
    # dim 0 -> h = 1, so z = height - 0.5; reg 192.001 -> y = 61.2006.
    rows = [proposal([0.12] + [0.0] * 9, reg=(90.0, 90.0)),                 # score == threshold
            proposal([0.1199] + [0.0] * 9, reg=(90.0, 90.0)),               # below
            proposal([0.5] + [0.0] * 9, height=10.5),                       # z == 10
            proposal([0.5] + [0.0] * 9, height=10.5 + 1e-6),                # z > 10
            proposal([0.5] + [0.0] * 9, height=-9.5),                       # z == -10
            proposal([0.5] + [0.0] * 9, reg=(90.0, 192.001))]               # y > 61.2
    boxes = decode_boxes(outputs_for(rows), NUSCENES_R50.pipeline)
    np.testing.assert_array_equal(boxes[:, 2], np.float32([10.0, -10.0, 0.0]))
    np.testing.assert_array_equal(boxes[:, 10], np.float32([0.5, 0.5, 0.12]))


def test_rejects_outputs_that_do_not_fit_the_config():
    outputs = random_outputs(0, 50, classes=3)
    with pytest.raises(ValueError, match=r"'score' has shape \[1, 3, 50\], expected \[1, 10, K\]"):
        decode_boxes(outputs, TINY.pipeline)
    del outputs["vel"]
    with pytest.raises(ValueError, match=r"\['vel'\] are missing"):
        decode_boxes(outputs, replace(TINY.pipeline, head=replace(TINY.pipeline.head,
                                                                  class_names=("a", "b", "c"))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("preset", [NUSCENES_R50, TINY], ids=lambda preset: preset.name)
def test_decode_equals_the_pytorch_reference_exactly(preset, dtype):
    torch = pytest.importorskip("torch")
    from bevfusion_ros.model.reference import decode_boxes as reference_decode
    outputs = random_outputs(7, preset.pipeline.head.num_proposals, bev_cells=preset.bev_size[0],
                             dtype=dtype)
    expected = reference_decode(**{name: torch.from_numpy(value) for name, value in outputs.items()},
                                preset=preset).numpy().astype(np.float32)
    boxes = decode_boxes(outputs, preset.pipeline)
    assert len(boxes) > 5
    if dtype == np.float64:
        np.testing.assert_array_equal(boxes, expected)
        return
    # float32: NumPy's and PyTorch's vectorised exp/atan2 differ by up to 2 ulp.
    exact = [BOX_COLUMNS.index(name) for name in ("x", "y", "vx", "vy", "label", "score")]
    np.testing.assert_array_equal(boxes[:, exact], expected[:, exact])
    np.testing.assert_array_max_ulp(boxes[:, 3:7], expected[:, 3:7], maxulp=2)        # w l h yaw
    np.testing.assert_allclose(boxes[:, 2], expected[:, 2], rtol=0, atol=1e-6)        # z
