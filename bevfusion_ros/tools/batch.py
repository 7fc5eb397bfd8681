"""``bevfusion-batch``: re-run the detector over many bags at once, on Ray.

    bevfusion-batch --model DIR --bags BAG_OR_FOLDER... --out DIR [--address ray://HEAD:10001 | auto]
                    [--workers N] [--cpus-per-worker C] [--gpus-per-worker G] [--prefetch FRAMES]
                    [--backend B]
                    [--params FILE]... [--param NAME=VALUE]... [--time-lag-field F] [--num-sweeps N]
                    [--compressed] [--score-threshold S] [--no-markers]
                    [--eval] [--class-range M|nuscenes] [--keep-empty-gt] [--rerun]

Each bag (``.mcap`` file, or rosbag2 bag folder of split files) is read as ``bevfusion_node``
would read it with the same parameter files and run through the pipeline by one of the Ray
workers; its outputs go to ``OUT/bags/<name>/``, the run's summary to ``OUT/batch.json`` and,
with ``--eval``, the pooled metrics to ``OUT/metrics.json``. Options, outputs, resuming and clusters: docs/batch.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bevfusion_ros.batch.outputs import BagJob, BagReport, BatchError, completed, plan_jobs, write_json
from bevfusion_ros.batch.progress import FleetProgress
from bevfusion_ros.batch.ray_runner import RayOptions, run_jobs
from bevfusion_ros.batch.settings import BatchSettings, EvalOptions, load_settings, parse_parameter
from bevfusion_ros.engines.select import BACKENDS, GPU_BACKENDS
from bevfusion_ros.tools.cli import run_reporting_errors
from bevfusion_ros.tools.eval import parse_class_range

SUMMARY_FILE = "batch.json"
POOLED_METRICS_FILE = "metrics.json"


def parameter_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted parameter names from ``--param`` and the named options (these win)."""
    overrides = dict(args.param)
    named = {"node.time_lag_field": args.time_lag_field, "node.num_sweeps": args.num_sweeps,
             "node.compressed_images": True if args.compressed else None,
             "head.score_threshold": args.score_threshold, "node.backend": args.backend,
             "node.precision": args.precision}
    overrides.update((name, value) for name, value in named.items() if value is not None)
    return overrides


def build_settings(args: argparse.Namespace) -> BatchSettings:
    evaluation = EvalOptions(args.class_range, args.keep_empty_gt) if args.eval else None
    threads = max(1, int(args.cpus_per_worker))
    return load_settings(args.model, args.params, parameter_overrides(args), threads,
                         False if args.no_markers else None, evaluation, args.prefetch)


def ray_options(args: argparse.Namespace, settings: BatchSettings) -> RayOptions:
    """Ray's side; ``--gpus-per-worker`` defaults to 1 for the GPU backends, else 0."""
    gpus = args.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if settings.backend in GPU_BACKENDS else 0.0
    if settings.backend in GPU_BACKENDS and gpus <= 0:
        raise BatchError(f"backend {settings.backend} needs a GPU per worker: --gpus-per-worker > 0")
    return RayOptions(args.address, args.workers, args.cpus_per_worker, gpus, args.ray_temp_dir,
                      args.progress_every)


def split_done(jobs: list[BagJob], settings: BatchSettings, rerun: bool) -> tuple[list[BagJob], list[BagReport]]:
    """(jobs to run, reports of the bags an earlier run completed with these settings)."""
    if rerun:
        return jobs, []
    fingerprint, evaluation = settings.fingerprint(), settings.evaluation is not None
    to_run, skipped = [], []
    for job in jobs:
        report = completed(job, fingerprint, evaluation)
        if report is None:
            to_run.append(job)
        else:
            report.status = "skipped"
            skipped.append(report)
    return to_run, skipped


def frames_in(jobs: list[BagJob], lidar_topic: str) -> int | None:
    """Lidar messages in the bags (from their summaries): the frames to expect; None when a bag
    cannot tell (e.g. a damaged one)."""
    from bevfusion_ros.ros.bag import BagError, bag_summary
    total = 0
    for job in jobs:
        try:
            total += sum(bag_summary(path).get(lidar_topic, ("", 0))[1] for path in job.files)
        except BagError:
            return None
    return total


def pooled_metrics(jobs: list[BagJob], reports: list[BagReport], settings: BatchSettings) -> Any:
    """The metrics of every complete bag's frames together (None: no bag has ground truth)."""
    from bevfusion_ros.batch import scoring
    from bevfusion_ros.batch.outputs import DETECTIONS_JSON
    from bevfusion_ros.ros.bag_inference import bag_truths
    options, class_names = settings.evaluation, settings.config.head.class_names
    complete = {report.name for report in reports if report.status != "failed"}
    pooled = scoring.EvalPairs()
    for job in jobs:
        if job.name in complete:
            truths, _ = bag_truths(job.files)
            detections = scoring.read_detections(job.path(DETECTIONS_JSON))
            pooled.extend(scoring.pair_with_truth(detections, truths, class_names, options.keep_empty_gt))
    if not pooled.ground_truth:
        return None, pooled
    return scoring.metrics(pooled, class_names, options), pooled


def report_table(reports: list[BagReport]) -> str:
    lines = [f"{'bag':<32}{'status':>9}{'frames':>8}{'seconds':>9}{'problems':>10}{'mAP':>8}"]
    for report in reports:
        mean_ap = "-" if report.mean_ap is None else f"{report.mean_ap:.3f}"
        lines.append(f"{report.name[:31]:<32}{report.status:>9}{report.frames:>8}{report.seconds:>9.1f}"
                     f"{len(report.problems):>10}{mean_ap:>8}")
    failed = [report for report in reports if report.status == "failed"]
    if failed:
        lines.append("failed bags:")
        lines += [f"  {report.name} ({report.bag}), {report.attempts} attempts: {report.error}" for report in failed]
    return "\n".join(lines)


