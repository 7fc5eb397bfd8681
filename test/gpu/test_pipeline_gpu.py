"""The whole pipeline on the GPU against the CPU pipeline, on the example frame (tiny and r50).

Boxes are compared with every proposal decoded (score threshold 0: 200 boxes for r50, 50 for
tiny, not the handful above 0.12 that untrained weights give), paired one-to-one by label and
nearest centre.

Tolerances, as measured on the H100 (``python -m bevfusion_ros.tools.parity``):
- ``precision="fp32"``: the CPU's float32 arithmetic in other summation orders (cuDNN/cuBLAS,
  TF32 off, vs ONNX Runtime/NumPy). Every stage up to the fuser output within FP32_STAGE_RTOL
  relative L2 (measured: tiny <= 1.5e-6, r50 <= 1.3e-5). Boxes: at least FP32_PAIRED of the CPU
  boxes have a GPU box of the same label within 1 mm (measured: tiny 48 of 50 = 96 %, r50 167 of
  200 = 83.5 %), and paired boxes agree within FP32_ATOL on every attribute (metres, radians,
  m/s, score; measured tiny 6.1e-5, r50 1.9e-3: the decoder's self-attention over the 200
  proposals also sees the swapped ones). The rest are proposals swapped by the head's TopK:
  untrained weights give a nearly flat heatmap, whose 200th and 201st values differ by less than
  the float32 rounding of the two backends (the head outputs, in TopK order, then differ by
  0.1-0.3 relative L2 although 96 % of the boxes are the same).
- ``precision="fp16"`` (the fast path): every stage up to the fuser output within
  FP16_STAGE_RTOL relative L2 (tiny: camera_feature 1.8e-3, depth weights 3.0e-3, bevpool
  2.1e-3, vtransform 2.1e-3, lidar BEV 1.1e-3, middle 2.3e-3; r50: 2.2e-3, 1.2e-2 (a softmax over
  118 bins of untrained logits), 6.3e-3, 6.5e-3, 9.8e-4, 7.9e-3). Its boxes are not comparable
  with untrained weights: the 2e-3 perturbation of ``middle`` reorders the flat heatmap, so the
  TopK keeps other proposals (tiny: 4 % of the boxes within 1 m); they are checked for finiteness,
  count and determinism. Trained weights (issue 8) make the proposals stable.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from bevfusion_ros.config import PipelineConfig, load_config
from bevfusion_ros.pipeline import BEVFusionPipeline
from bevfusion_ros.tools.parity import both_chains, match_boxes, relative_l2

pytest.importorskip("cupy")
torch = pytest.importorskip("torch")

from bevfusion_ros.model.export import export_model_set  # noqa: E402
from bevfusion_ros.model.presets import NUSCENES_R50  # noqa: E402

FP32_ATOL = 5e-3
FP32_PAIRED = 0.8
FP32_STAGE_RTOL = 1e-4
FP16_STAGE_RTOL = 1.5e-2
STAGES_TO_MIDDLE = ("normalize", "depth", "backbone.camera_feature", "backbone.camera_depth_weights",
               "bevpool", "vtransform", "voxels", "lidar_bev", "middle")
STAGES = {"upload_points", "upload_images", "normalize", "depth", "camera_backbone", "bevpool",
          "vtransform", "voxelize", "lidar_backbone", "fuser", "head", "decode"}


@pytest.fixture(scope="session")
def r50_dir(tmp_path_factory):
    """nuscenes-r50 fp16 set; ``BEVFUSION_R50_FP16_DIR`` names a folder to reuse (see
    test_engines_gpu.py)."""
    folder = Path(os.environ.get("BEVFUSION_R50_FP16_DIR") or tmp_path_factory.mktemp("r50"))
    if not (folder / "export.yaml").is_file():
        export_model_set(NUSCENES_R50, "fp16", folder, seed=0)
    return folder


def all_proposals(model_dir: Path) -> PipelineConfig:
    """The folder's config with score threshold 0: every proposal in range becomes a box."""
    config = load_config(model_dir / "bevfusion.yaml")
    return dataclasses.replace(config, head=dataclasses.replace(config.head, score_threshold=0.0))


def run_both(model_dir: Path, frame, precision: str):
    """Boxes of the CPU pipeline and of the GPU pipeline (run twice: graphs, streams and buffers
    reused give the same boxes)."""
    config = all_proposals(model_dir)
    cpu = BEVFusionPipeline.from_model_dir(model_dir, config, backend="cpu").forward(frame)
    gpu_pipeline = BEVFusionPipeline.from_model_dir(model_dir, config, backend="gpu", precision=precision)
    assert gpu_pipeline.device == "cuda"
    first = gpu_pipeline.forward(frame)
    second = gpu_pipeline.forward(frame)
    np.testing.assert_array_equal(first.boxes, second.boxes)
    assert set(second.stage_ms) == STAGES and all(value >= 0 for value in second.stage_ms.values())
    return cpu.boxes, first.boxes


def check_fp32_boxes(model_dir: Path, frame, label: str) -> None:
    """fp32 GPU boxes = CPU boxes (module docstring: FP32_PAIRED within 1 mm, FP32_ATOL)."""
    cpu, gpu = run_both(model_dir, frame, "fp32")
    assert len(cpu) >= 40 and abs(len(gpu) - len(cpu)) <= (1 - FP32_PAIRED) * len(cpu)
    match = match_boxes(gpu, cpu)
    paired, error = match.fraction_within(1e-3), match.max_difference(gpu, cpu, within=1e-3)
    print(f"fp32 GPU vs CPU boxes ({label}): {len(gpu)} / {len(cpu)}, paired within 1 mm {paired:.1%}, "
          f"largest attribute difference of those {error:.2e}")
    assert paired >= FP32_PAIRED and error <= FP32_ATOL


