"""Training samples from synthetic scenes (:func:`bevfusion_ros.sim.scene.generate_scene`) of a
camera rig (default :data:`~bevfusion_ros.sim.rig.SYNTHETIC_RIG`; the preset must be fitted to
it, :meth:`~bevfusion_ros.model.presets.ModelPreset.for_rig`).

A sample holds what the model forward and the losses need, computed with the reference's own
functions (:mod:`bevfusion_ros.model.reference`) so training sees exactly the deployed
preprocessing:

* ``images``  fp16 ``[N, 3, H, W]``: :func:`normalize_images` (fixed-point resize, crop, mean/std);
* ``depth``   fp16 ``[N, 1, H, W]``: :func:`depth_images` (sparse lidar depth per camera);
* ``voxel_features`` fp16 ``[V, 5]`` and ``voxel_coords`` int32 ``[V, 4]``: :func:`voxelize`;
* ``point_ids``/``cells`` int64: the BEVPool geometry, :func:`frustum_bev_cells` (computed once
  per distinct calibration and shared, not stored per sample);
* ``gt_boxes`` float32 ``[M, 9]`` / ``gt_labels`` int64 ``[M]``: the boxes inside the BEV grid;
* ``heatmap`` float32 ``[C, X, Y]``: :func:`bevfusion_ros.train.targets.heatmap_targets`.

The calibration is made consistent with the preset first (:func:`calibration_for_preset`): the
simulator's ``img_aug_matrix`` is that of the default 704x256 network input, while e.g. ``tiny``
resizes by 0.16 to 256x128; depth images and BEVPool geometry use the preset's matrix, as the
pixels of ``normalize_images`` do. Evaluations must feed the same (``calibration_for_preset``).

A scene takes ~1 s to generate and preprocess on the CPU (``tiny``; more under load); with
``cache_dir`` each preprocessed sample is saved once (``<cache>/<preset>/<rig tag>/scene-<seed>.pt``,
:meth:`~bevfusion_ros.io.rig.Rig.tag`; ~1.7 MB for tiny on the default rig) and read back
afterwards; ``memory_cache`` also keeps them in RAM (small datasets, overfitting; per process,
so only with ``workers=0``). No data augmentation.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.rig import Rig, RigError
from bevfusion_ros.model.presets import ModelPreset
from bevfusion_ros.model.reference import depth_images, frustum_bev_cells, normalize_images, voxelize
from bevfusion_ros.sim.rig import SYNTHETIC_RIG
from bevfusion_ros.sim.scene import Scene, generate_scene
from bevfusion_ros.train.targets import TargetConfig, boxes_in_grid, heatmap_targets

CACHE_VERSION = 1
Sample = dict[str, Any]
_GEOMETRY_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def parse_scene_range(text: str) -> list[int]:
    """Scene seeds from ``"A:B"`` (A..B-1), ``":B"``, ``"N"`` (just N) or ``"1,5,9"``."""
    text = text.strip()
    if ":" in text:
        start, stop = text.split(":", 1)
        seeds = list(range(int(start or 0), int(stop)))
    else:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    if not seeds:
        raise ValueError(f"scene range {text!r} selects no scene")
    return seeds


def calibration_for_preset(calibration: Calibration, preset: ModelPreset) -> Calibration:
    """The same rig with the ``img_aug_matrix`` of ``preset``'s image config (resize + crop)."""
    return calibration.for_image(preset.pipeline.image)


def _calibration_key(calibration: Calibration, preset: ModelPreset) -> str:
    digest = hashlib.sha1(preset.name.encode())
    for name in ("camera2lidar", "camera_intrinsics", "img_aug_matrix"):
        digest.update(np.ascontiguousarray(getattr(calibration, name), dtype=np.float64).tobytes())
    return digest.hexdigest()


def bev_pool_geometry(calibration: Calibration, preset: ModelPreset) -> tuple[torch.Tensor, torch.Tensor]:
    """(point_ids, cells) of :func:`frustum_bev_cells` on the CPU, memoised per calibration."""
    key = _calibration_key(calibration, preset)
    if key not in _GEOMETRY_CACHE:
        with torch.device("cpu"):
            _GEOMETRY_CACHE[key] = frustum_bev_cells(calibration, preset)
    return _GEOMETRY_CACHE[key]


