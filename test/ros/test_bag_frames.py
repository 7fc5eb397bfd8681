"""BagFrames: a bag of generated scenes read back through the node's edge conversions and the
FrameAssembler gives each scene's frame (images, points, calibration); a broken cloud in a bag is
reported and skipped, the other frames still come; a recording split into files reads as one."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from bevfusion_ros.analysis.ground_truth import GROUND_TRUTH_RECORD, SCENE_SEEDS_KEY, truths_from_record
from bevfusion_ros.model.presets import TINY
from bevfusion_ros.ros.bag import bag_custom_data, read_metadata
from bevfusion_ros.ros.bag_frames import BagFrames
from bevfusion_ros.sim.scene import generate_scene
from bevfusion_ros.streaming.node_config import NodeConfig
from bevfusion_ros.tools.make_bag import SCENE_PERIOD_NS, write_frames_bag, write_scenes_bag

SEEDS = (3, 4, 5)
MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-synthetic"
START_NS = 1_600_000_000_000_000_000


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def scene_frames(scenes):
    return [scene.to_frame() for scene in scenes]


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


def test_a_scenes_bag_carries_each_scenes_ground_truth_by_stamp(scenes, tmp_path):
    bag = tmp_path / "truth.mcap"
    write_scenes_bag(iter(scenes), bag, start_ns=START_NS)
    truths = truths_from_record(read_metadata(bag, GROUND_TRUTH_RECORD))
    assert sorted(truths) == [START_NS + k * SCENE_PERIOD_NS for k in range(len(SEEDS))]
    assert bag_custom_data(bag) == {SCENE_SEEDS_KEY: ",".join(map(str, SEEDS))}
    for stamp, scene in zip(sorted(truths), scenes):
        truth = truths[stamp]
        np.testing.assert_array_equal(truth.boxes, scene.gt_boxes)
        np.testing.assert_array_equal(truth.labels, scene.gt_labels)
        hits = [int(np.sum(scene.point_objects == box)) for box in range(len(scene.gt_boxes))]   # brute force
        assert truth.num_points.tolist() == hits
    # The frames are those of write_frames_bag: same stamps and points.
    assembled = list(BagFrames(bag, TINY.pipeline, NodeConfig(time_lag_field="time_lag", num_sweeps=1)))
    assert [a.frame.lidar_stamp_ns for a in assembled] == sorted(truths)
    np.testing.assert_array_equal(assembled[2].frame.points, scenes[2].points)


def split_recording(bag, folder, first_file_end_ns: int):
    """The bag as a rosbag2 recording split in two files at ``first_file_end_ns`` (log time), as
    ``ros2 bag record --max-bag-duration`` writes it: ``/tf_static`` only in the first file, the
    ground-truth record copied into the first; ``metadata.yaml`` lists the files in order."""
    from bevfusion_ros.ros.bag import BagWriter, read_bag
    names = [f"{folder.name}_0.mcap", f"{folder.name}_1.mcap"]
    folder.mkdir()
    with BagWriter(folder / names[0]) as first, BagWriter(folder / names[1]) as second:
        first.add_metadata(GROUND_TRUTH_RECORD, read_metadata(bag, GROUND_TRUTH_RECORD))
        for message in read_bag(bag):
            writer = first if message.log_time_ns < first_file_end_ns else second
            writer.write(message.topic, message.message, message.log_time_ns)
    (folder / "metadata.yaml").write_text(yaml.safe_dump({"rosbag2_bagfile_information": {
        "version": 9, "storage_identifier": "mcap", "relative_file_paths": names}}))
    return [folder / name for name in names]


def test_a_split_recording_reads_as_the_whole_bag(scenes, tmp_path):
    """The files of a split recording, read as one bag, give the unsplit bag's frames; the second
    file alone has no /tf_static, so its frames would lose their cameras' calibration."""
    bag = tmp_path / "whole.mcap"
    write_scenes_bag(iter(scenes), bag, start_ns=START_NS)
    files = split_recording(bag, tmp_path / "drive", START_NS + SCENE_PERIOD_NS + SCENE_PERIOD_NS // 2)
    settings = NodeConfig(time_lag_field="time_lag", num_sweeps=1)
    whole, split = BagFrames(bag, TINY.pipeline, settings), BagFrames(files, TINY.pipeline, settings)
    expected, got = list(whole), list(split)
    assert split.problems == whole.problems == []
    assert [a.frame.lidar_stamp_ns for a in got] == [a.frame.lidar_stamp_ns for a in expected]
    for one, other in zip(got, expected):
        assert one.cameras_used == other.cameras_used == TINY.pipeline.camera_names and one.missing == {}
        np.testing.assert_array_equal(one.frame.points, other.frame.points)
        np.testing.assert_array_equal(one.frame.calibration.lidar2image, other.frame.calibration.lidar2image)
    alone = list(BagFrames(files[1], TINY.pipeline, settings))
    assert [a.frame.lidar_stamp_ns for a in alone] == [START_NS + 2 * SCENE_PERIOD_NS]
    assert alone[0].missing or alone[0].calibration_error


def test_batch_inference_of_a_split_recording_equals_the_whole_bags(scenes, tmp_path):
    """BagInference over the rosbag2 folder (found by plan_jobs) writes the unsplit bag's
    detections, frame for frame, and finds the ground truth in its first file."""
    from bevfusion_ros.batch.outputs import DETECTIONS_JSON, plan_jobs
    from bevfusion_ros.batch.settings import EvalOptions, load_settings
    from bevfusion_ros.ros.bag_inference import BagInference
    bag = tmp_path / "bags" / "whole.mcap"
    bag.parent.mkdir()
    write_scenes_bag(iter(scenes), bag, start_ns=START_NS)
    split_recording(bag, tmp_path / "bags" / "drive", START_NS + SCENE_PERIOD_NS + SCENE_PERIOD_NS // 2)
    settings = load_settings(MODEL, [], {"node.backend": "cpu", "node.time_lag_field": "time_lag",
                                         "node.num_sweeps": 1}, threads=1, evaluation=EvalOptions())
    inference = BagInference(settings)
    reports = {job.name: inference.run(job) for job in plan_jobs([tmp_path / "bags"], tmp_path / "out")}
    assert sorted(reports) == ["drive", "whole"]
    assert all(report.frames == len(SEEDS) and report.ground_truth for report in reports.values())
    documents = {name: json.loads((tmp_path / "out" / "bags" / name / DETECTIONS_JSON).read_text())
                 for name in reports}
    frames = {name: [{key: value for key, value in frame.items() if key != "stage_ms"}     # timings differ
                     for frame in document["frames"]] for name, document in documents.items()}
    assert frames["drive"] == frames["whole"] and all(frame["boxes"] for frame in frames["whole"])
    assert reports["drive"].mean_ap == reports["whole"].mean_ap
