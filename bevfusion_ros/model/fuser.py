"""BEV fuser and decoder (``fuser.onnx``, spec 2.4 / 6.1) and the fuser + head ONNX export.

ConvFuser -> SECOND -> SECONDFPN, with mit-han-lab/bevfusion (commit db75150717a9) attribute
names so ``state_dict()`` keys equal theirs (``fuser.0.weight``, ``decoder.backbone.blocks.0.0.weight``,
``decoder.neck.deblocks.1.0.weight``). Facts taken from (no code copied):

- ``bevfusion:mmdet3d/models/fusers/conv.py`` (cat[camera, lidar], conv3x3 no bias, default BN, ReLU),
- ``bevfusion:mmdet3d/models/backbones/second.py`` (``blocks``: per stage a strided conv3x3 then
  ``layer_num`` conv3x3, each conv (no bias) + BN + ReLU; Kaiming init),
- ``bevfusion:mmdet3d/models/necks/second.py`` (``deblocks``: upsample layer + BN + ReLU, outputs
  concatenated in stage order),
- ``bevfusion:configs/nuscenes/det/transfusion/secfpn/default.yaml`` (BN eps 1e-3, momentum 0.01;
  ``use_conv_for_no_stride: true`` -> stride 1 deblock is a 1x1 Conv2d; stride 2 a ConvTranspose2d
  k2 s2; no biases),
- ``CUDA-BEVFusion/qat/export-transfuser.py`` (``SubclassFuser``, export names and opset 13).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from bevfusion_ros.model.head import HeadExport, TransFusionHead, head_sample_inputs, random_bev_features
from bevfusion_ros.model.presets import ModelPreset

DECODER_BN_EPS = 1e-3
DECODER_BN_MOMENTUM = 0.01
ONNX_OPSET = 13
FUSER_ONNX = "fuser.onnx"
HEAD_ONNX = "head.bbox.onnx"


class ConvFuser(nn.Sequential):
    """cat(features, dim=1) -> conv3x3 (no bias) -> BN -> ReLU.

    ``forward([camera [B, C_cam, X, Y], lidar [B, C_lidar, X, Y]])`` -> [B, out_channels, X, Y];
    the camera map comes first in the concatenation.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__(nn.Conv2d(sum(in_channels), out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return super().forward(torch.cat(list(features), dim=1))


def _decoder_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=DECODER_BN_EPS, momentum=DECODER_BN_MOMENTUM)


def _kaiming_init(module: nn.Module) -> None:
    """mmcv ``Kaiming`` init_cfg: normal, fan_out, ReLU gain, for every (transposed) conv weight."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")


class SECOND(nn.Module):
    """SECOND backbone: ``blocks[i]`` = conv3x3 stride s_i (C_{i-1} -> C_i) + ``layer_nums[i]``
    conv3x3 (C_i -> C_i), each followed by BN (eps 1e-3) and ReLU; Sequential indices are
    conv 3j, BN 3j+1, ReLU 3j+2. ``forward(x [B, C, X, Y])`` -> one map per stage, stage i at
    stride prod(s_0..s_i)."""

    def __init__(self, in_channels: int, out_channels: Sequence[int], layer_nums: Sequence[int],
                 layer_strides: Sequence[int]) -> None:
        super().__init__()
        in_filters = [in_channels, *out_channels[:-1]]
        self.blocks = nn.ModuleList(
            self._stage(stage_in, stage_out, layer_num, stride)
            for stage_in, stage_out, layer_num, stride
            in zip(in_filters, out_channels, layer_nums, layer_strides, strict=True))
        _kaiming_init(self)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, layer_num: int, stride: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for index in range(layer_num + 1):
            layers += [nn.Conv2d(in_channels if index == 0 else out_channels, out_channels, 3,
                                 stride=stride if index == 0 else 1, padding=1, bias=False),
                       _decoder_norm(out_channels), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return tuple(outputs)


class SECONDFPN(nn.Module):
    """SECONDFPN neck: ``deblocks[i]`` brings stage i back to full resolution and width
    ``out_channels[i]`` (stride 1: 1x1 Conv2d; stride s > 1: ConvTranspose2d k=s, stride s; no
    bias) + BN (eps 1e-3) + ReLU. ``forward(stage maps)`` -> concatenation [B, sum(out), X, Y]
    at the resolution of stage 0 (the BEV extent must be divisible by every stride)."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int],
                 upsample_strides: Sequence[int]) -> None:
        super().__init__()
        self.deblocks = nn.ModuleList(
            nn.Sequential(self._upsample(stage_in, stage_out, stride), _decoder_norm(stage_out),
                          nn.ReLU(inplace=True))
            for stage_in, stage_out, stride in zip(in_channels, out_channels, upsample_strides,
                                                   strict=True))
        _kaiming_init(self)

    @staticmethod
    def _upsample(in_channels: int, out_channels: int, stride: int) -> nn.Module:
        if stride == 1:
            return nn.Conv2d(in_channels, out_channels, 1, bias=False)
        return nn.ConvTranspose2d(in_channels, out_channels, stride, stride=stride, bias=False)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([deblock(x) for deblock, x in zip(self.deblocks, features, strict=True)],
                         dim=1)


