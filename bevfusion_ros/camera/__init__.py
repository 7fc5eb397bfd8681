"""Camera branch, deploy side (no torch): image normalisation, lidar depth, LSS geometry, BEV pool.

Each op is a NumPy function on arrays plus small dataclasses (pipeline spec 1.2, 3, 4).
"""
from bevfusion_ros.camera.bevpool import bev_pool
from bevfusion_ros.camera.depth import depth_map
from bevfusion_ros.camera.geometry import CameraGeometry, compute_geometry, frustum
from bevfusion_ros.camera.normalize import NormalizeTables, normalize_images, normalize_tables

__all__ = ["CameraGeometry", "NormalizeTables", "bev_pool", "compute_geometry", "depth_map", "frustum",
           "normalize_images", "normalize_tables"]
