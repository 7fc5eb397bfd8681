"""CuPy decode_boxes against the NumPy decode (spec 6.3).

x, y, vx, vy, label and score (and so the kept set and the order) must match exactly; w, l, h
and yaw come from CUDA's exp/atan2 instead of NumPy's, so they may differ by a few ulp (CUDA
documents <= 2 ulp for expf and <= 3 ulp for atan2f), and z = height - h/2 by as much
absolutely.
"""
from __future__ import annotations

import numpy as np
import pytest

from bevfusion_ros.head import BOX_COLUMNS, decode_boxes
from bevfusion_ros.model.presets import NUSCENES_R50, TINY

cupy = pytest.importorskip("cupy")

EXACT = [BOX_COLUMNS.index(name) for name in ("x", "y", "vx", "vy", "label", "score")]
TRANSCENDENTAL = [BOX_COLUMNS.index(name) for name in ("w", "l", "h", "yaw")]
MAX_ULP = 4
Z_ATOL = 1e-5            # a few ulp of h/2 plus one ulp of z (|z| < 16)


def random_outputs(seed, proposals, classes=10, bev_cells=180, dtype=np.float32):
    """Head outputs with centres reaching 10 % past both edges of a ``bev_cells`` wide BEV."""
    rng = np.random.default_rng(seed)
    outputs = dict(score=rng.random((1, classes, proposals)), rot=rng.normal(size=(1, 2, proposals)),
                   dim=rng.normal(0, 0.5, (1, 3, proposals)),
                   reg=rng.uniform(-0.1 * bev_cells, 1.1 * bev_cells, (1, 2, proposals)),
                   height=rng.normal(0, 5, (1, 1, proposals)), vel=rng.normal(size=(1, 2, proposals)))
    return {name: value.astype(dtype) for name, value in outputs.items()}


def on_device(outputs):
    return {name: cupy.asarray(value) for name, value in outputs.items()}


def assert_decode_matches(outputs, pipeline) -> np.ndarray:
    expected = decode_boxes(outputs, pipeline)
    gpu = decode_boxes(on_device(outputs), pipeline)
    assert isinstance(gpu, cupy.ndarray) and gpu.dtype == np.float32
    boxes = gpu.get()
    assert boxes.shape == expected.shape
    np.testing.assert_array_equal(boxes[:, EXACT], expected[:, EXACT])
    np.testing.assert_array_max_ulp(boxes[:, TRANSCENDENTAL], expected[:, TRANSCENDENTAL], maxulp=MAX_ULP)
    np.testing.assert_allclose(boxes[:, 2], expected[:, 2], rtol=0, atol=Z_ATOL)
    return boxes


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("preset", [NUSCENES_R50, TINY], ids=lambda preset: preset.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_matches_numpy_on_random_outputs(preset, dtype, seed):
    outputs = random_outputs(seed, preset.pipeline.head.num_proposals, bev_cells=preset.bev_size[0],
                             dtype=dtype)
    boxes = assert_decode_matches(outputs, preset.pipeline)
    assert 5 < len(boxes) < preset.pipeline.head.num_proposals          # threshold and range both cut


def test_decode_matches_numpy_on_many_proposals_and_host_outputs(capsys):
    outputs = random_outputs(5, 5000)
    assert len(assert_decode_matches(outputs, NUSCENES_R50.pipeline)) > 1000
    mixed = dict(on_device(outputs), rot=outputs["rot"])                  # one output still on the host
    np.testing.assert_array_equal(decode_boxes(mixed, NUSCENES_R50.pipeline).get(),
                                  decode_boxes(on_device(outputs), NUSCENES_R50.pipeline).get())
    device = on_device(random_outputs(6, 200))
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(55):
        start.record()
        decode_boxes(device, NUSCENES_R50.pipeline)
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    with capsys.disabled():
        print(f"\n[gpu timing] decode 200 proposals (incl. the M read-back): {np.median(times[5:]):.4f} ms")


def test_ties_keep_proposal_order_and_nan_scores_are_dropped():
    outputs = random_outputs(7, 64)
    score = outputs["score"]
    score[0, :, :] = 0.0
    score[0, 3, ::2] = 0.5                                   # 32 proposals tied at 0.5, class 3
    score[0, 1, 1::4] = 0.25                                 # 16 tied at 0.25, class 1
    score[0, [2, 4], 3::8] = 0.25                            # 8 tied at 0.25 in classes 2 and 4: first wins
    score[0, 0, 5::16] = np.nan                              # NaN anywhere: np.argmax picks it, dropped
    score[0, 6, 7::16] = np.nan
    pipeline = TINY.pipeline                                 # threshold 0: 0-score proposals kept too
    outputs["reg"][:] = 18.0                                 # x = y = 18 * 3 m - 54 m = 0: inside
    outputs["height"][:] = 0.0
    boxes = assert_decode_matches(outputs, pipeline)         # vx, vy exact: the same rows in the same order
    assert len(boxes) == 64 - 8 and (boxes[:, 10] == 0).sum() > 0
    assert set(boxes[boxes[:, 10] == 0.25, 9].tolist()) == {1.0, 2.0}


def test_rejects_misshaped_outputs_before_reading_them():
    outputs = on_device(random_outputs(0, 50))
    outputs["rot"] = outputs["rot"][:, :, :49]
    with pytest.raises(ValueError, match=r"head output 'rot' has shape \[1, 2, 49\], expected \[1, 2, 50\]"):
        decode_boxes(outputs, NUSCENES_R50.pipeline)
    del outputs["vel"]
    with pytest.raises(ValueError, match=r"\['vel'\] are missing"):
        decode_boxes(outputs, NUSCENES_R50.pipeline)
