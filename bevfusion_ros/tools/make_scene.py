"""Write a deterministic synthetic scene as a CUDA-BEVFusion example-data folder.

    python -m bevfusion_ros.tools.make_scene --seed S --out DIR [--objects N] [--azimuth-steps A]
                                             [--sweeps K --ego-velocity VX VY]
                                             [--rig RIG.yaml] [--cameras NAME,NAME,...]

The folder (one ``{i}-{NAME}.jpg`` per camera of the rig: default the six of the synthetic
nuScenes rig; ``points.tensor``, calibration ``*.tensor``, ``gt_bboxes_3d.tensor``,
``gt_labels_3d.tensor``, ``token.txt``) loads with ``bevfusion_ros.io.load_example_data``; the
same seed always gives the same objects and lidar, on any rig.
"""
from __future__ import annotations

import argparse
import sys
import time

from bevfusion_ros.config import ConfigError
from bevfusion_ros.sim.rig import add_rig_options, select_rig
from bevfusion_ros.sim.scene import DEFAULT_AZIMUTH_STEPS, generate_scene, write_example_folder


def summary(scene, directory, seconds: float) -> str:
    counts = scene.class_counts()
    objects = ", ".join(f"{name} {count}" for name, count in counts.items()) or "none"
    on_objects = int((scene.point_objects >= 0).sum())
    return "\n".join([
        f"synthetic scene seed {scene.seed} -> {directory} (token {scene.token}, "
        f"generated in {seconds:.2f} s)",
        f"objects: {len(scene.gt_boxes)} ({objects})",
        f"points: {len(scene.points)} ({on_objects} on objects, "
        f"{len(scene.points) - on_objects} on the ground)",
        f"images: {len(scene.images)} x {scene.images[0].shape[1]}x{scene.images[0].shape[0]} RGB "
        f"({', '.join(scene.calibration.camera_names)})",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True, help="scene seed (same seed, same scene)")
    parser.add_argument("--out", required=True, help="output folder (created if needed)")
    parser.add_argument("--objects", type=int, default=None,
                        help="number of objects (default: 20-40, drawn from the seed)")
    parser.add_argument("--azimuth-steps", type=int, default=DEFAULT_AZIMUTH_STEPS,
                        help="lidar azimuth steps per revolution (32 beams each)")
    parser.add_argument("--sweeps", type=int, default=1,
                        help="lidar sweeps aggregated into the cloud (past ones 0.05 s apart, "
                             "motion-compensated; time lag in the fifth column)")
    parser.add_argument("--ego-velocity", type=float, nargs=2, default=(0.0, 0.0), metavar=("VX", "VY"),
                        help="ego velocity in m/s (lidar frame) while the past sweeps were taken")
    add_rig_options(parser)
    args = parser.parse_args(argv)
    if args.objects is not None and args.objects < 0:
        parser.error("--objects must be >= 0")
    if args.azimuth_steps <= 0:
        parser.error("--azimuth-steps must be positive")
    if args.sweeps < 1:
        parser.error("--sweeps must be >= 1")
    try:
        rig = select_rig(args.rig, args.cameras)
    except ConfigError as error:
        parser.error(str(error))
    start = time.perf_counter()
    scene = generate_scene(args.seed, args.objects, azimuth_steps=args.azimuth_steps,
                           sweeps=args.sweeps, ego_velocity=tuple(args.ego_velocity), rig=rig)
    seconds = time.perf_counter() - start
    directory = write_example_folder(scene, args.out)
    print(summary(scene, directory, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
