"""``bevfusion-batch`` on an embedded Ray instance with 2 workers (one instance for the module):
4 bags of generated scenes (``bevfusion-make-bag --seeds``, 2 frames each): detections, pooled
metrics, a truncated bag, resuming, where Ray listens, and a driver joining it by ``--address``.

References: the sequential pipeline (the same bags read by ``BagFrames`` and run in this process,
frame by frame), ``bevfusion-eval`` on the same scenes, the bags' own files (truncated on
purpose), and the kernel's socket tables (``/proc/net/tcp*``) for where Ray listens.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from bevfusion_ros.batch.settings import EvalOptions, load_settings
from bevfusion_ros.ros.node_runner import DETECTIONS_TOPIC, FRAME_INFO_TOPIC, MARKERS_TOPIC

if importlib.util.find_spec("ray") is None:       # not imported here: embedded_ray configures it first
    pytest.skip("ray is not installed (the 'batch' extra)", allow_module_level=True)
pytest.importorskip("nuscenes.eval.detection.algo")

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "tiny-synthetic"
SEED_RANGES = ((100_000, 100_002), (100_002, 100_004), (100_004, 100_006), (100_006, 100_008))
BAG_NAMES = tuple(f"drive{index}" for index in range(len(SEED_RANGES)))
NODE_OPTIONS = ["--backend", "cpu", "--time-lag-field", "time_lag", "--num-sweeps", "1"]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def batch(*args: str | Path) -> int:
    from bevfusion_ros.tools import batch as batch_tool
    return batch_tool.main(["--model", str(MODEL), *NODE_OPTIONS, "--workers", "2", *map(str, args)])


def summary(out: Path) -> dict:
    return {bag["name"]: bag for bag in json.loads((out / "batch.json").read_text())["bags"]}


@pytest.fixture(scope="module")
def scenes():
    """The 8 scenes, generated once; ``generate_scene(seed)`` returns them for this module (it is
    deterministic: bevfusion-make-bag and bevfusion-eval would generate the very same)."""
    from bevfusion_ros.sim import scene as scene_module
    generate = scene_module.generate_scene
    cache = {seed: generate(seed) for start, stop in SEED_RANGES for seed in range(start, stop)}

    def cached(seed, *args, **kwargs):
        return cache[seed] if not args and not kwargs else generate(seed, *args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(scene_module, "generate_scene", cached)
    yield cache
    patch.undo()


@pytest.fixture(scope="module")
def bags(scenes, tmp_path_factory):
    from bevfusion_ros.tools import make_bag
    folder = tmp_path_factory.mktemp("bags")
    for name, (start, stop) in zip(BAG_NAMES, SEED_RANGES):
        assert make_bag.main(["--seeds", f"{start}:{stop}", "--out", str(folder / f"{name}.mcap")]) == 0
    return folder


@pytest.fixture(scope="module")
def ray_instance():
    from bevfusion_ros.batch.ray_runner import embedded_ray
    with embedded_ray(num_cpus=2) as ray:
        yield ray


@pytest.fixture(scope="module")
def first_run(ray_instance, bags, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch") / "out"
    return out, batch("--bags", bags, "--out", out, "--eval")


def listening_addresses(root_pid: int) -> set[str]:
    """Local addresses of the TCP sockets listening in ``root_pid`` and its descendants."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    family, frontier = {root_pid}, [root_pid]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in family]
        family.update(children)
        frontier = children
    inodes = set()
    for pid in family:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        inodes.update(link[8:-1] for link in links if link.startswith("socket:["))
    addresses = set()
    for table, kind in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:                  # LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))   # host-order words
                addresses.add(socket.inet_ntop(kind, words))
    return addresses


def test_the_embedded_instance_listens_on_loopback_only(ray_instance):
    addresses = listening_addresses(os.getpid())
    assert addresses, "no listening socket found: the check would prove nothing"
    assert addresses <= LOOPBACK, addresses
    assert {node["NodeManagerAddress"] for node in ray_instance.nodes()} == {"127.0.0.1"}


