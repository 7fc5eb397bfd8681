"""Synthetic lidar sweeps for calibrating untrained models (BatchNorm statistics, int8 ranges).

Uniform random voxels have almost no neighbours, so statistics measured on them let the sparse
encoder's activations explode on real sweeps (seen: ~2e6 on the nuScenes example frame, far
beyond fp16's 65504). A sweep with the structure of a real one — a rotating 32-beam lidar
seeing a ground plane and box-shaped objects, accumulated over 10 sweeps with ego motion —
gives neighbourhoods like real data.
"""
from __future__ import annotations

import numpy as np

LIDAR_HEIGHT = 1.84                  # metres above ground (nuScenes LIDAR_TOP)
BEAM_ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)
AZIMUTH_STEPS = 1080
SWEEPS = 10
SWEEP_PERIOD = 0.05                  # seconds between accumulated sweeps


def _ray_box_distance(origins: np.ndarray, directions: np.ndarray, low: np.ndarray,
                      high: np.ndarray) -> np.ndarray:
    """Slab test: distance ``[R]`` along each ray to the nearest of the boxes (inf if none).

    origins [3], directions [R, 3], low/high [B, 3] axis-aligned box corners.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = 1.0 / directions[:, None, :]
        t1 = (low[None] - origins) * inverse
        t2 = (high[None] - origins) * inverse
    near = np.nanmax(np.minimum(t1, t2), axis=2)
    far = np.nanmin(np.maximum(t1, t2), axis=2)
    hit = (far >= near) & (far > 0)
    return np.where(hit, np.maximum(near, 0), np.inf).min(axis=1)


def synthetic_sweep(seed: int, num_objects: int = 40, max_range: float = 70.0) -> np.ndarray:
    """Points ``[N, 5]`` float32 (x, y, z, intensity 0-255, time lag s) in the lidar frame."""
    rng = np.random.default_rng(seed)
    centres = np.column_stack([rng.uniform(-50, 50, (num_objects, 2)),
                               np.full(num_objects, -LIDAR_HEIGHT)])
    centres = centres[np.linalg.norm(centres[:, :2], axis=1) > 4.0]
    sizes = rng.choice([[4.6, 1.9, 1.7], [0.8, 0.7, 1.8], [10.0, 2.8, 3.4], [0.5, 0.5, 1.0]],
                       size=len(centres))
    low, high = centres - sizes * [0.5, 0.5, 0.0], centres + sizes * [0.5, 0.5, 1.0]
    elevation = np.radians(BEAM_ELEVATIONS_DEG)[:, None]
    azimuth = np.linspace(-np.pi, np.pi, AZIMUTH_STEPS, endpoint=False)[None]
    directions = np.stack(np.broadcast_arrays(np.cos(elevation) * np.cos(azimuth),
                                              np.cos(elevation) * np.sin(azimuth),
                                              np.sin(elevation)), axis=-1).reshape(-1, 3)
    sweeps = []
    for index in range(SWEEPS):
        origin = np.array([-index * SWEEP_PERIOD * 8.0, 0.0, 0.0])        # 8 m/s ego motion
        with np.errstate(divide="ignore"):
            ground = np.where(directions[:, 2] < 0, -LIDAR_HEIGHT / directions[:, 2], np.inf)
        distance = np.minimum(ground, _ray_box_distance(origin, directions, low, high))
        distance += rng.normal(0, 0.02, distance.shape)
        seen = distance < max_range
        xyz = origin + directions[seen] * distance[seen, None]
        intensity = rng.uniform(0, 100, (len(xyz), 1))
        lag = np.full((len(xyz), 1), index * SWEEP_PERIOD)
        sweeps.append(np.hstack([xyz, intensity, lag]))
    return np.concatenate(sweeps).astype(np.float32)
