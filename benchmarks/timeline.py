"""Where the GPU pipeline's end-to-end time goes: a CUPTI timeline (torch.profiler) of N forwards.

    python benchmarks/timeline.py MODEL_DIR EXAMPLE_DATA_DIR [--frames 20] [--trace out.json]

Per frame (the host window of one ``forward``): wall time, the time any GPU stream is busy (the
union of kernels, copies and memsets on all streams), the busy time per stream, and the idle
gaps of the GPU inside the window. Then the kernels ranked by GPU time per frame. CuPy's kernels
are seen too: CUPTI records every launch of the process. Medians over the profiled frames.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from bevfusion_ros.io import load_example_data
from bevfusion_ros.pipeline import BEVFusionPipeline

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
FRAME = "bevfusion_frame"


def busy_union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merged [start, end) intervals (microseconds), ascending."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def frame_report(window: tuple[float, float], events: list[dict]) -> dict:
    """Busy and idle figures of one frame window (host ts, ts + dur) over the GPU ``events``."""
    begin, finish = window
    inside = [(max(e["ts"], begin), min(e["ts"] + e["dur"], finish), e) for e in events
              if e["ts"] < finish and e["ts"] + e["dur"] > begin]
    union = busy_union([(start, end) for start, end, _ in inside])
    per_stream: dict = collections.defaultdict(list)
    for start, end, event in inside:
        per_stream[event.get("args", {}).get("stream", event.get("tid"))].append((start, end))
    gaps, cursor = [], begin
    for start, end in union:
        if start > cursor:
            gaps.append((cursor - begin, start - cursor))
        cursor = max(cursor, end)
    gaps.append((cursor - begin, finish - cursor))
    return {"wall_us": finish - begin, "busy_us": sum(end - start for start, end in union),
            "streams_us": {str(stream): sum(e - s for s, e in busy_union(spans))
                           for stream, spans in per_stream.items()},
            "gaps": sorted(gaps, key=lambda gap: -gap[1])[:8],
            "kernels": [(event["name"], end - start) for start, end, event in inside]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--trace", help="also keep the Chrome trace here")
    args = parser.parse_args()
    pipeline = BEVFusionPipeline.from_model_dir(args.model, backend="gpu", precision="fp16")
    frame = load_example_data(args.data)
    for _ in range(args.warmup):
        pipeline.forward(frame)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(args.frames):
            with torch.profiler.record_function(FRAME):
                pipeline.forward(frame)
    trace = Path(args.trace or tempfile.mktemp(suffix=".json"))
    profiler.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in events
               if e.get("name") == FRAME and e.get("cat") == "user_annotation"]
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES and "dur" in e]
    reports = [frame_report(window, gpu) for window in windows]
    walls = np.array([r["wall_us"] for r in reports]) / 1e3
    busy = np.array([r["busy_us"] for r in reports]) / 1e3
    print(f"{len(reports)} frames: wall median {np.median(walls):.3f} ms, GPU busy (any stream) "
          f"median {np.median(busy):.3f} ms, idle median {np.median(walls - busy):.3f} ms")
    typical = reports[int(np.argsort(walls)[len(walls) // 2])]
    print("median frame, busy per stream (ms):",
          {stream: round(us / 1e3, 3) for stream, us in typical["streams_us"].items()})
    print("median frame, largest idle gaps (offset ms, length ms):",
          [(round(at / 1e3, 3), round(length / 1e3, 3)) for at, length in typical["gaps"]])
    totals: dict = collections.Counter()
    counts: dict = collections.Counter()
    for report in reports:
        for name, us in report["kernels"]:
            totals[name[:90]] += us / len(reports)
            counts[name[:90]] += 1 / len(reports)
    print(f"launches per frame: {sum(counts.values()):.0f}; GPU time per frame by kernel (ms, count):")
    for name, us in totals.most_common(30):
        print(f"  {us / 1e3:7.3f}  {counts[name]:5.1f}  {name}")


if __name__ == "__main__":
    main()