@pytest.mark.parametrize("preset", ["tiny", "r50"])
def test_fp32_gpu_boxes_equal_cpu_boxes(preset, tiny_dir, frame, request):
    check_fp32_boxes(tiny_dir if preset == "tiny" else request.getfixturevalue("r50_dir"), frame, preset)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("preset", ["tiny", "r50"])
def test_gpu_stages_match_cpu_stages(preset, precision, tiny_dir, frame, request):
    check_stages(tiny_dir if preset == "tiny" else request.getfixturevalue("r50_dir"), frame, precision, preset)


def check_stages(model_dir: Path, frame, precision: str, label: str) -> None:
    """Every stage up to the fuser within FP32/FP16_STAGE_RTOL of the CPU's; finite boxes,
    the same on a second run and with one stream as with the branch streams."""
    config = all_proposals(model_dir)
    cpu = BEVFusionPipeline.from_model_dir(model_dir, config, backend="cpu")
    gpu = BEVFusionPipeline.from_model_dir(model_dir, config, backend="gpu", precision=precision)
    expected, got = both_chains(cpu, gpu, frame)
    errors = {name: relative_l2(got[name], expected[name]) for name in STAGES_TO_MIDDLE}
    print(f"{precision} GPU vs CPU stages ({label}), relative L2: "
          + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))
    assert max(errors.values()) <= (FP32_STAGE_RTOL if precision == "fp32" else FP16_STAGE_RTOL)
    assert np.isfinite(got["boxes"]).all()
    assert abs(len(got["boxes"]) - len(expected["boxes"])) <= (1 - FP32_PAIRED) * len(expected["boxes"])
    first, second = gpu.forward(frame), gpu.forward(frame)
    np.testing.assert_array_equal(first.boxes, second.boxes)
    np.testing.assert_allclose(first.boxes, got["boxes"], atol=1e-4)   # branch streams = one stream


def test_empty_cloud_and_bad_images_on_the_gpu(tiny_dir, frame):
    from bevfusion_ros.pipeline import InputError
    pipeline = BEVFusionPipeline.from_model_dir(tiny_dir, backend="gpu")
    empty = dataclasses.replace(frame, points=np.zeros((0, 5), dtype=np.float32))
    detections = pipeline.forward(empty)                 # camera-only: the lidar BEV is zero
    assert np.isfinite(detections.boxes).all()
    wrong_size = [image[:-2] for image in frame.images]
    with pytest.raises(InputError):
        pipeline.forward(dataclasses.replace(frame, images=wrong_size))
    np.testing.assert_array_equal(pipeline.forward(frame).boxes,
                                  pipeline.forward(frame).boxes)   # still healthy afterwards


def test_missing_cameras_on_the_gpu(tiny_dir, frame):
    """zero_fill (a black image) and lidar-only (zero camera BEV) give the CPU path's boxes."""
    config = all_proposals(tiny_dir)
    cpu = BEVFusionPipeline.from_model_dir(tiny_dir, config, backend="cpu")
    gpu = BEVFusionPipeline.from_model_dir(tiny_dir, config, backend="gpu", precision="fp32")
    for used in (config.camera_names[1:], ()):
        expected, got = cpu.forward(frame, used), gpu.forward(frame, used)
        assert got.cameras_used == expected.cameras_used == used
        match = match_boxes(got.boxes, expected.boxes)
        assert match.fraction_within(1e-3) >= FP32_PAIRED, used


@pytest.mark.parametrize("preset", ["tiny", "r50"])
def test_worker_thread_answers_frames_at_10_hz(preset, tiny_dir, frame, request):
    """The node's worker path without rclpy: 100 frames submitted at 10 Hz to a FrameWorker that
    owns the GPU pipeline are all answered (or counted as dropped), with the same boxes as a
    direct forward; the submit-to-result latency is printed."""
    import time

    from bevfusion_ros.streaming.worker import FrameWorker
    model_dir = tiny_dir if preset == "tiny" else request.getfixturevalue("r50_dir")
    pipeline = BEVFusionPipeline.from_model_dir(model_dir, backend="gpu")
    expected = pipeline.forward(frame).boxes
    latencies_ms, errors, different = [], [], []

    def process(submitted: float) -> None:
        boxes = pipeline.forward(frame).boxes
        latencies_ms.append((time.perf_counter() - submitted) * 1e3)
        if not np.array_equal(boxes, expected):
            different.append(submitted)

    worker = FrameWorker(process, lambda item, error: errors.append(error))
    start = time.perf_counter()
    for index in range(100):
        worker.submit(time.perf_counter())
        time.sleep(max(0.0, start + (index + 1) * 0.1 - time.perf_counter()))
    assert worker.wait_idle(30)
    worker.close()
    assert not errors and not different
    assert worker.processed + worker.dropped == 100 and worker.processed >= 90
    print(f"[gpu worker] {preset}: 100 frames at 10 Hz, {worker.processed} answered, {worker.dropped} dropped; "
          f"submit-to-result median {np.median(latencies_ms):.2f} ms, p99 {np.percentile(latencies_ms, 99):.2f} ms")
