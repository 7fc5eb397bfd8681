"""The batch mode's ROS-free, Ray-free parts: settings from the node's parameter files, bag
discovery and naming, atomic outputs and resume markers, fleet progress, worker counts.
(Running bags on Ray: test/ros/test_batch_ray.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bevfusion_ros.batch.outputs import (
    DETECTIONS_BAG,
    DETECTIONS_JSON,
    METRICS_JSON,
    BagReport,
    BatchError,
    atomic_path,
    completed,
    find_bags,
    mark_done,
    plan_jobs,
)
from bevfusion_ros.batch.progress import FleetProgress
from bevfusion_ros.batch.ray_runner import RayOptions, worker_count
from bevfusion_ros.batch.settings import EvalOptions, load_settings, parse_parameter
from bevfusion_ros.config import ConfigError, load_config
from bevfusion_ros.streaming.node_config import NodeConfig

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "tiny-synthetic"


def touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ settings
def test_settings_are_the_nodes_from_its_parameter_file_and_overrides(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": {
        "node": {"num_sweeps": 3, "lidar_topic": "/points", "sync": {"slop_s": 0.05}},
        "head": {"score_threshold": 0.3}}}}))
    settings = load_settings(MODEL, [REPO / "config" / "nuscenes.yaml", params],
                             {"node.num_sweeps": 1, "node.time_lag_field": "time_lag"})
    model = load_config(MODEL / "bevfusion.yaml")
    assert settings.model_dir == MODEL.resolve() and settings.node.model_dir == str(MODEL.resolve())
    assert settings.config.image == model.image and settings.config.head.score_threshold == 0.3
    assert (settings.node.num_sweeps, settings.node.time_lag_field) == (1, "time_lag")   # overrides win
    assert settings.node.lidar_topic == "/points" and settings.node.sync.slop_s == 0.05  # later file wins
    assert settings.node.sync.wait_timeout_s == NodeConfig().sync.wait_timeout_s
    assert settings.markers is True and settings.evaluation is None


def test_eval_runs_at_score_threshold_zero_unless_given():
    evaluation = EvalOptions()
    assert load_settings(MODEL, [], {}, evaluation=evaluation).config.head.score_threshold == 0.0
    given = load_settings(MODEL, [], {"head.score_threshold": 0.2}, evaluation=evaluation)
    assert given.config.head.score_threshold == 0.2
    assert load_settings(MODEL, [], {}).config.head.score_threshold == load_config(
        MODEL / "bevfusion.yaml").head.score_threshold


def test_bad_settings_are_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="voxelization.max_voxels"):            # the model's geometry wins
        load_settings(MODEL, [], {"voxelization.max_voxels": 1000})
    with pytest.raises(ConfigError, match="node.num_sweeps"):
        load_settings(MODEL, [], {"node.num_sweeps": 0})
    with pytest.raises(ConfigError, match="cannot read parameter file"):
        load_settings(MODEL, [tmp_path / "absent.yaml"], {})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(tmp_path / "no-model", [], {})


def test_fingerprint_changes_with_what_outputs_depend_on():
    base = load_settings(MODEL, [], {})
    assert base.fingerprint() == load_settings(MODEL, [], {}).fingerprint()
    for other in (load_settings(MODEL, [], {"node.num_sweeps": 1}), load_settings(MODEL, [], {}, markers=False),
                  load_settings(MODEL, [], {}, evaluation=EvalOptions())):
        assert other.fingerprint() != base.fingerprint()


@pytest.mark.parametrize("text, expected", [("node.num_sweeps=1", ("node.num_sweeps", 1)),
                                            ("node.sync.slop_s:=0.05", ("node.sync.slop_s", 0.05)),
                                            ("node.lidar_topic=/points", ("node.lidar_topic", "/points")),
                                            ("node.compressed_images=true", ("node.compressed_images", True))])
def test_parameters_parse_like_ros(text, expected):
    assert parse_parameter(text) == expected


def test_a_parameter_without_a_value_is_refused():
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_parameter("node.num_sweeps")


# ------------------------------------------------------------------------------ bags and outputs
def test_bags_are_found_and_named_by_their_place(tmp_path):
    one = touch(tmp_path / "single.mcap")
    touch(tmp_path / "logs" / "a.mcap")
    touch(tmp_path / "logs" / "day2" / "a.mcap")
    touch(tmp_path / "logs" / "notes.txt")
    found = find_bags([one, tmp_path / "logs"])
    assert [(bag.relative_to(tmp_path).as_posix(), name) for bag, name, _ in found] == [
        ("single.mcap", "single"), ("logs/a.mcap", "a"), ("logs/day2/a.mcap", "day2__a")]
    assert all(files == (bag,) for bag, _, files in found)
    assert find_bags([one, one]) == [(one.resolve(), "single", (one.resolve(),))]   # given twice: once
    jobs = plan_jobs([tmp_path / "logs"], tmp_path / "out")
    assert [job.out_dir for job in jobs] == [(tmp_path / "out" / "bags" / name).resolve() for name in ("a", "day2__a")]


def rosbag2_folder(folder: Path, files: list[str]) -> Path:
    """A rosbag2 bag folder: ``metadata.yaml`` listing ``files`` (created, in that order)."""
    for name in files:
        touch(folder / name)
    touch(folder / "metadata.yaml", yaml.safe_dump({"rosbag2_bagfile_information": {
        "version": 9, "storage_identifier": "mcap", "relative_file_paths": files}}))
    return folder


def test_a_rosbag2_folder_is_one_bag_of_its_files_in_recording_order(tmp_path):
    """Given itself or found under a folder, a bag folder is one bag named by the folder, its
    files in metadata.yaml's order (not the names' order); .mcap files beside it stay bags."""
    split = rosbag2_folder(tmp_path / "logs" / "drive", ["drive_10.mcap", "drive_9.mcap"])
    touch(tmp_path / "logs" / "loose.mcap")
    files = (split / "drive_10.mcap", split / "drive_9.mcap")
    assert find_bags([split]) == [(split.resolve(), "drive", tuple(path.resolve() for path in files))]
    found = find_bags([tmp_path / "logs"])
    assert [(name, [path.name for path in bag_files]) for _, name, bag_files in found] == [
        ("drive", ["drive_10.mcap", "drive_9.mcap"]), ("loose", ["loose.mcap"])]
    (job, _) = plan_jobs([tmp_path / "logs"], tmp_path / "out")
    assert job.bag == split.resolve() and job.files == tuple(path.resolve() for path in files)


def test_unusable_bag_folders_are_refused(tmp_path):
    missing = rosbag2_folder(tmp_path / "a", ["drive_0.mcap", "drive_1.mcap"])
    (missing / "drive_1.mcap").unlink()
    with pytest.raises(BatchError, match="drive_1.mcap is missing"):
        find_bags([missing])
    with pytest.raises(BatchError, match="drive_0.db3 is not an .mcap file"):
        find_bags([rosbag2_folder(tmp_path / "b", ["drive_0.db3"])])
    with pytest.raises(BatchError, match="relative_file_paths"):
        find_bags([touch(tmp_path / "c" / "metadata.yaml", "rosbag2_bagfile_information: {}").parent])


def test_unusable_bag_arguments_are_refused(tmp_path):
    with pytest.raises(BatchError, match="does not exist"):
        find_bags([tmp_path / "absent.mcap"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BatchError, match="holds no .mcap"):
        find_bags([tmp_path / "empty"])
    with pytest.raises(BatchError, match="same output name: a"):
        find_bags([touch(tmp_path / "x" / "a.mcap"), touch(tmp_path / "y" / "a.mcap")])


def test_atomic_path_renames_on_success_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "sub" / "file.json"
    with atomic_path(target) as temporary:
        temporary.write_text("one")
        assert not target.exists()
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("two")
            raise RuntimeError("interrupted")
    assert target.read_text() == "one" and sorted(p.name for p in target.parent.iterdir()) == ["file.json"]


def test_a_bag_is_complete_only_with_its_marker_fingerprint_bag_and_files(tmp_path):
    (job,) = plan_jobs([touch(tmp_path / "drive.mcap", "bag bytes")], tmp_path / "out")
    report = BagReport(job.name, str(job.bag), frames=3, problems=["sweep dropped"])
    assert completed(job, "f1", evaluation=False) is None                     # no marker
    for name in (DETECTIONS_BAG, DETECTIONS_JSON):
        touch(job.path(name))
    mark_done(job, report, "f1")
    assert completed(job, "f1", evaluation=False) == report
    assert completed(job, "f2", evaluation=False) is None                     # other settings
    assert completed(job, "f1", evaluation=True) is None                      # metrics.json missing
    touch(job.path(METRICS_JSON))
    assert completed(job, "f1", evaluation=True) == report
    job.path(DETECTIONS_JSON).unlink()
    assert completed(job, "f1", evaluation=True) is None                      # an output missing
    touch(job.path(DETECTIONS_JSON))
    job.bag.write_text("the bag was replaced")
    assert completed(job, "f1", evaluation=True) is None                      # another bag file
    job.path("done.json").write_text("{broken")
    assert completed(job, "f1", evaluation=True) is None
    assert json.loads(json.dumps(report.to_dict()))["problems"] == ["sweep dropped"]


# ------------------------------------------------------------------------------ progress, workers
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fleet_progress_counts_rate_and_eta():
    clock = FakeClock()
    progress = FleetProgress(bags_total=4, frames_total=12, skipped=1, clock=clock)
    assert progress.eta_s() is None and progress.line().endswith("0.00 frames/s, ETA ?")
    clock.now += 10.0
    progress.update({"a": 3, "b": 2})
    progress.update({"a": 4})                     # a bag's count so far replaces its earlier one
    progress.bag_finished(ok=True)
    progress.bag_finished(ok=False)
    assert progress.frames_done == 6 and progress.rate() == pytest.approx(0.6)
    assert progress.eta_s() == pytest.approx(6 / 0.6)
    assert progress.line() == "bags 2/4 done (1 skipped, 1 failed), frames 6/12, 0.60 frames/s, ETA 10 s"
    progress.restart()
    clock.now += 2.0
    assert progress.rate() == pytest.approx(3.0)
    assert FleetProgress(1, None, clock=clock).line() == "bags 0/1 done, frames 0/?, 0.00 frames/s, ETA ?"


@pytest.mark.parametrize("options, resources, jobs, expected", [
    (RayOptions(workers=3), {"CPU": 1.0}, 10, 3),                     # as asked (Ray queues them)
    (RayOptions(workers=3), {"CPU": 8.0}, 2, 2),                      # never more than bags
    (RayOptions(), {"CPU": 7.0}, 10, 7),
    (RayOptions(cpus_per_worker=2.0), {"CPU": 7.0}, 10, 3),
    (RayOptions(gpus_per_worker=1.0), {"CPU": 16.0, "GPU": 2.0}, 10, 2),
    (RayOptions(gpus_per_worker=0.5, cpus_per_worker=4.0), {"CPU": 16.0, "GPU": 4.0}, 10, 4),
])
def test_worker_count(options, resources, jobs, expected):
    assert worker_count(options, resources, jobs) == expected


def test_no_worker_fits_a_cluster_without_gpus():
    with pytest.raises(BatchError, match="0 GPUs"):
        worker_count(RayOptions(gpus_per_worker=1.0), {"CPU": 16.0}, 4)
