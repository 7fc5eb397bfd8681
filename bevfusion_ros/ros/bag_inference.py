"""One bag through the pipeline as the node would run it, its outputs written beside
(``bevfusion-batch``'s unit of work; one :class:`BagInference` per worker, one pipeline each).

Frames come from :class:`~bevfusion_ros.ros.bag_frames.BagFrames` (the node's edge conversions
and FrameAssembler, the node's calibration source and image decoder); each goes through
``pipeline.forward`` and out as the node publishes it: ``/bevfusion/detections``
(``serialize_detections``), ``/bevfusion/markers`` (``serialize_markers``, unless off) and
``/bevfusion/frame_info`` (``convert.frame_info``), all with the frame's lidar stamp as header
stamp and log time. A frame the pipeline refuses (``ValueError``/``LookupError``, as the node
skips it) is a problem of the bag; any other error fails the bag. File layout, atomic writes and
resuming: :mod:`bevfusion_ros.batch.outputs`.
"""
from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from std_msgs.msg import Header

from bevfusion_ros.analysis.ground_truth import GROUND_TRUTH_RECORD, GroundTruthError, truths_from_record
from bevfusion_ros.batch import scoring
from bevfusion_ros.batch.outputs import (
    DETECTIONS_BAG,
    DETECTIONS_JSON,
    DONE_FILE,
    METRICS_JSON,
    BagJob,
    BagReport,
    atomic_path,
    mark_done,
    write_json,
)
from bevfusion_ros.batch.settings import BatchSettings
from bevfusion_ros.camera.jpeg import ImageDecoder
from bevfusion_ros.detections import Detections
from bevfusion_ros.pipeline import BEVFusionPipeline
from bevfusion_ros.ros import convert
from bevfusion_ros.ros.bag import BagWriter, read_metadata
from bevfusion_ros.ros.bag_frames import BagFrames
from bevfusion_ros.ros.node_runner import DETECTIONS_TOPIC, FRAME_INFO_TOPIC, MARKERS_TOPIC
from bevfusion_ros.runtime.prefetch import prefetch
from bevfusion_ros.streaming.assembler import AssembledFrame, output_warnings, settings_calibration

DETECTIONS_TYPE = "vision_msgs/msg/Detection3DArray"
MARKERS_TYPE = "visualization_msgs/msg/MarkerArray"


