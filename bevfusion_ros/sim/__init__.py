"""Deterministic synthetic driving scenes (6 cameras + lidar + 3D boxes) for demos and training.

    from bevfusion_ros.sim import generate_scene, write_example_folder
    scene = generate_scene(seed=7)
    write_example_folder(scene, "out/synthetic/seed-7")   # load_example_data() reads it
"""
from bevfusion_ros.sim.rig import synthetic_calibration, synthetic_rig
from bevfusion_ros.sim.scene import (
                                     CLASS_SPECS,
                                     GROUND_INDEX,
                                     MISS_INDEX,
                                     Scene,
                                     build_scene,
                                     cast_rays,
                                     generate_scene,
                                     write_example_folder,
)

__all__ = ["CLASS_SPECS", "GROUND_INDEX", "MISS_INDEX", "Scene", "build_scene", "cast_rays",
           "generate_scene", "synthetic_calibration", "synthetic_rig", "write_example_folder"]
