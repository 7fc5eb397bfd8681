"""GPU pipeline vs CPU pipeline on one frame: every stage's tensor and the boxes.

    python -m bevfusion_ros.tools.parity MODEL_DIR EXAMPLE_DATA_DIR [--precision fp32|fp16]

:func:`stage_chain` runs every stage of a pipeline by hand on one stream and keeps each
intermediate; :func:`match_boxes` pairs two box lists one-to-one. The command prints the
relative L2 difference of each stage, the box matching statistics and whether ``forward`` (two
branch streams) gives the same boxes as the hand-run chain. Used by the GPU tests.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import numpy as np

from bevfusion_ros.camera.bevpool import bev_pool
from bevfusion_ros.camera.depth import depth_map
from bevfusion_ros.camera.normalize import normalize_images
from bevfusion_ros.detections import LABEL, SCORE, VX, VY, YAW, H, L, W, X, Y, Z
from bevfusion_ros.head.decode import decode_boxes
from bevfusion_ros.io import load_example_data
from bevfusion_ros.io.frame import Frame
from bevfusion_ros.lidar.voxelize import voxelize
from bevfusion_ros.pipeline import BEVFusionPipeline, prepare_points
from bevfusion_ros.runtime.array_module import to_numpy


def stage_chain(pipeline: BEVFusionPipeline, images: Any, points: Any, xp: Any) -> dict[str, np.ndarray]:
    """Every intermediate of ``pipeline`` (calibration already set by ``update``) on images
    [N, H, W, 3] uint8 and prepared points [P, C] of module ``xp``, as float64 NumPy arrays:
    normalize, depth, backbone.*, bevpool, vtransform, voxels, lidar_bev, middle, head.*, boxes."""
    config, calibration = pipeline.config, pipeline.calibration
    assert calibration is not None, "call pipeline.update(calibration) first"
    lidar2image, img_aug = (xp.asarray(matrix.astype(np.float32)) for matrix in
                            (calibration.lidar2image, calibration.img_aug_matrix))
    engines = pipeline.engines
    out = {"normalize": normalize_images(images, config.image, config.num_cameras, remap=pipeline.remap_tables)}
    out["depth"] = depth_map(points, lidar2image, img_aug, config.image.output_height,
                             config.image.output_width)
    features = engines["camera.backbone.onnx"].run({"img": out["normalize"][None], "depth": out["depth"][None]})
    out.update({f"backbone.{name}": value for name, value in features.items()})
    out["bevpool"] = bev_pool(features["camera_feature"], features["camera_depth_weights"], pipeline.geometry)
    out["vtransform"] = engines["camera.vtransform.onnx"].run({"feat_in": out["bevpool"]})["feat_out"]
    voxels = voxelize(points, config.voxelization)
    out["voxels"] = voxels.features
    out["lidar_bev"] = pipeline.lidar_backbone.run(voxels.features, voxels.coords,
                                                   config.voxelization.sparse_shape)
    out["middle"] = engines["fuser.onnx"].run({"camera": out["vtransform"], "lidar": out["lidar_bev"]})["middle"]
    head = engines["head.bbox.onnx"].run({"middle": out["middle"]})
    out.update({f"head.{name}": value for name, value in head.items()})
    out["boxes"] = decode_boxes(head, config)
    return {name: to_numpy(value).astype(np.float64) for name, value in out.items()}


def relative_l2(got: np.ndarray, expected: np.ndarray) -> float:
    """||got - expected|| / ||expected|| (inf for a shape mismatch)."""
    if got.shape != expected.shape:
        return float("inf")
    return float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30))


@dataclass(frozen=True)
class BoxMatch:
    """One-to-one pairing of ``boxes`` [M, 11] to ``reference`` [R, 11] boxes (same label, nearest
    centre, greedy in the reference's score order): ``index[r]`` is the box paired with reference
    box r (-1: none left of that label), ``distance[r]`` the centre distance in metres (inf)."""

    index: np.ndarray
    distance: np.ndarray

    def fraction_within(self, metres: float) -> float:
        return float(np.mean(self.distance <= metres)) if self.distance.size else 1.0

    def max_difference(self, boxes: np.ndarray, reference: np.ndarray, within: float = np.inf) -> float:
        """Largest |difference| over x..vy and score of the boxes paired with centres at most
        ``within`` metres apart (yaw wrapped)."""
        paired = (self.index >= 0) & (self.distance <= within)
        if not paired.any():
            return 0.0
        a, b = boxes[self.index[paired]], reference[paired]
        columns = [X, Y, Z, W, L, H, VX, VY, SCORE]
        yaw = np.angle(np.exp(1j * (a[:, YAW] - b[:, YAW])))
        return float(max(np.abs(a[:, columns] - b[:, columns]).max(), np.abs(yaw).max()))


def match_boxes(boxes: np.ndarray, reference: np.ndarray) -> BoxMatch:
    """Greedy one-to-one matching (see :class:`BoxMatch`)."""
    used = np.zeros(len(boxes), dtype=bool)
    index = np.full(len(reference), -1)
    distance = np.full(len(reference), np.inf)
    for row, box in enumerate(reference):
        candidates = np.flatnonzero((boxes[:, LABEL] == box[LABEL]) & ~used)
        if candidates.size:
            gaps = np.linalg.norm(boxes[candidates, :3] - box[:3], axis=1)
            best = int(np.argmin(gaps))
            index[row], distance[row] = candidates[best], gaps[best]
            used[candidates[best]] = True
    return BoxMatch(index, distance)


def both_chains(cpu: BEVFusionPipeline, gpu: BEVFusionPipeline, frame: Frame
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(CPU, GPU) :func:`stage_chain` of ``frame`` (its calibration set on both pipelines first)."""
    import cupy
    cpu.update(frame.calibration)
    gpu.update(frame.calibration)
    points = prepare_points(frame.points, cpu.config).points
    images = np.stack(frame.images)
    return (stage_chain(cpu, images, points, np),
            stage_chain(gpu, cupy.asarray(images), cupy.asarray(points), cupy))


def compare(model_dir: str, data_dir: str, precision: str) -> dict[str, Any]:
    """Stage errors and box statistics of the GPU pipeline against the CPU pipeline."""
    frame = load_example_data(data_dir)
    cpu = BEVFusionPipeline.from_model_dir(model_dir, backend="cpu")
    gpu = BEVFusionPipeline.from_model_dir(model_dir, backend="gpu", precision=precision)
    expected, got = both_chains(cpu, gpu, frame)
    match = match_boxes(got["boxes"], expected["boxes"])
    forward = gpu.forward(frame).boxes
    return {"stages": {name: relative_l2(got[name], value) for name, value in expected.items()
                       if name != "boxes"},
            "boxes": (len(got["boxes"]), len(expected["boxes"])),
            "within": {metres: match.fraction_within(metres) for metres in (1e-3, 1e-2, 0.1, 1.0)},
            "max_difference": match.max_difference(got["boxes"], expected["boxes"]),
            "forward_equals_chain": forward.shape == got["boxes"].shape
            and bool(np.allclose(forward, got["boxes"], atol=1e-4))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    args = parser.parse_args(argv)
    result = compare(args.model, args.data, args.precision)
    for name, error in result["stages"].items():
        print(f"{name:<34} rel L2 {error:.3e}")
    print(f"boxes GPU/CPU {result['boxes']}; CPU boxes with a GPU box of the same label within "
          + ", ".join(f"{metres:g} m: {fraction:.0%}" for metres, fraction in result["within"].items()))
    print(f"largest difference of paired boxes {result['max_difference']:.2e}; "
          f"forward (two streams) equals the one-stream chain: {result['forward_equals_chain']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