def fuser_input_channels(preset: ModelPreset) -> tuple[int, int]:
    """(camera BEV channels, lidar BEV channels), e.g. (80, 256)."""
    return preset.pipeline.camera_geometry.camera_channels, preset.lidar_bev_channels


def build_fuser(preset: ModelPreset) -> ConvFuser:
    """ConvFuser: (C_cam + C_lidar) -> ``preset.fuser.fuser_out_channels`` (336 -> 256)."""
    return ConvFuser(fuser_input_channels(preset), preset.fuser.fuser_out_channels)


class BEVDecoder(nn.ModuleDict):
    """``ModuleDict(backbone=SECOND, neck=SECONDFPN)`` (mit-han-lab's ``decoder``) that can be
    called: fused BEV [B, C, X, Y] -> middle [B, sum(fpn_out_channels), X, Y]. Calling it (not
    its children) gives exported nodes the scope ``/decoder/backbone/...``, ``/decoder/neck/...``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self["neck"](self["backbone"](x))


def build_decoder(preset: ModelPreset) -> BEVDecoder:
    """SECOND + SECONDFPN with the widths of ``preset.fuser`` (256 -> 128@X, 256@X/2 -> 512@X)."""
    spec = preset.fuser
    return BEVDecoder({
        "backbone": SECOND(spec.fuser_out_channels, spec.second_out_channels, spec.second_layer_nums,
                           spec.second_strides),
        "neck": SECONDFPN(spec.second_out_channels, spec.fpn_out_channels, spec.fpn_upsample_strides),
    })


class FuserExport(nn.Module):
    """``fuser.onnx``: camera [1, C_cam, X, Y], lidar [1, C_lidar, X, Y] -> middle
    [1, sum(fpn_out_channels), X, Y]; nuscenes-r50: [1,80,180,180], [1,256,180,180] ->
    [1,512,180,180]."""

    INPUT_NAMES = ("camera", "lidar")
    OUTPUT_NAMES = ("middle",)

    def __init__(self, fuser: ConvFuser, decoder: BEVDecoder) -> None:
        super().__init__()
        self.fuser = fuser
        self.decoder = decoder

    def forward(self, camera: torch.Tensor, lidar: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.fuser([camera, lidar]))


def fuser_sample_inputs(preset: ModelPreset, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (camera [1, C_cam, X, Y], lidar [1, C_lidar, X, Y]) float32 BEV maps (ReLU'd
    normals, as after the vtransform and the sparse encoder), reproducible from ``seed``."""
    camera_channels, lidar_channels = fuser_input_channels(preset)
    return (random_bev_features((1, camera_channels, *preset.bev_size), seed),
            random_bev_features((1, lidar_channels, *preset.bev_size), seed + 1_000_003))


def _export(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path,
            input_names: Sequence[str], output_names: Sequence[str]) -> None:
    """Legacy TorchScript export: opset 13, static shapes, constant folding (folds eval BN)."""
    with torch.no_grad():
        torch.onnx.export(module, inputs, str(path), input_names=list(input_names),
                          output_names=list(output_names), opset_version=ONNX_OPSET,
                          do_constant_folding=True, dynamo=False)


def fold_transposed_conv_batchnorm(decoder: BEVDecoder) -> BEVDecoder:
    """Eval-mode copy of ``decoder`` whose ConvTranspose2d -> BN pairs are one ConvTranspose2d
    with bias (BN replaced by Identity). The ONNX exporter folds BN into Conv only; this makes
    ``fuser.onnx`` BN-free like NVIDIA's BN-folded export (spec 2.7). Same outputs."""
    folded = copy.deepcopy(decoder).eval()
    for deblock in folded["neck"].deblocks:
        if isinstance(deblock[0], nn.ConvTranspose2d):
            deblock[0] = fuse_conv_bn_eval(deblock[0], deblock[1], transpose=True)
            deblock[1] = nn.Identity()
    return folded


def export_fuser_head_onnx(fuser: ConvFuser, decoder: BEVDecoder, head: TransFusionHead,
                           preset: ModelPreset, out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``fuser.onnx`` (camera, lidar -> middle) and ``head.bbox.onnx`` (middle -> score,
    rot, dim, reg, height, vel) into ``out_dir``; returns (fuser path, head path).

    Puts the three modules in eval mode: BatchNorm uses running statistics and is folded into
    the convs (see :func:`fold_transposed_conv_batchnorm`; ``decoder``'s weights are not
    changed). Static shapes, float32 graph I/O, standard ONNX ops (LayerNorm decomposed).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The exporter restores the wrapper's training flag on all children afterwards: wrap in eval.
    fuser_export = FuserExport(fuser, fold_transposed_conv_batchnorm(decoder.eval())).eval()
    head_export = HeadExport(head).eval()
    fuser_path, head_path = out_dir / FUSER_ONNX, out_dir / HEAD_ONNX
    _export(fuser_export, fuser_sample_inputs(preset, seed=0), fuser_path,
            FuserExport.INPUT_NAMES, FuserExport.OUTPUT_NAMES)
    _export(head_export, (head_sample_inputs(preset, seed=0),), head_path,
            ("middle",), HeadExport.OUTPUT_NAMES)
    return fuser_path, head_path