def preprocess_scene(scene: Scene, preset: ModelPreset) -> Sample:
    """The cacheable part of a sample (everything but geometry and heatmap), CPU tensors."""
    if tuple(scene.class_names) != tuple(preset.pipeline.head.class_names):
        raise ValueError(f"scene classes {scene.class_names} differ from the preset's "
                         f"{preset.pipeline.head.class_names}")
    calibration = calibration_for_preset(scene.calibration, preset)
    with torch.device("cpu"):
        points = torch.from_numpy(np.ascontiguousarray(scene.points))[:, : preset.pipeline.lidar.num_features]
        images = normalize_images(scene.images, preset)
        depth = depth_images(points, calibration, preset)
        voxel_features, voxel_coords = voxelize(points, preset)
    keep = boxes_in_grid(scene.gt_boxes, preset)
    return {
        "version": CACHE_VERSION,
        "seed": int(scene.seed),
        "images": images.contiguous(),
        "depth": depth.contiguous(),
        "voxel_features": voxel_features.contiguous(),
        "voxel_coords": voxel_coords.contiguous(),
        "gt_boxes": torch.from_numpy(np.asarray(scene.gt_boxes, dtype=np.float32)[keep]),
        "gt_labels": torch.from_numpy(np.asarray(scene.gt_labels, dtype=np.int64)[keep]),
        "camera2lidar": torch.from_numpy(calibration.camera2lidar),
        "camera_intrinsics": torch.from_numpy(calibration.camera_intrinsics),
        "camera_names": list(calibration.camera_names),
    }


def _sample_calibration(sample: Sample, preset: ModelPreset) -> Calibration:
    return Calibration.from_camera2lidar(sample["camera_intrinsics"].numpy()[:, :3, :3],
                                         sample["camera2lidar"].numpy(), preset.pipeline.image,
                                         tuple(sample["camera_names"]))


class SceneDataset(Dataset):
    """``dataset[i]`` = the training sample of scene seed ``seeds[i]`` (see the module doc).

    ``cache_dir``: save/load preprocessed samples there; ``memory_cache``: keep them in RAM;
    ``num_objects``: passed to ``generate_scene`` (None: 20-40 drawn from the seed); ``rig``:
    the cameras of the scenes, those of ``preset`` (:meth:`ModelPreset.for_rig`).
    """

    def __init__(self, preset: ModelPreset, seeds: Sequence[int], cache_dir: str | Path | None = None,
                 memory_cache: bool = False, target_config: TargetConfig = TargetConfig(),
                 num_objects: int | None = None, rig: Rig = SYNTHETIC_RIG) -> None:
        if preset.for_rig(rig) is not preset:
            raise RigError(f"preset {preset.name} has cameras {list(preset.pipeline.camera_names)} "
                           f"({preset.pipeline.image.input_width}x{preset.pipeline.image.input_height}), "
                           f"the scenes' {rig.describe()}: fit it with preset.for_rig(rig)")
        self.preset = preset
        self.rig = rig
        self.seeds = [int(seed) for seed in seeds]
        self.cache_dir = (Path(cache_dir) / preset.name / rig.tag()
                          if cache_dir is not None else None)
        self.memory_cache = memory_cache
        self.target_config = target_config
        self.num_objects = num_objects
        self._memory: dict[int, Sample] = {}

    def __len__(self) -> int:
        return len(self.seeds)

    def _cache_path(self, seed: int) -> Path | None:
        if self.cache_dir is None:
            return None
        suffix = "" if self.num_objects is None else f"-n{self.num_objects}"
        return self.cache_dir / f"scene-{seed:06d}{suffix}.pt"

    def _load_or_build(self, seed: int) -> Sample:
        path = self._cache_path(seed)
        if path is not None and path.is_file():
            sample = torch.load(path, map_location="cpu", weights_only=True)
            if sample.get("version") == CACHE_VERSION:
                return sample
        sample = preprocess_scene(generate_scene(seed, self.num_objects, rig=self.rig), self.preset)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(sample, temporary)
            os.replace(temporary, path)
        return sample

    def base_sample(self, index: int) -> Sample:
        """The preprocessed (cacheable) part of sample ``index``."""
        seed = self.seeds[index]
        if seed in self._memory:
            return self._memory[seed]
        sample = self._load_or_build(seed)
        if self.memory_cache:
            self._memory[seed] = sample
        return sample

    def __getitem__(self, index: int) -> Sample:
        sample = dict(self.base_sample(index))
        point_ids, cells = bev_pool_geometry(_sample_calibration(sample, self.preset), self.preset)
        sample["point_ids"], sample["cells"] = point_ids, cells
        sample["heatmap"] = torch.from_numpy(heatmap_targets(
            sample["gt_boxes"].numpy(), sample["gt_labels"].numpy(), self.preset, self.target_config))
        return sample


def collate_samples(samples: list[Sample]) -> list[Sample]:
    """Batches are lists of samples (the sparse and BEVPool inputs differ in size per sample)."""
    return list(samples)
