"""``bevfusion-export``: write a model folder in exactly the CUDA-BEVFusion layout.

    bevfusion-export --preset {nuscenes-r50,tiny} --precision {fp16,int8} --out DIR
                     [--checkpoint PTH] [--seed N] [--rig RIG.yaml] [--cameras NAME,NAME,...]

writes ``camera.backbone.onnx``, ``camera.vtransform.onnx``, ``fuser.onnx``,
``head.bbox.onnx``, ``lidar.backbone.xyz.onnx``, ``bevfusion.yaml`` (the geometry the model
was built for, as a ROS 2 parameter file the pipeline and node read) and ``export.yaml``
(provenance: preset, precision, seed or checkpoint, whether the weights are trained, file
hashes, cameras). The preset's ``camera_names`` fix the camera batch of
``camera.backbone.onnx`` (``img [1, N, 3, H, W]``): fit a preset to a rig first
(:meth:`~bevfusion_ros.model.presets.ModelPreset.for_rig`). ``fp16`` writes float32 graphs
without Q/DQ (TensorRT builds them in fp16, as
NVIDIA's ``resnet50`` set); ``int8`` adds Q/DQ to ``camera.backbone.onnx`` and ``fuser.onnx``
like NVIDIA's ``resnet50int8`` set (spec 2.7: vtransform and head stay float, the SECONDFPN
1x1 deblock is not quantized). The SCN file always carries fp16 weights and int8 dynamic
ranges; the runtime precision chooses (spec 2.7).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch
import yaml

from bevfusion_ros.config import save_config
from bevfusion_ros.model.bevfusion import BEVFusionModel, build_model, calibrate_batchnorm
from bevfusion_ros.model.camera import CameraBackboneExport, VTransformExport, camera_sample_inputs, export_camera_onnx
from bevfusion_ros.model.checkpoint import load_checkpoint
from bevfusion_ros.model.fuser import FuserExport, export_fuser_head_onnx, fuser_sample_inputs
from bevfusion_ros.model.head import HeadExport, head_sample_inputs
from bevfusion_ros.model.presets import ModelPreset
from bevfusion_ros.model.quantize import quantize_qdq
from bevfusion_ros.model.reference import voxelize
from bevfusion_ros.model.samples import synthetic_sweep
from bevfusion_ros.model.scn_onnx import write_scn_onnx

MODEL_FILES = ("camera.backbone.onnx", "camera.vtransform.onnx", "fuser.onnx", "head.bbox.onnx",
               "lidar.backbone.xyz.onnx")
PRECISIONS = ("fp16", "int8")
# Layers NVIDIA left unquantized after calibration (spec 2.7), as ONNX node-name fragments.
INT8_SKIPPED_LAYERS = ("/decoder/neck/deblocks.0/",)


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    files: dict[str, int]          # file name -> size in bytes
    seconds: float


def _samples(preset: ModelPreset, seed: int, count: int, make) -> list:
    return [make(preset, seed * 1000 + index) for index in range(count)]


def lidar_sample_inputs(preset: ModelPreset, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxels ``(features [M, 5] float32, coords [M, 4] int32)`` of a synthetic 10-sweep scan."""
    features, coords = voxelize(torch.from_numpy(synthetic_sweep(seed)), preset)
    return features.float(), coords


def vtransform_sample_inputs(preset: ModelPreset, seed: int) -> torch.Tensor:
    """Camera-BEV-like input ``[1, C, X, Y]``: non-negative, sparse like pooled features."""
    generator = torch.Generator().manual_seed(seed)
    channels = preset.pipeline.camera_geometry.camera_channels
    shape = (1, channels, *preset.camera_bev_size)
    values = torch.randn(shape, generator=generator).relu()
    return values * (torch.rand(shape[2:], generator=generator) < 0.5)


