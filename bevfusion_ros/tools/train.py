"""``bevfusion-train``: train a model-toolkit BEVFusion preset on synthetic scenes.

    bevfusion-train --preset tiny|nuscenes-r50 --scenes 0:N --epochs E --batch-size 1 --lr 1e-3
                    --device cpu|cuda [--amp] --out DIR [--resume DIR] [--export]
                    [--rig RIG.yaml] [--cameras NAME,NAME,...]
                    [--time-limit SECONDS | --stop-after STEPS]

(or ``python -m bevfusion_ros.tools.train ...``). Scenes are ``generate_scene(seed, rig=rig)`` for
the seeds of ``--scenes`` (``A:B``, ``:B`` or ``1,5,9``) and the cameras of ``--rig`` (default
the synthetic nuScenes rig) / ``--cameras`` (some of them); the model is trained and exported
for that rig's camera count, names and image size. Writes ``DIR/model.pt`` (state dict for
``bevfusion-export --checkpoint``), ``DIR/train_state.pt`` and ``DIR/train_log.jsonl`` after
every epoch; ``--export`` writes the ONNX model folder ``DIR/model``. See
:mod:`bevfusion_ros.train.loop` for the forward, schedule and determinism.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bevfusion_ros.train.loop import TrainConfig


def _option_fields() -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of every TrainConfig field that is an option (imports torch)."""
    from bevfusion_ros.train.loop import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return [(field, hints[field.name]) for field in dataclasses.fields(TrainConfig)
            if field.metadata.get("cli", True)]


def _value_type(hint: Any) -> Any:
    """The type an option's text converts to: ``X`` of ``X | None``, else the hint itself."""
    types = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return types[0] if types else hint


def _add_option(parser: argparse.ArgumentParser, field: dataclasses.Field, hint: Any) -> None:
    """The option of one TrainConfig field (see the metadata keys in TrainConfig's docstring):
    a flag for a bool, else a value of the field's type, or text that ``parse`` converts later;
    the value is stored under the field's name, shown under the option's."""
    meta = field.metadata
    flag = meta.get("option", "--" + field.name.replace("_", "-"))
    if hint is bool:
        parser.add_argument(flag, dest=field.name, action="store_true", help=meta["help"])
        return
    kwargs: dict[str, Any] = {"dest": field.name, "help": meta["help"]}
    if "parse" not in meta:
        kwargs["type"] = _value_type(hint)
    if "choices" in meta:
        kwargs["choices"] = meta["choices"]
    else:
        kwargs["metavar"] = meta.get("metavar", flag[2:].replace("-", "_").upper())
    if "cli_default" in meta:
        kwargs["default"] = meta["cli_default"]
    elif field.default is not dataclasses.MISSING:
        kwargs["default"] = field.default
    else:
        kwargs["required"] = True
    parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field, hint in _option_fields():
        _add_option(parser, field, hint)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def _config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the parsed options."""
    from bevfusion_ros.train.loop import TrainConfig

    values = {}
    for field, _ in _option_fields():
        parse = field.metadata.get("parse")
        value = getattr(args, field.name)
        values[field.name] = parse(value) if parse is not None and value is not None else value
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from bevfusion_ros.config import ConfigError
    from bevfusion_ros.train.loop import fitted_to_rig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    try:
        config = fitted_to_rig(_config(args))            # a bad rig or camera list: one line
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    result = train(config)
    if result.history:
        first, last = result.history[0]["loss"], result.history[-1]["loss"]
        print(f"done: {len(result.history)} steps, loss {first:.4f} -> {last:.4f}, "
              f"{result.seconds_per_step:.2f} s/step (median); checkpoint {result.checkpoint}"
              + (f"; model folder {result.export_dir}" if result.export_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
