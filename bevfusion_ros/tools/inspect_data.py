"""``bevfusion-inspect DIR``: load and validate a CUDA-BEVFusion example-data folder.

Prints the images, the point cloud statistics and the calibration checks; exits 1 with the
loader's message when anything is malformed (missing file, bad tensor, invalid calibration).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from bevfusion_ros.config import PipelineConfig, load_config
from bevfusion_ros.io import CalibrationError, FrameError, TensorFileError, load_example_data


def describe(directory: str, config_path: str | None) -> str:
    config = load_config(config_path) if config_path else PipelineConfig()
    frame = load_example_data(directory, config.camera_names)
    points = frame.points
    lines = [f"example data: {directory}", f"token: {frame.token or '(none)'}"]
    for name, image in zip(frame.calibration.camera_names, frame.images):
        lines.append(f"  camera {name:<12} {image.shape[1]}x{image.shape[0]} RGB uint8, "
                     f"mean {image.mean(axis=(0, 1)).round(1).tolist()}")
    lines.append(f"points: {points.shape[0]} x {points.shape[1]} "
                 f"(x {points[:, 0].min():.2f}..{points[:, 0].max():.2f} m, "
                 f"y {points[:, 1].min():.2f}..{points[:, 1].max():.2f} m, "
                 f"z {points[:, 2].min():.2f}..{points[:, 2].max():.2f} m, "
                 f"{len(np.unique(points[:, 4]))} time lags up to {points[:, 4].max():.3f} s)")
    lines.append(f"calibration: {frame.calibration.num_cameras} cameras valid; lidar2image vs "
                 f"K @ lidar2camera max relative error {frame.calibration.projection_error():.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="CUDA-BEVFusion example-data folder")
    parser.add_argument("--config", help="parameter YAML (camera names); default nuScenes order")
    args = parser.parse_args(argv)
    try:
        print(describe(args.directory, args.config))
    except (FrameError, CalibrationError, TensorFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
