"""``bevfusion-eval``: nuScenes-style detection metrics of a model on held-out scenes.

    bevfusion-eval --model DIR --seeds A:B [--objects N] [--rig RIG.yaml] [--cameras NAME,...]
                   [--backend cpu|gpu|tensorrt|auto]
                   [--precision fp16|fp32] [--config YAML] [--class-range M|nuscenes]
                   [--keep-empty-gt] [--progress-every N] [--workers N] [--json OUT]
    bevfusion-eval --model DIR --data DIR ...
    bevfusion-eval --model DIR --seeds A:B --through-node [--node-out DIR] ...

``--seeds`` scenes are rendered for the cameras of ``--rig`` / ``--cameras`` (default the
synthetic nuScenes rig: a model exported for another rig needs its rig here).
The pipeline (with ``--through-node``: ``bevfusion_node``, fed a bag of the scenes) runs every
frame with ``head.score_threshold`` 0, then :func:`bevfusion_ros.analysis.evaluation.evaluate`
computes the metrics. The scenes, ground-truth filtering, ``--through-node`` and the JSON
output: docs/evaluation.md, "bevfusion-eval".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from bevfusion_ros.analysis.evaluation import NUSCENES_CLASS_RANGE, count_points_in_boxes, evaluate
from bevfusion_ros.config import ConfigError, PipelineConfig, load_config
from bevfusion_ros.engines.select import BACKENDS
from bevfusion_ros.io import FrameError, load_example_data
from bevfusion_ros.io.frame import Frame
from bevfusion_ros.io.tensor import read_tensor
from bevfusion_ros.pipeline import BEVFusionPipeline
from bevfusion_ros.sim.rig import add_rig_options, select_rig
from bevfusion_ros.tools.cli import run_reporting_errors

if TYPE_CHECKING:
    from bevfusion_ros.io.rig import Rig
    from bevfusion_ros.sim.scene import Scene

GT_FILES = ("gt_bboxes_3d.tensor", "gt_labels_3d.tensor")


@dataclasses.dataclass
class EvalFrame:
    """One frame to evaluate: the sensor data and its ground truth."""

    name: str
    frame: Frame
    gt_boxes: np.ndarray           # [M, 9] CUDA layout
    gt_labels: np.ndarray          # [M]
    num_points: np.ndarray | None  # [M] lidar points per box, None: unknown


def parse_seeds(text: str) -> range:
    """``A:B`` -> range(A, B) (B exclusive); ``S`` -> range(S, S + 1)."""
    try:
        if ":" in text:
            start, stop = (int(part) for part in text.split(":"))
        else:
            start = int(text)
            stop = start + 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be A:B or S (integers), got {text!r}") from None
    if stop <= start:
        raise argparse.ArgumentTypeError(f"empty seed range {text!r} (A:B means A .. B-1)")
    return range(start, stop)


def parse_class_range(text: str) -> float | dict[str, float]:
    """A radius in metres for every class, or ``nuscenes`` for nuScenes' per-class ranges."""
    if text == "nuscenes":
        return dict(NUSCENES_CLASS_RANGE)
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"class range must be metres or 'nuscenes', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("class range must be positive")
    return value