def calibrate_random_weights(model: BEVFusionModel, seed: int, count: int = 2) -> int:
    """Measure BN statistics of every stage on realistic random inputs (see calibrate_batchnorm);
    the lidar encoder on synthetic lidar sweeps (``samples.synthetic_sweep``)."""
    preset = model.preset
    camera = model.encoders.camera
    stages = [
        (CameraBackboneExport(camera, preset), camera_sample_inputs),
        (VTransformExport(camera), lambda p, s: (vtransform_sample_inputs(p, s),)),
        (model.encoders.lidar.backbone, lidar_sample_inputs),
        (FuserExport(model.fuser, model.decoder), fuser_sample_inputs),
        (HeadExport(model.heads.object), lambda p, s: (head_sample_inputs(p, s),)),
    ]
    return sum(calibrate_batchnorm(module, lambda args, m=module: m(*args),
                                   _samples(preset, seed, count, make))
               for module, make in stages)


def _feeds(names: Iterable[str], tensors: Iterable[torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy().astype(np.float32) for name, tensor in zip(names, tensors)}


def _quantize_file(path: Path, samples: list[dict[str, np.ndarray]]) -> None:
    quantized, _ = quantize_qdq(onnx.load(str(path)), samples,
                                skip_nodes=_nodes_matching(path, INT8_SKIPPED_LAYERS))
    onnx.save(quantized, str(path))


def _nodes_matching(path: Path, fragments: Iterable[str]) -> list[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [node.name for node in graph.node if any(fragment in node.name for fragment in fragments)]


def export_model_set(preset: ModelPreset, precision: str, out_dir: Path,
                     checkpoint: Path | None = None, seed: int = 0,
                     trained_on: str | None = None) -> ExportResult:
    """Build (or load) the model, export all five files plus the YAMLs into ``out_dir``.
    ``trained_on``: what the checkpoint was trained on, recorded in ``export.yaml``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(preset, seed)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    else:
        calibrate_random_weights(model, seed)
    camera = model.encoders.camera
    export_camera_onnx(camera, preset, out_dir)
    export_fuser_head_onnx(model.fuser, model.decoder, model.heads.object, preset, out_dir)
    scn_samples = _samples(preset, seed + 1, 2, lidar_sample_inputs)
    write_scn_onnx(model.encoders.lidar.backbone, preset, out_dir / "lidar.backbone.xyz.onnx",
                   calibration_inputs=scn_samples)
    if precision == "int8":
        camera_samples = _samples(preset, seed + 1, 4, camera_sample_inputs)
        _quantize_file(out_dir / "camera.backbone.onnx",
                       [_feeds(("img", "depth"), sample) for sample in camera_samples])
        fuser_samples = _samples(preset, seed + 1, 4, fuser_sample_inputs)
        _quantize_file(out_dir / "fuser.onnx",
                       [_feeds(("camera", "lidar"), sample) for sample in fuser_samples])
    trained = checkpoint is not None
    weights = f"checkpoint {checkpoint}" if trained else "seeded random weights, UNTRAINED"
    save_config(preset.pipeline, out_dir / "bevfusion.yaml",
                header=f"Geometry of the {preset.name} model exported by bevfusion-export ({precision}, {weights}).")
    files = {name: (out_dir / name).stat().st_size for name in MODEL_FILES}
    _write_export_info(out_dir, preset, precision, checkpoint, seed, files, trained_on)
    return ExportResult(out_dir, files, time.perf_counter() - start)


def _write_export_info(out_dir: Path, preset: ModelPreset, precision: str, checkpoint: Path | None,
                       seed: int, files: dict[str, int], trained_on: str | None) -> None:
    info = {
        "preset": preset.name,
        "precision": precision,
        "weights": f"checkpoint {checkpoint}" if checkpoint else f"seeded random (seed {seed}), untrained",
        "trained": checkpoint is not None,
        **({"trained_on": trained_on} if checkpoint is not None and trained_on else {}),
        "seed": seed,
        "cameras": list(preset.pipeline.camera_names),
        "image_size": [preset.pipeline.image.input_width, preset.pipeline.image.input_height],
        "files": {name: {"bytes": size,
                         "sha256": hashlib.sha256((out_dir / name).read_bytes()).hexdigest()}
                  for name, size in files.items()},
    }
    (out_dir / "export.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
