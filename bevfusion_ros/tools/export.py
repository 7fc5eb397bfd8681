"""bevfusion-export: write a CUDA-BEVFusion model folder (:mod:`bevfusion_ros.model.export`).

``--rig FILE`` / ``--cameras NAME,NAME,...`` export the model for that rig: ``camera.backbone``
takes its camera count as the batch, ``bevfusion.yaml`` holds its camera names and image size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bevfusion_ros.config import ConfigError
from bevfusion_ros.model.checkpoint import CheckpointError
from bevfusion_ros.model.export import PRECISIONS, export_model_set
from bevfusion_ros.model.presets import PRESETS, get_preset
from bevfusion_ros.sim.rig import add_rig_options, select_rig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a CUDA-BEVFusion model folder.")
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--checkpoint", type=Path, help="mit-han-lab/bevfusion .pth to load")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--trained-on", help="what the checkpoint was trained on (export.yaml)")
    add_rig_options(parser)
    args = parser.parse_args(argv)
    try:
        rig = select_rig(args.rig, args.cameras)
        preset = get_preset(args.preset).for_rig(rig)
        result = export_model_set(preset, args.precision, args.out, args.checkpoint, args.seed,
                                  args.trained_on)
    except (CheckpointError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, size in result.files.items():
        print(f"  {name:<26} {size / 2**20:8.2f} MiB")
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else \
        f"seeded random weights (seed {args.seed}): UNTRAINED, boxes will be meaningless"
    width, height = preset.pipeline.image.input_width, preset.pipeline.image.input_height
    print(f"exported {args.preset} ({args.precision}) for {preset.pipeline.num_cameras} cameras "
          f"{list(preset.pipeline.camera_names)} of {width}x{height} to {args.out} in "
          f"{result.seconds:.1f} s; {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
