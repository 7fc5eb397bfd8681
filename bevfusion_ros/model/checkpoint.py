"""Load mit-han-lab/bevfusion checkpoints (e.g. CUDA-BEVFusion's ``model/resnet50/bevfusion-det.pth``).

Our modules are named like mit-han-lab's (``mit_han_lab_keys.py`` holds their key table), so a
checkpoint loads by name. :func:`load_checkpoint` refuses anything but an exact match: every
missing key, unexpected key and shape mismatch is reported in one :class:`CheckpointError`
before a single weight is copied, so a failed load leaves the model untouched.

The steps, in order:

1. read the file (``torch.load`` on CPU, ``weights_only=True`` unless the caller trusts the
   file's pickles) or take the given mapping;
2. unwrap ``{"state_dict": ...}`` (mmcv ``save_checkpoint``) or ``{"model": ...}``;
3. strip the ``module.`` prefix that ``DataParallel`` wrappers add;
4. convert layouts through the single hook :data:`LAYOUT_HOOK` (see :func:`convert_layouts`);
5. compare names and shapes with ``model.state_dict()``, then ``load_state_dict(strict=True)``.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Mapping

import torch
from torch import nn

STATE_DICT_WRAPPERS = ("state_dict", "model")
DATA_PARALLEL_PREFIX = "module."
LAYOUT_HOOK = "convert_mit_han_lab_tensor"
MAX_LISTED = 20          # entries shown per section of a CheckpointError; counts are always given

StateDict = dict[str, torch.Tensor]
LayoutHook = Callable[[str, torch.Tensor], torch.Tensor]


class CheckpointError(ValueError):
    """The checkpoint cannot be read, or does not match the model exactly."""


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> Any:
    """``torch.load`` onto the CPU; with ``weights_only`` unless ``allow_pickle`` (trusted files only:
    full unpickling can run arbitrary code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: not loadable with weights_only=True ({error}); if the file is trusted, "
            "pass allow_pickle=True") from error


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> StateDict:
    """The tensor mapping inside ``checkpoint``, without wrappers and ``module.`` prefixes."""
    for wrapper in STATE_DICT_WRAPPERS:
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    not_tensors = sorted(name for name, value in checkpoint.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"not a state dict: {len(not_tensors)} entries are not tensors: "
                              f"{_listing(not_tensors)}")
    return {name.removeprefix(DATA_PARALLEL_PREFIX): tensor for name, tensor in checkpoint.items()}


def _layout_hooks(model: nn.Module) -> dict[str, LayoutHook]:
    """Module path -> hook, for every submodule (or the model) that declares :data:`LAYOUT_HOOK`."""
    return {path: getattr(module, LAYOUT_HOOK) for path, module in model.named_modules()
            if callable(getattr(module, LAYOUT_HOOK, None))}


def convert_layouts(model: nn.Module, state: StateDict) -> StateDict:
    """Apply the modules' layout hooks: the single place where mit-han-lab layouts become ours.

    A module whose tensors are stored differently from mit-han-lab's declares a method
    ``convert_mit_han_lab_tensor(self, name, tensor) -> tensor``; ``name`` is the key relative to
    that module (e.g. ``"conv_input.0.weight"``). Each checkpoint key is converted by its innermost
    ancestor module that declares the hook; other keys pass unchanged. No module of ours declares it
    today (e.g. our SparseEncoder keeps mmdet3d's spconv weights in their [kx, ky, kz, in, out]
    layout), so this is normally the identity.
    """
    hooks = _layout_hooks(model)
    if not hooks:
        return state
    converted = {}
    for name, tensor in state.items():
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            owner = ".".join(parts[:depth])
            if owner in hooks:
                tensor = hooks[owner](".".join(parts[depth:]), tensor)
                break
        converted[name] = tensor
    return converted


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))


def _listing(lines: list[str]) -> str:
    """At most :data:`MAX_LISTED` lines, then how many were left out."""
    shown = lines[:MAX_LISTED]
    if len(lines) > MAX_LISTED:
        shown.append(f"... and {len(lines) - MAX_LISTED} more")
    return "".join(f"\n  {line}" for line in shown)


def mismatch_report(expected: StateDict, given: StateDict) -> str:
    """Sorted missing keys, unexpected keys and shape mismatches of ``given`` against ``expected``
    (empty string when names and shapes match exactly)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(name for name in set(expected) & set(given)
                        if expected[name].shape != given[name].shape)
    if not (missing or unexpected or mismatched):
        return ""
    sections = [
        ("missing from the checkpoint", [f"{name} {_shape(expected[name])}" for name in missing]),
        ("unexpected in the checkpoint", [f"{name} {_shape(given[name])}" for name in unexpected]),
        ("shape mismatches", [f"{name}: checkpoint {_shape(given[name])}, model {_shape(expected[name])}"
                              for name in mismatched]),
    ]
    summary = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} shape mismatches"
    return "\n".join([summary] + [f"{title} ({len(lines)}):{_listing(lines)}"
                                  for title, lines in sections if lines])


def load_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                    *, allow_pickle: bool = False) -> None:
    """Load a mit-han-lab/bevfusion checkpoint into ``model`` (in place), exactly or not at all.

    ``path_or_state_dict``: a ``.pth`` path or an already loaded checkpoint / state dict.
    ``allow_pickle``: read the file with ``weights_only=False`` (trusted files only).
    Raises :class:`CheckpointError` naming every missing key, unexpected key and shape mismatch.
    """
    if isinstance(path_or_state_dict, Mapping):
        checkpoint = path_or_state_dict
    else:
        checkpoint = read_checkpoint(path_or_state_dict, allow_pickle)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    expected = model.state_dict()
    state = unwrap_state_dict(checkpoint)
    state = convert_layouts(model, state)
    report = mismatch_report(expected, state)
    if report:
        raise CheckpointError(f"checkpoint does not match {type(model).__name__}: {report}")
    model.load_state_dict(state, strict=True)
