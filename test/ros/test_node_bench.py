"""bevfusion-bench --through-node on the CPU: the tiny model fed over ROS 2 by the benchmark's
publisher process; every published frame is accounted for, the phases add up to less than the
latency, and the node's boxes equal the library path's on the same frame."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bevfusion_ros.ros.node_bench import (
    PHASE_ORDER,
    Answer,
    NodeBenchOptions,
    analyze_window,
    format_report,
    run_node_bench,
)
from bevfusion_ros.sim.scene import generate_scene, write_example_folder

TINY_MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-synthetic"


def test_window_figures_from_published_and_answered_frames():
    frames = [{"stamp_ns": k, "images_ns": 1000 * k, "cloud_ns": 1000 * k + 500, "lag_ms": 0.0} for k in range(10)]
    frames[3]["lag_ms"] = 200.0                       # published more than one period (100 ms) late
    answers = {k: Answer(received_ns=1000 * k + 500 + (k + 1) * 1_000_000, boxes=k) for k in range(10) if k != 4}
    infos = {k: {"forward": 0.5 * (k + 1), "transport": 0.1} for k in answers}
    window = analyze_window(10.0, frames, answers, infos, cpu_percent=50.0)
    latency = [float(k + 1) for k in range(10) if k != 4]              # ms, cloud publish -> answer
    assert (window.published, window.answered, window.dropped, window.publisher_late) == (10, 9, 1, 1)
    assert window.latency_ms["p50"] == pytest.approx(np.percentile(latency, 50))
    assert window.latency_ms["p99"] == pytest.approx(np.percentile(latency, 99))
    assert window.latency_from_images_ms["max"] == pytest.approx(10.0005, abs=1e-3)
    assert window.overhead_ms["p50"] == pytest.approx(np.percentile([0.5 * v for v in latency], 50))
    assert set(window.phases_ms) == {"forward", "transport"} and window.boxes == 9


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    return write_example_folder(generate_scene(3), tmp_path_factory.mktemp("scene"))


@pytest.mark.parametrize("compressed", [False, True])
def test_tiny_model_through_the_node(scene_dir, tmp_path, compressed):
    options = NodeBenchOptions(model_dir=TINY_MODEL, data_dir=scene_dir, out_dir=tmp_path, backend="cpu",
                               rates_hz=(1.0,), duration_s=4.0, warmup_s=1.0, compressed=compressed,
                               check_boxes=True, startup_timeout_s=120.0, input_qos="reliable")
    report = run_node_bench(options)
    window, = report.windows
    assert report.node_exit_code == 0 and not report.traceback_in_log
    assert window.published == 4 and window.answered >= 1
    assert window.answered + window.dropped == window.published
    total = len((tmp_path / "published.jsonl").read_text().splitlines())
    counters = {key: int(value) for key, value in report.node_counters.items() if key.startswith("frames_")}
    assert counters["frames_in"] == total                      # nothing lost on the way in
    assert counters["frames_in"] == counters["frames_out"] + counters["frames_dropped"] + counters["frames_failed"]
    assert set(PHASE_ORDER) <= set(window.phases_ms)
    assert window.latency_ms["p50"] > window.phases_ms["forward"]["p50"]
    assert window.overhead_ms["p50"] > 0 and window.node_cpu_percent is not None
    check = report.box_check
    assert check["node_boxes"] == check["library_boxes"] > 0 and check["paired_within_1mm"] == 1.0
    assert check["max_difference"] < 1e-3
    assert "publish -> detections" in format_report(report)