def sequential(bag: Path) -> list:
    """The bag's frames read as the node would and run one by one in this process, with the
    workers' settings (one ONNX thread each)."""
    from bevfusion_ros.pipeline import BEVFusionPipeline
    from bevfusion_ros.ros.bag_frames import BagFrames
    settings = load_settings(MODEL, [], {"node.backend": "cpu", "node.time_lag_field": "time_lag",
                                         "node.num_sweeps": 1}, threads=1, evaluation=EvalOptions())
    pipeline = BEVFusionPipeline.from_model_dir(MODEL, settings.config, "cpu", threads=1)
    return [(assembled, pipeline.forward(assembled.frame, assembled.cameras_used))
            for assembled in BagFrames(bag, settings.config, settings.node)]


def test_detections_equal_the_sequential_pipeline_frame_for_frame(first_run, bags):
    from rclpy.serialization import deserialize_message
    from std_msgs.msg import Header
    from vision_msgs.msg import Detection3DArray

    from bevfusion_ros.batch.scoring import read_detections
    from bevfusion_ros.ros import convert
    from bevfusion_ros.ros.bag import read_bag
    out, code = first_run
    assert code == 0 and {bag["status"] for bag in summary(out).values()} == {"done"}
    for name in BAG_NAMES:
        expected = sequential(bags / f"{name}.mcap")
        assert len(expected) == 2
        got = read_detections(out / "bags" / name / "detections.json")
        recorded = out / "bags" / name / "detections.mcap"
        messages = [m.message for m in read_bag(recorded, [DETECTIONS_TOPIC])]
        infos = [m.message for m in read_bag(recorded, [FRAME_INFO_TOPIC])]
        assert len(got) == len(messages) == len(infos) == len(list(read_bag(recorded, [MARKERS_TOPIC]))) == 2
        for (assembled, reference), json_frame, message, info in zip(expected, got, messages, infos):
            stamp = assembled.frame.lidar_stamp_ns
            assert json_frame.stamp_ns == stamp and len(reference) == 50      # score threshold 0 (--eval)
            np.testing.assert_array_equal(json_frame.boxes, reference.boxes)
            header = Header(stamp=convert.ns_to_stamp(stamp), frame_id=assembled.sweep.frame_id)
            assert message == deserialize_message(convert.serialize_detections(reference, header), Detection3DArray)
            assert info.header == header and len(info.velocities) == len(reference)
            assert list(info.cameras_used) == list(reference.cameras_used) and info.warnings == []


def test_pooled_metrics_equal_bevfusion_eval_on_the_same_scenes(first_run, scenes, tmp_path):
    from bevfusion_ros.tools import eval as eval_tool
    out, _ = first_run
    seeds = f"{SEED_RANGES[0][0]}:{SEED_RANGES[-1][1]}"
    assert eval_tool.main(["--model", str(MODEL), "--seeds", seeds, "--backend", "cpu",
                           "--json", str(tmp_path / "eval.json")]) == 0
    reference = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    pooled = json.loads((out / "metrics.json").read_text())
    metrics = pooled["metrics"]
    assert pooled["frames_with_ground_truth"] == pooled["frames_answered"] == reference["num_frames"] == 8
    assert metrics["gt_counts"] == reference["gt_counts"] and metrics["filtered"] == reference["filtered"]
    assert metrics["mean_ap"] > 0.6                                          # the shipped weights detect
    assert metrics["mean_ap"] == pytest.approx(reference["mean_ap"], abs=1e-3)
    assert metrics["class_mean_ap"] == pytest.approx(reference["class_mean_ap"], abs=1e-3)
    per_bag = [json.loads((out / "bags" / name / "metrics.json").read_text())["metrics"] for name in BAG_NAMES]
    assert sum(bag["num_frames"] for bag in per_bag) == 8
    for label, count in reference["gt_counts"].items():
        assert sum(bag["gt_counts"][label] for bag in per_bag) == count
    assert summary(out)["drive0"]["mean_ap"] == per_bag[0]["mean_ap"]


