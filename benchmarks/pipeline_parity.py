"""Stage-by-stage comparison of the GPU pipeline with the CPU pipeline on the example frame.

    python benchmarks/pipeline_parity.py MODEL_DIR EXAMPLE_DATA_DIR [fp32|fp16]

Runs every stage of both chains on the same inputs (the GPU chain on CuPy's default stream)
and prints the relative L2 difference of each intermediate, then compares the boxes of the
GPU chain run by hand with those of ``forward`` (which uses two branch streams).
"""
from __future__ import annotations

import sys

import numpy as np

from bevfusion_ros.array_module import to_numpy
from bevfusion_ros.camera.bevpool import bev_pool
from bevfusion_ros.camera.depth import depth_map
from bevfusion_ros.camera.normalize import normalize_images
from bevfusion_ros.head.decode import decode_boxes
from bevfusion_ros.io import load_example_data
from bevfusion_ros.lidar.voxelize import voxelize
from bevfusion_ros.pipeline import BEVFusionPipeline, prepare_points


def chain(pipeline, images, points, xp):
    config = pipeline.config
    calibration = pipeline.calibration
    lidar2image, img_aug = (xp.asarray(m.astype(np.float32)) for m in
                            (calibration.lidar2image, calibration.img_aug_matrix))
    out = {"normalize": normalize_images(images, config.image, config.num_cameras)}
    out["depth"] = depth_map(points, lidar2image, img_aug, config.image.output_height, config.image.output_width)
    features = pipeline.engines["camera.backbone.onnx"].run({"img": out["normalize"][None], "depth": out["depth"][None]})
    out.update({f"backbone.{k}": v for k, v in features.items()})
    out["bevpool"] = bev_pool(features["camera_feature"], features["camera_depth_weights"], pipeline.geometry)
    out["vtransform"] = pipeline.engines["camera.vtransform.onnx"].run({"feat_in": out["bevpool"]})["feat_out"]
    voxels = voxelize(points, config.voxelization)
    out["voxels"] = voxels.features
    out["lidar_bev"] = pipeline.lidar_backbone.run(voxels.features, voxels.coords, config.voxelization.sparse_shape)
    out["middle"] = pipeline.engines["fuser.onnx"].run({"camera": out["vtransform"], "lidar": out["lidar_bev"]})["middle"]
    head = pipeline.engines["head.bbox.onnx"].run({"middle": out["middle"]})
    out.update({f"head.{k}": v for k, v in head.items()})
    out["boxes"] = decode_boxes(head, config)
    return {k: to_numpy(v).astype(np.float64) for k, v in out.items()}


def main() -> None:
    import cupy
    model, data = sys.argv[1:3]
    precision = sys.argv[3] if len(sys.argv) > 3 else "fp32"
    frame = load_example_data(data)
    cpu = BEVFusionPipeline.from_model_dir(model, backend="cpu")
    gpu = BEVFusionPipeline.from_model_dir(model, backend="gpu", precision=precision)
    cpu.update(frame.calibration)
    gpu.update(frame.calibration)
    points = prepare_points(frame.points, cpu.config).points
    images = np.stack(frame.images)
    expected = chain(cpu, images, points, np)
    got = chain(gpu, cupy.asarray(images), cupy.asarray(points), cupy)
    for name, value in expected.items():
        other = got[name]
        if other.shape != value.shape:
            print(f"{name:<32} shape {other.shape} vs {value.shape}")
            continue
        error = np.linalg.norm(other - value) / max(np.linalg.norm(value), 1e-30)
        print(f"{name:<32} rel L2 {error:.3e}  max|cpu| {np.abs(value).max():.3e}  nan {np.isnan(other).sum()}")
    forward = gpu.forward(frame).boxes
    print("forward vs hand-run GPU chain boxes equal:", forward.shape == got["boxes"].shape
          and np.allclose(forward, got["boxes"], atol=1e-4), forward.shape, got["boxes"].shape)


if __name__ == "__main__":
    main()
