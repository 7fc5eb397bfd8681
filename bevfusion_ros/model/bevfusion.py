"""The whole BEVFusion camera+lidar detector in PyTorch, named like mit-han-lab/bevfusion.

Top-level attribute names follow ``mmdet3d/models/fusion_models/bevfusion.py`` of
mit-han-lab/bevfusion, so ``state_dict()`` keys equal theirs (``encoders.camera.backbone...``,
``encoders.lidar.backbone...``, ``fuser...``, ``decoder.backbone/neck...``, ``heads.object...``).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from bevfusion_ros.model.camera import build_camera_encoder
from bevfusion_ros.model.fuser import build_decoder, build_fuser
from bevfusion_ros.model.head import TransFusionHead
from bevfusion_ros.model.presets import ModelPreset
from bevfusion_ros.model.sparse_encoder import SparseEncoder


class BEVFusionModel(nn.Module):
    """Container of the five networks; the stage wrappers in export.py define the dataflow."""

    def __init__(self, preset: ModelPreset):
        super().__init__()
        self.preset = preset
        self.encoders = nn.ModuleDict({
            "camera": build_camera_encoder(preset),
            "lidar": nn.ModuleDict({"backbone": SparseEncoder(preset)}),
        })
        self.fuser = build_fuser(preset)
        self.decoder = build_decoder(preset)
        self.heads = nn.ModuleDict({"object": TransFusionHead(preset)})


def build_model(preset: ModelPreset, seed: int = 0) -> BEVFusionModel:
    """Model with seeded random weights (PyTorch default init), in eval mode."""
    torch.manual_seed(seed)
    return BEVFusionModel(preset).eval()


BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def calibrate_batchnorm(module: nn.Module, run: Callable[[object], object],
                        samples: Iterable[object]) -> int:
    """Set every BatchNorm's running statistics to the exact mean/var of its inputs on ``samples``.

    Untrained random weights make activations grow or vanish layer after layer; with running
    statistics measured on realistic inputs every BN output is standardised again, which keeps
    activations (and so fp16/int8 ranges) in the range of a trained network. Only the BN layers
    are put in training mode (cumulative averaging, ``momentum=None``); everything else stays
    in eval mode. Returns the number of BN layers calibrated.
    """
    norms = [m for m in module.modules() if isinstance(m, BATCHNORM_TYPES)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    try:
        for sample in samples:
            run(sample)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
            norm.eval()
    return len(norms)