@dataclass
class _BagRun:
    """What one bag's frames gave so far."""

    frames: list[dict[str, Any]] = field(default_factory=list)     # detections.json entries
    detections: list[Detections] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class BagInference:
    """The pipeline of ``settings`` (loaded once) and what runs one bag through it."""

    def __init__(self, settings: BatchSettings) -> None:
        self.settings = settings
        node = settings.node
        self.pipeline = BEVFusionPipeline.from_model_dir(settings.model_dir, settings.config, node.backend,
                                                         node.precision, settings.threads)
        self.decoder = ImageDecoder.for_pipeline(self.pipeline.device)[0] if node.compressed_images else None
        self.calibration = settings_calibration(node, settings.config)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, job: BagJob, on_frame: Callable[[], None] = lambda: None) -> BagReport:
        """Run ``job``'s bag, write its outputs and ``done.json``; returns its report. Errors
        (an unreadable bag, a failing backend) propagate and leave no output under a final name."""
        start = time.perf_counter()
        job.path(DONE_FILE).unlink(missing_ok=True)        # being redone: complete only once done again
        run = _BagRun()
        reader = BagFrames(job.files, self.settings.config, self.settings.node, self.calibration, self.decoder)
        with atomic_path(job.path(DETECTIONS_BAG)) as temporary, BagWriter(temporary) as writer:
            for assembled, read_ms in prefetch(reader, self.settings.prefetch_frames):
                self._frame(assembled, writer, run, read_ms)
                on_frame()
        run.problems[:0] = reader.problems
        report = BagReport(job.name, str(job.bag), frames=len(run.frames), problems=run.problems,
                           backend=self.pipeline.backend, worker=self.worker)
        write_json(job.path(DETECTIONS_JSON), {"bag": str(job.bag), "backend": self.pipeline.backend,
                                               "score_threshold": self.settings.config.head.score_threshold,
                                               "problems": run.problems, "frames": run.frames})
        if self.settings.evaluation is not None:
            self._evaluate(job, run.detections, report)
        report.seconds = time.perf_counter() - start
        mark_done(job, report, self.settings.fingerprint())
        return report

    def _frame(self, assembled: AssembledFrame, writer: BagWriter, run: _BagRun, read_ms: float) -> None:
        """One assembled frame: forward, then its outputs (or a problem when it is refused)."""
        stamp_ns = assembled.frame.lidar_stamp_ns
        if assembled.calibration_error:
            run.problems.append(assembled.calibration_error)
        start = time.perf_counter()
        try:
            detections = self.pipeline.forward(assembled.frame, assembled.cameras_used)
        except (ValueError, LookupError) as error:             # InputError is a ValueError
            run.problems.append(f"frame at {stamp_ns} ns skipped: {error}")
            return
        forward_ms = (time.perf_counter() - start) * 1e3
        warnings = output_warnings(assembled, detections.warnings)
        detections = Detections(detections.boxes, detections.class_names, stamp_ns, assembled.sweep.frame_id,
                                detections.stage_ms, detections.cameras_used, warnings)
        self._write(writer, detections, assembled.missing, {"read": read_ms, "forward": forward_ms})
        run.detections.append(detections)
        run.frames.append({**detections.to_dict(), "cameras_missing": dict(assembled.missing)})

    def _write(self, writer: BagWriter, detections: Detections, missing: dict[str, str],
               phase_ms: dict[str, float]) -> None:
        """The node's three outputs of one frame, stamped and logged at its lidar stamp."""
        start = time.perf_counter()
        stamp_ns = detections.stamp_ns
        header = Header(stamp=convert.ns_to_stamp(stamp_ns), frame_id=detections.frame_id)
        writer.write_serialized(DETECTIONS_TOPIC, DETECTIONS_TYPE, convert.serialize_detections(detections, header),
                                stamp_ns)
        if self.settings.markers:
            writer.write_serialized(MARKERS_TOPIC, MARKERS_TYPE, convert.serialize_markers(detections, header),
                                    stamp_ns)
        phase_ms = {**phase_ms, "outputs": (time.perf_counter() - start) * 1e3}
        info = convert.frame_info(header, detections, missing, self.pipeline.backend, sum(phase_ms.values()),
                                  detections.warnings, phase_ms)
        writer.write(FRAME_INFO_TOPIC, info, stamp_ns)

    def _evaluate(self, job: BagJob, detections: list[Detections], report: BagReport) -> None:
        """``metrics.json`` of the bag against its ground truth (none: the reason instead)."""
        options = self.settings.evaluation
        truths, reason = bag_truths(job.files)
        class_names = self.settings.config.head.class_names
        pairs = scoring.pair_with_truth(detections, truths, class_names, options.keep_empty_gt)
        result = scoring.metrics(pairs, class_names, options) if truths else None
        report.ground_truth = bool(truths)
        report.mean_ap = None if result is None or math.isnan(result.mean_ap) else result.mean_ap
        write_json(job.path(METRICS_JSON), scoring.metrics_document(result, pairs, reason))


def bag_truths(files: Sequence[Path]) -> tuple[dict, str]:
    """({lidar stamp: FrameTruth}, '') of a bag (its MCAP files) with a ground-truth record (the
    first file's that has one), else ({}, why not)."""
    record = next(filter(None, (read_metadata(path, GROUND_TRUTH_RECORD) for path in files)), None)
    if record is None:
        return {}, (f"the bag has no ground truth (no '{GROUND_TRUTH_RECORD}' metadata record: "
                    "bevfusion-make-bag --seeds writes one)")
    try:
        return truths_from_record(record), ""
    except GroundTruthError as error:
        return {}, f"the bag's ground truth is unreadable: {error}"