def test_a_truncated_bag_is_reported_and_the_others_complete(ray_instance, bags, first_run, tmp_path, capsys):
    broken = tmp_path / "bags"
    shutil.copytree(bags, broken)
    data = (broken / "drive1.mcap").read_bytes()
    (broken / "drive1.mcap").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert batch("--bags", broken, "--out", out, "--score-threshold", "0.3") == 1
    bags_run = summary(out)
    assert bags_run["drive1"]["status"] == "failed" and bags_run["drive1"]["attempts"] == 2
    assert "not a readable MCAP file" in bags_run["drive1"]["error"]
    assert "drive1" in capsys.readouterr().out.split("failed bags:")[1]
    assert sorted(p.name for p in (out / "bags" / "drive1").glob("*")) == []     # nothing half-written
    threshold = np.float32(0.3)
    for name in ("drive0", "drive2", "drive3"):
        assert bags_run[name]["status"] == "done" and bags_run[name]["frames"] == 2
        got = [frame["boxes"] for frame in json.loads((out / "bags" / name / "detections.json").read_text())["frames"]]
        # The first run's boxes (score threshold 0 for --eval) scoring at least 0.3: the same boxes.
        first = json.loads((first_run[0] / "bags" / name / "detections.json").read_text())["frames"]
        assert got == [[box for box in frame["boxes"] if np.float32(box["score"]) >= threshold] for frame in first]
        assert all(got) and sum(map(len, got)) < sum(len(frame["boxes"]) for frame in first)


def test_a_resumed_run_skips_complete_bags(ray_instance, bags, first_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)
    (out / "bags" / "drive2" / "done.json").unlink()               # as if interrupted before its end
    kept = {name: (out / "bags" / name / "done.json").stat().st_mtime_ns for name in ("drive0", "drive1", "drive3")}
    assert batch("--bags", bags, "--out", out, "--eval") == 0
    assert "4 bags: 1 to run, 3 complete from an earlier run" in capsys.readouterr().out
    statuses = {name: bag["status"] for name, bag in summary(out).items()}
    assert statuses == {"drive0": "skipped", "drive1": "skipped", "drive2": "done", "drive3": "skipped"}
    assert kept == {name: (out / "bags" / name / "done.json").stat().st_mtime_ns for name in kept}
    again = json.loads((out / "bags" / "drive2" / "detections.json").read_text())["frames"]
    before = json.loads((first_run[0] / "bags" / "drive2" / "detections.json").read_text())["frames"]
    assert [frame["boxes"] for frame in again] == [frame["boxes"] for frame in before]
    assert (json.loads((out / "metrics.json").read_text())["metrics"]["mean_ap"]
            == json.loads((first_run[0] / "metrics.json").read_text())["metrics"]["mean_ap"])


def test_joins_a_running_cluster_at_its_address(ray_instance, bags, first_run, tmp_path):
    """``--address``: a driver in another process joins the running instance (as it would join
    a cluster's head) and its worker runs there."""
    import subprocess
    import sys
    address = ray_instance.get_runtime_context().gcs_address
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bevfusion_ros.tools.batch", "--model", str(MODEL), *NODE_OPTIONS,
               "--workers", "1", "--address", address, "--bags", str(bags / "drive3.mcap"), "--out", str(out),
               "--eval"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = json.loads((out / "batch.json").read_text())
    assert run["address"] == address and [bag["status"] for bag in run["bags"]] == ["done"]
    got = json.loads((out / "bags" / "drive3" / "detections.json").read_text())["frames"]
    first = json.loads((first_run[0] / "bags" / "drive3" / "detections.json").read_text())["frames"]
    assert [frame["boxes"] for frame in got] == [frame["boxes"] for frame in first]
