"""``bevfusion-train``: train a model-toolkit BEVFusion preset on synthetic scenes.

    bevfusion-train --preset tiny|nuscenes-r50 --scenes 0:N --epochs E --batch-size 1 --lr 1e-3
                    --device cpu|cuda [--amp] --out DIR [--resume DIR] [--export]
                    [--time-limit SECONDS | --stop-after STEPS]

(or ``python -m bevfusion_ros.tools.train ...``). Scenes are ``generate_scene(seed)`` for the
seeds of ``--scenes`` (``A:B``, ``:B`` or ``1,5,9``). Writes ``DIR/model.pt`` (state dict for
``bevfusion-export --checkpoint``), ``DIR/train_state.pt`` and ``DIR/train_log.jsonl`` after
every epoch; ``--export`` writes the ONNX model folder ``DIR/model``. See
:mod:`bevfusion_ros.train.loop` for the forward, schedule and determinism.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bevfusion_ros.model.presets import PRESETS, get_preset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--scenes", default="0:8", help="scene seeds: A:B, :B or a,b,c (default 0:8)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--schedule", choices=("onecycle", "cosine", "constant"), default="onecycle")
    parser.add_argument("--grad-clip", type=float, default=35.0, help="max gradient L2 norm")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision (fp16 + GradScaler on CUDA, bfloat16 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="model init, dropout and order seed")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--resume", type=Path, help="model.pt (or its folder) to continue from")
    parser.add_argument("--export", action="store_true", help="export the ONNX set to OUT/model")
    parser.add_argument("--export-precision", choices=("fp16", "int8"), default="fp16")
    parser.add_argument("--cache", type=Path, help="folder for preprocessed scenes (reused)")
    parser.add_argument("--memory-cache", action="store_true",
                        help="keep preprocessed scenes in RAM (small scene sets, --workers 0)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--rulebook-cache", type=int, default=16,
                        help="scenes whose sparse-conv rulebooks stay cached on the device")
    parser.add_argument("--precise-bn", type=int, default=8,
                        help="re-estimate BatchNorm statistics on this many scenes at the end "
                             "(0: keep the running averages)")
    parser.add_argument("--objects", type=int, default=None,
                        help="objects per scene (default: 20-40 drawn from the seed)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="shorten the run (and its learning-rate schedule) to this many steps")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="pause after this many steps in total, schedule unchanged "
                             "(continue with --resume OUT)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="pause after this many seconds (continue with --resume OUT)")
    parser.add_argument("--log-every", type=int, default=1, help="print every n-th step")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from bevfusion_ros.train.data import parse_scene_range
    from bevfusion_ros.train.loop import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    config = TrainConfig(
        preset=get_preset(args.preset), seeds=parse_scene_range(args.scenes), out_dir=args.out,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule, grad_clip=args.grad_clip,
        device=args.device, amp=args.amp, seed=args.seed, resume=args.resume, export=args.export,
        export_precision=args.export_precision, cache_dir=args.cache,
        memory_cache=args.memory_cache, workers=args.workers,
        rulebook_cache=args.rulebook_cache, precise_bn=args.precise_bn, num_objects=args.objects,
        max_steps=args.max_steps, stop_after=args.stop_after, time_limit=args.time_limit,
        log_every=args.log_every)
    result = train(config)
    if result.history:
        first, last = result.history[0]["loss"], result.history[-1]["loss"]
        print(f"done: {len(result.history)} steps, loss {first:.4f} -> {last:.4f}, "
              f"{result.seconds_per_step:.2f} s/step (median); checkpoint {result.checkpoint}"
              + (f"; model folder {result.export_dir}" if result.export_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
