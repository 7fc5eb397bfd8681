"""The whole pipeline on the GPU against the CPU pipeline, on the example frame (tiny and r50).

Tolerances (boxes = x y z l w h yaw vx vy label score):
- ``precision="fp32"``: the same float32 arithmetic as the CPU path in other summation orders
  (cuDNN/cuBLAS vs ONNX Runtime/NumPy): every box equal within FP32_ATOL (metres, radians, m/s,
  score), same labels, same count.
- ``precision="fp16"`` (the fast path): dense networks, BEV features and the sparse encoder in
  float16 with float32 accumulation. Relative error of the heatmap is about 1e-3, so boxes whose
  scores differ by less than that may swap places in the top-K; compared as sets: at least
  FP16_MATCHED of the CPU boxes have a GPU box of the same label within FP16_CENTRE metres, whose
  score is within FP16_SCORE and size/yaw within FP16_ATOL. Measured values are printed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bevfusion_ros.io.frame import load_example_data
from bevfusion_ros.pipeline import BEVFusionPipeline

pytest.importorskip("cupy")
torch = pytest.importorskip("torch")

from bevfusion_ros.model.export import export_model_set  # noqa: E402
from bevfusion_ros.model.presets import NUSCENES_R50, TINY  # noqa: E402

FP32_ATOL = 2e-3
FP16_MATCHED = 0.9
FP16_CENTRE = 0.05
FP16_SCORE = 0.02
FP16_ATOL = 0.05
STAGES = {"upload", "normalize", "depth", "camera_backbone", "bevpool", "vtransform", "voxelize",
          "lidar_backbone", "fuser", "head", "decode"}


@pytest.fixture(scope="module")
def frame(example_data_dir):
    return load_example_data(example_data_dir)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return export_model_set(TINY, "fp16", tmp_path_factory.mktemp("tiny"), seed=11).out_dir


@pytest.fixture(scope="session")
def r50_dir(tmp_path_factory):
    """nuscenes-r50 fp16 set; ``BEVFUSION_R50_FP16_DIR`` names a folder to reuse (see
    test_engines_gpu.py)."""
    folder = Path(os.environ.get("BEVFUSION_R50_FP16_DIR") or tmp_path_factory.mktemp("r50"))
    if not (folder / "export.yaml").is_file():
        export_model_set(NUSCENES_R50, "fp16", folder, seed=0)
    return folder


def nearest_same_label(boxes: np.ndarray, box: np.ndarray, used=frozenset()) -> tuple[int, float]:
    """Index of the box of ``box``'s label nearest to its centre among those not ``used``, and
    that distance (inf: none). Untrained weights give near-duplicate boxes, hence ``used``."""
    same = np.array([index for index in np.flatnonzero(boxes[:, 9] == box[9]) if index not in used])
    if same.size == 0:
        return -1, float("inf")
    distance = np.linalg.norm(boxes[same, :3] - box[:3], axis=1)
    return int(same[np.argmin(distance)]), float(distance.min())


def one_to_one(gpu: np.ndarray, cpu: np.ndarray) -> list[tuple[int, float]]:
    """Greedy one-to-one matching of every CPU box (in score order) to a GPU box."""
    used: set[int] = set()
    pairs = []
    for box in cpu:
        index, distance = nearest_same_label(gpu, box, used)
        used.add(index)
        pairs.append((index, distance))
    return pairs


def compare_fp32(gpu: np.ndarray, cpu: np.ndarray) -> float:
    assert gpu.shape == cpu.shape and len(cpu) > 10
    order = [index for index, _ in one_to_one(gpu, cpu)]
    assert -1 not in order
    matched = gpu[order]
    yaw = np.angle(np.exp(1j * (matched[:, 6] - cpu[:, 6])))
    error = max(np.abs(matched[:, [0, 1, 2, 3, 4, 5, 7, 8, 10]] - cpu[:, [0, 1, 2, 3, 4, 5, 7, 8, 10]]).max(),
                np.abs(yaw).max())
    print(f"fp32 GPU vs CPU: {len(cpu)} boxes, max abs difference {error:.2e}")
    return error


def compare_fp16(gpu: np.ndarray, cpu: np.ndarray) -> dict:
    """Fraction of CPU boxes matched by the GPU and the worst differences among the matched."""
    pairs = [(box, gpu[index]) for box, (index, distance) in zip(cpu, one_to_one(gpu, cpu))
             if distance <= FP16_CENTRE]
    stats = {"matched": len(pairs) / len(cpu), "boxes": (len(gpu), len(cpu))}
    if pairs:
        a, b = (np.stack(side) for side in zip(*pairs))
        stats["score"] = float(np.abs(a[:, 10] - b[:, 10]).max())
        stats["size"] = float(np.abs(a[:, 3:6] - b[:, 3:6]).max())
        stats["yaw"] = float(np.abs(np.angle(np.exp(1j * (a[:, 6] - b[:, 6])))).max())
        stats["centre"] = float(np.linalg.norm(a[:, :3] - b[:, :3], axis=1).max())
    print(f"fp16 GPU vs CPU: {stats}")
    return stats


def assert_fp16_close(stats: dict) -> None:
    assert stats["matched"] >= FP16_MATCHED
    assert stats["score"] <= FP16_SCORE and stats["size"] <= FP16_ATOL and stats["yaw"] <= FP16_ATOL


def run_both(model_dir: Path, frame, precision: str):
    cpu = BEVFusionPipeline.from_model_dir(model_dir, backend="cpu").forward(frame)
    gpu_pipeline = BEVFusionPipeline.from_model_dir(model_dir, backend="gpu", precision=precision)
    assert gpu_pipeline.device == "cuda"
    first = gpu_pipeline.forward(frame)
    second = gpu_pipeline.forward(frame)            # graphs, streams and buffers reused
    np.testing.assert_array_equal(first.boxes, second.boxes)
    assert set(second.stage_ms) == STAGES and all(value >= 0 for value in second.stage_ms.values())
    return cpu.boxes, first.boxes


@pytest.mark.parametrize("preset", ["tiny", "r50"])
def test_fp32_gpu_boxes_equal_cpu_boxes(preset, tiny_dir, frame, request):
    model_dir = tiny_dir if preset == "tiny" else request.getfixturevalue("r50_dir")
    cpu, gpu = run_both(model_dir, frame, "fp32")
    assert compare_fp32(gpu, cpu) < FP32_ATOL


@pytest.mark.parametrize("preset", ["tiny", "r50"])
def test_fp16_gpu_boxes_match_cpu_boxes(preset, tiny_dir, frame, request):
    model_dir = tiny_dir if preset == "tiny" else request.getfixturevalue("r50_dir")
    cpu, gpu = run_both(model_dir, frame, "fp16")
    assert_fp16_close(compare_fp16(gpu, cpu))


def test_empty_cloud_and_bad_images_on_the_gpu(tiny_dir, frame):
    import dataclasses

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
