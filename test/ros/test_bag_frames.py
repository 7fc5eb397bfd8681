"""BagFrames: a bag of generated scenes read back through the node's edge conversions and the
FrameAssembler gives each scene's frame (images, points, calibration); a broken cloud in a bag is
reported and skipped, the other frames still come."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bevfusion_ros.model.presets import TINY
from bevfusion_ros.ros.bag_frames import BagFrames
from bevfusion_ros.sim.scene import generate_scene
from bevfusion_ros.streaming.node_config import NodeConfig
from bevfusion_ros.tools.make_bag import SCENE_PERIOD_NS, write_frames_bag

SEEDS = (3, 4, 5)
START_NS = 1_600_000_000_000_000_000


@pytest.fixture(scope="module")
def scene_frames():
    return [generate_scene(seed).to_frame() for seed in SEEDS]


@pytest.mark.parametrize("compressed", [False, True])
def test_frames_of_a_bag_are_the_scenes(scene_frames, tmp_path, compressed):
    bag = tmp_path / "scenes.mcap"
    write_frames_bag(scene_frames, bag, compressed=compressed, start_ns=START_NS)
    settings = NodeConfig(time_lag_field="time_lag", num_sweeps=1, compressed_images=compressed)
    reader = BagFrames(bag, TINY.pipeline, settings)
    assembled = list(reader)
    assert reader.problems == []
    assert [a.frame.lidar_stamp_ns for a in assembled] == [START_NS + k * SCENE_PERIOD_NS for k in range(3)]
    for got, scene in zip(assembled, scene_frames):
        assert got.cameras_used == TINY.pipeline.camera_names and got.missing == {}
        np.testing.assert_array_equal(got.frame.points, scene.points)
        np.testing.assert_allclose(got.frame.calibration.lidar2image, scene.calibration.lidar2image,
                                   rtol=1e-5, atol=1e-3)
        for image, sent in zip(got.frame.images, scene.images):
            if compressed:      # JPEG quality 95
                assert np.abs(image.astype(np.int16) - sent).mean() < 2.0
            else:
                np.testing.assert_array_equal(image, sent)


def test_a_broken_cloud_is_reported_and_skipped(scene_frames, tmp_path):
    bag = tmp_path / "broken.mcap"
    broken = dataclasses.replace(scene_frames[1], points=scene_frames[1].points[:, :4].copy())   # no time_lag
    frames = [scene_frames[0], broken, scene_frames[2]]
    write_frames_bag(frames, bag, start_ns=START_NS)
    reader = BagFrames(bag, TINY.pipeline, NodeConfig(time_lag_field="time_lag", num_sweeps=1))
    assembled = list(reader)
    assert [a.frame.lidar_stamp_ns for a in assembled] == [START_NS, START_NS + 2 * SCENE_PERIOD_NS]
    assert len(reader.problems) == 1
    assert "skipped" in reader.problems[0] and "time_lag" in reader.problems[0]