def finish(args: argparse.Namespace, jobs: list[BagJob], reports: list[BagReport], settings: BatchSettings,
           seconds: float, progress: FleetProgress) -> None:
    """Print the bags' table and the pooled metrics; write ``batch.json`` (and ``metrics.json``):
    ``frames_per_s`` over the whole command, ``frames_per_s_running`` once the workers were ready."""
    from bevfusion_ros.batch import scoring
    print(report_table(reports))
    frames = sum(report.frames for report in reports if report.status == "done")
    summary: dict[str, Any] = {"model": str(settings.model_dir), "backend": settings.backend,
                               "address": args.address or "embedded", "workers": args.workers,
                               "seconds": seconds, "frames_run": frames,
                               "frames_per_s": frames / seconds if seconds > 0 else None,
                               "frames_per_s_running": progress.rate() if frames else None,
                               "bags": [report.to_dict() for report in reports]}
    if settings.evaluation is not None:
        result, pairs = pooled_metrics(jobs, reports, settings)
        document = scoring.metrics_document(result, pairs, "" if result else "no bag has ground truth")
        write_json(args.out / POOLED_METRICS_FILE, document)
        summary["metrics"] = document["metrics"]
        print(result.format_table() if result else "no ground truth in any bag: no metrics")
    write_json(args.out / SUMMARY_FILE, summary)
    print(f"wrote {args.out / SUMMARY_FILE}")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    settings = build_settings(args)
    options = ray_options(args, settings)
    jobs = plan_jobs(args.bags, args.out)
    to_run, skipped = split_done(jobs, settings, args.rerun)
    print(f"{len(jobs)} bags: {len(to_run)} to run, {len(skipped)} complete from an earlier run; "
          f"model {settings.model_dir}, backend {settings.backend}", flush=True)
    progress = FleetProgress(len(jobs), frames_in(to_run, settings.node.lidar_topic), len(skipped))
    reports = run_jobs(to_run, settings, options, progress, lambda line: print(line, flush=True))
    by_name = {report.name: report for report in [*reports, *skipped]}
    ordered = [by_name[job.name] for job in jobs]
    finish(args, jobs, ordered, settings, time.perf_counter() - start, progress)
    return 1 if any(report.status == "failed" for report in ordered) else 0


def _run_reporting_batch_errors(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except BatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bevfusion-batch", description=__doc__.splitlines()[0].strip("`: "))
    parser.add_argument("--model", type=Path, required=True, help="CUDA-BEVFusion model folder")
    parser.add_argument("--bags", type=Path, nargs="+", required=True, metavar="BAG_OR_FOLDER",
                        help="rosbag2 MCAP files, rosbag2 bag folders (metadata.yaml: a split recording is "
                             "one bag), or folders searched for both")
    parser.add_argument("--out", type=Path, required=True, help="output folder (bags/<name>/, batch.json)")
    ray = parser.add_argument_group("Ray")
    ray.add_argument("--address", help="join this Ray cluster (auto, ray://HEAD:10001, HEAD:6379); "
                     "default: an embedded local instance on 127.0.0.1")
    ray.add_argument("--workers", type=int, help="workers, one pipeline each (default: as many as fit)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker, also its ONNX threads")
    ray.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default 1 for gpu/tensorrt, else 0)")
    ray.add_argument("--ray-temp-dir", type=Path, help="embedded instance: folder for its session files")
    ray.add_argument("--prefetch", type=int, default=2, metavar="FRAMES",
                     help="frames each worker reads ahead on a thread while its pipeline runs (0: none)")
    ray.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")
    node = parser.add_argument_group("reading the bags as the node would (its parameters)")
    node.add_argument("--params", type=Path, action="append", default=[], metavar="FILE",
                      help="the node's parameter YAML (e.g. config/nuscenes.yaml), repeatable, later wins")
    node.add_argument("--param", type=parse_parameter, action="append", default=[], metavar="NAME=VALUE",
                      help="one parameter, e.g. node.sync.slop_s=0.05 (value read as YAML)")
    node.add_argument("--time-lag-field", help="node.time_lag_field (e.g. time_lag for generated-scene bags)")
    node.add_argument("--num-sweeps", type=int, help="node.num_sweeps")
    node.add_argument("--compressed", action="store_true", help="node.compressed_images: true")
    node.add_argument("--score-threshold", type=float, help="head.score_threshold (--eval: default 0)")
    node.add_argument("--backend", choices=BACKENDS, help="node.backend (default: the parameters', auto)")
    node.add_argument("--precision", choices=("fp16", "fp32"), help="node.precision")
    node.add_argument("--no-markers", action="store_true", help="no /bevfusion/markers in the outputs")
    evaluation = parser.add_argument_group("evaluation (bags with ground truth: bevfusion-make-bag --seeds)")
    evaluation.add_argument("--eval", action="store_true", help="metrics per bag and pooled, as bevfusion-eval")
    evaluation.add_argument("--class-range", type=parse_class_range, default=50.0,
                            help="evaluation radius in m, or 'nuscenes' (default 50)")
    evaluation.add_argument("--keep-empty-gt", action="store_true", help="keep ground truth without lidar points")
    parser.add_argument("--rerun", action="store_true", help="run every bag, even those complete from an earlier run")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.cpus_per_worker <= 0 or (args.gpus_per_worker is not None and args.gpus_per_worker < 0):
        parser.error("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
    if args.progress_every <= 0:
        parser.error("--progress-every must be positive")
    args.out = args.out.resolve()
    return run_reporting_errors(_run_reporting_batch_errors, args)


if __name__ == "__main__":
    sys.exit(main())