def scene_ground_truth(scene: Scene, keep_empty: bool = False
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(boxes [M, 9], labels [M], lidar hits per box [M] or None with ``keep_empty``) of a
    generated scene, what :func:`bevfusion_ros.analysis.evaluation.evaluate` takes per frame."""
    from bevfusion_ros.analysis.ground_truth import FrameTruth
    return FrameTruth.of_scene(scene).for_eval(keep_empty)


def _synthetic_frame(task: tuple[int, int | None, bool, Rig | None]) -> EvalFrame:
    from bevfusion_ros.sim.rig import select_rig
    from bevfusion_ros.sim.scene import generate_scene
    seed, num_objects, keep_empty, rig = task
    scene = generate_scene(seed, num_objects, rig=select_rig(rig))
    return EvalFrame(f"seed {seed}", scene.to_frame(), *scene_ground_truth(scene, keep_empty))


def synthetic_frames(seeds: range, num_objects: int | None, keep_empty: bool,
                     workers: int = 0, rig: Rig | None = None) -> Iterator[EvalFrame]:
    """The scenes of ``seeds`` in seed order, of ``rig``'s cameras (default the synthetic
    nuScenes rig); ``workers`` > 0 generates them in that many processes (a few scenes ahead
    of the pipeline)."""
    tasks = [(seed, num_objects, keep_empty, rig) for seed in seeds]
    if workers <= 0:
        yield from map(_synthetic_frame, tasks)
        return
    context = multiprocessing.get_context("spawn")     # no fork of a process holding CUDA
    with context.Pool(workers) as pool:
        yield from pool.imap(_synthetic_frame, tasks, chunksize=1)


def data_folders(root: Path) -> list[Path]:
    """``root`` itself when it is an example-data folder, else its example-data sub-folders."""
    if not root.is_dir():
        raise FrameError(f"data folder {root} does not exist")
    if (root / "points.tensor").is_file():
        return [root]
    folders = sorted(path for path in root.iterdir() if (path / "points.tensor").is_file())
    if not folders:
        raise FrameError(f"{root} holds no example-data folders (sub-folders with points.tensor)")
    return folders


def folder_frames(folders: list[Path], camera_names, keep_empty: bool) -> Iterator[EvalFrame]:
    for folder in folders:
        missing = [name for name in GT_FILES if not (folder / name).is_file()]
        if missing:
            raise FrameError(f"{folder}: missing {', '.join(missing)}")
        frame = load_example_data(folder, camera_names)
        boxes = read_tensor(folder / GT_FILES[0]).astype(np.float32).reshape(-1, 9)
        labels = read_tensor(folder / GT_FILES[1]).astype(np.int64).reshape(-1)
        counts = None if keep_empty else count_points_in_boxes(frame.points, boxes)
        yield EvalFrame(folder.name, frame, boxes, labels, counts)


def for_model(frame: Frame, config: PipelineConfig) -> Frame:
    """``frame`` with its calibration rebuilt from K and camera2lidar for the model's image
    pre-processing (its ``img_aug_matrix``), as the ROS node builds it: a scene written for one
    input resolution stays valid for a preset that resizes differently (e.g. tiny)."""
    return dataclasses.replace(frame, calibration=frame.calibration.for_image(config.image))


@dataclasses.dataclass
class Evaluated:
    """What a run produced: per frame the predictions, ground truth and name."""

    predictions: list = dataclasses.field(default_factory=list)
    ground_truth: list = dataclasses.field(default_factory=list)
    names: list[str] = dataclasses.field(default_factory=list)
    backend: str = ""
    weights_note: str = ""
    class_names: tuple[str, ...] = ()
    trained: bool | None = None


def _progress(index: int, total: int, every: int, name: str, gt: int, predictions: int,
              seconds: float) -> None:
    if index % every == 0 or index == total:
        print(f"  [{index}/{total}] {name}: {gt} GT, {predictions} predictions; "
              f"{seconds / index:.2f} s/frame", flush=True)


def run_pipeline(args: argparse.Namespace) -> Evaluated:
    """The deploy pipeline in this process over every frame."""
    start = time.perf_counter()
    config = load_config(args.config) if args.config else None
    if config is None:
        config = load_config(args.model / "bevfusion.yaml") if (args.model / "bevfusion.yaml").is_file() else None
    if config is not None:
        config = dataclasses.replace(config, head=dataclasses.replace(config.head, score_threshold=0.0)).validate()
    pipeline = BEVFusionPipeline.from_model_dir(args.model, config, backend=args.backend,
                                                precision=args.precision)
    config = pipeline.config
    if args.data is not None:
        folders = data_folders(args.data)
        total = len(folders)
        frames = folder_frames(folders, config.camera_names, args.keep_empty_gt)
    else:
        total = len(args.seeds)
        frames = synthetic_frames(args.seeds, args.objects, args.keep_empty_gt, args.workers, args.scene_rig)
    print(f"loaded model {args.model} ({pipeline.backend}, {args.precision}) in "
          f"{time.perf_counter() - start:.1f} s; evaluating {total} frames", flush=True)
    out = Evaluated(backend=pipeline.backend, weights_note=pipeline.weights_note,
                    class_names=config.head.class_names, trained=pipeline.trained)
    run_start = time.perf_counter()
    for index, item in enumerate(frames, 1):
        detections = pipeline.forward(for_model(item.frame, config))
        out.predictions.append(detections)
        out.ground_truth.append((item.gt_boxes, item.gt_labels, item.num_points))
        out.names.append(item.name)
        _progress(index, total, args.progress_every, item.name, len(item.gt_boxes), len(detections),
                  time.perf_counter() - run_start)
    return out


def run_through_node(args: argparse.Namespace) -> Evaluated:
    """The scenes as a bag (raw images, 10 Hz), replayed frame by frame into ``bevfusion_node``
    (a child process); the predictions are its published Detection3DArray boxes."""
    from bevfusion_ros.pipeline import model_info, weights_note
    from bevfusion_ros.ros.node_runner import replay_through_node
    from bevfusion_ros.tools.make_bag import scene_stamp_ns, write_frames_bag
    info = model_info(args.model)
    out = Evaluated(weights_note=weights_note(info), trained=info.get("trained"))

    def frames() -> Iterator[Frame]:
        for item in synthetic_frames(args.seeds, args.objects, args.keep_empty_gt, args.workers, args.scene_rig):
            out.ground_truth.append((item.gt_boxes, item.gt_labels, item.num_points))
            out.names.append(item.name)
            yield item.frame

    with tempfile.TemporaryDirectory(prefix="bevfusion-eval-bag-") as folder:
        bag = Path(folder) / "scenes.mcap"
        print(f"writing {len(args.seeds)} scenes into {bag}", flush=True)
        write_frames_bag(frames(), bag, progress=lambda line: print(line, flush=True))
        replay = replay_through_node(args.model, bag, args.node_out, args.backend, lockstep=True,
                                     score_threshold=0.0, log=lambda line: print(line, flush=True))
    stamps = [scene_stamp_ns(index) for index in range(len(out.names))]
    out.predictions, out.class_names = replay.in_order(stamps), replay.class_names
    answered = len(set(stamps) & replay.detections.keys())
    backends = {frame_info.backend for frame_info in replay.frame_infos.values()}
    out.backend = f"bevfusion_node ({', '.join(sorted(backends))})"
    print(f"node answered {answered} of {len(out.names)} frames in "
          f"{replay.seconds:.0f} s (outputs in {args.node_out})", flush=True)
    return out


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    evaluated = run_through_node(args) if args.through_node else run_pipeline(args)
    result = evaluate(evaluated.predictions, evaluated.ground_truth, evaluated.class_names,
                      class_range=args.class_range)
    print(result.format_table())
    if evaluated.weights_note:
        print(f"note: {evaluated.weights_note}" + ("; expect a mAP near 0" if evaluated.trained is False else ""))
    if args.json:
        document = {"model": str(args.model), "backend": evaluated.backend, "precision": args.precision,
                    "trained": evaluated.trained, "weights": evaluated.weights_note,
                    "through_node": args.through_node,
                    "source": {"data": str(args.data)} if args.data is not None
                    else {"seeds": [args.seeds.start, args.seeds.stop], "objects": args.objects,
                          "rig": args.scene_rig.tag(), "cameras": list(args.scene_rig.camera_names)},
                    "frames": evaluated.names, "seconds": time.perf_counter() - start,
                    "metrics": result.to_dict()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=1))
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`: "))
    parser.add_argument("--model", type=Path, required=True, help="CUDA-BEVFusion model folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--seeds", type=parse_seeds,
                        help="synthetic scenes A:B (seeds A .. B-1) or one seed S")
    source.add_argument("--data", type=Path,
                        help="an example-data folder, or a folder of them, with gt_*.tensor")
    parser.add_argument("--objects", type=int, default=None,
                        help="objects per synthetic scene (default: 20-40, drawn from the seed)")
    add_rig_options(parser)
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="engine backend")
    parser.add_argument("--precision", default="fp16", choices=("fp16", "fp32"),
                        help="GPU precision (the CPU backend always computes float32)")
    parser.add_argument("--config", type=Path, help="parameter YAML (default: MODEL/bevfusion.yaml); "
                        "head.score_threshold is set to 0 either way")
    parser.add_argument("--class-range", type=parse_class_range, default=50.0,
                        help="evaluation radius around the lidar in metres for every class, or "
                             "'nuscenes' (50/40/30 m per class) (default: 50)")
    parser.add_argument("--keep-empty-gt", action="store_true",
                        help="keep ground-truth boxes without lidar points (nuScenes drops them)")
    parser.add_argument("--progress-every", type=int, default=10, help="progress line every N frames")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes generating synthetic scenes ahead of the pipeline (0: inline)")
    parser.add_argument("--json", type=Path, help="write the metrics as JSON here")
    parser.add_argument("--through-node", action="store_true",
                        help="synthetic scenes only: write them into a bag, replay it frame by frame "
                             "into bevfusion_node and evaluate the boxes it publishes")
    parser.add_argument("--node-out", type=Path, default=Path("out/eval-node"),
                        help="--through-node: the node's log, parameters and recorded outputs")
    args = parser.parse_args(argv)
    if args.objects is not None and args.objects < 0:
        parser.error("--objects must be >= 0")
    if args.progress_every <= 0:
        parser.error("--progress-every must be positive")
    if args.through_node and args.data is not None:
        parser.error("--through-node evaluates generated scenes (--seeds), not --data")
    if args.data is not None and (args.rig or args.cameras):
        parser.error("--rig and --cameras choose the cameras of generated scenes (--seeds), not of --data")
    try:
        args.scene_rig = select_rig(args.rig, args.cameras)
    except ConfigError as error:
        parser.error(str(error))
    return run_reporting_errors(run, args)


if __name__ == "__main__":
    sys.exit(main())
