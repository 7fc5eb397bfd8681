"""Deterministic synthetic driving scenes (a camera rig + lidar + 3D boxes) for demos and training.

    from bevfusion_ros.sim import generate_scene, write_example_folder
    scene = generate_scene(seed=7)                        # the six cameras of SYNTHETIC_RIG
    write_example_folder(scene, "out/synthetic/seed-7")   # load_example_data() reads it
    scene = generate_scene(7, rig=load_rig("config/rigs/four-camera.yaml"))   # any rig
"""
from bevfusion_ros.sim.rig import SYNTHETIC_RIG, select_rig, synthetic_calibration, synthetic_rig
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

__all__ = ["CLASS_SPECS", "GROUND_INDEX", "MISS_INDEX", "SYNTHETIC_RIG", "Scene", "build_scene", "cast_rays",
           "generate_scene", "select_rig", "synthetic_calibration", "synthetic_rig", "write_example_folder"]
