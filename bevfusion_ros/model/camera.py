"""Camera branch of BEVFusion (ResNet + GeneralizedLSSFPN + DepthLSS nets) and its ONNX export.

The modules mirror mit-han-lab/bevfusion (commit db75150717a9) so that ``state_dict()`` keys and
shapes equal those of its checkpoints under ``encoders.camera.``:

- ``backbone``: mmdet ``ResNet`` (``style='pytorch'``: the stride sits on the 3x3 ``conv2`` of a
  Bottleneck), ``out_indices (1, 2, 3)``; parameter names as torchvision/mmdet
  (``layer1.0.downsample.0.weight`` ...). Source: mmdet ``mmdet/models/backbones/resnet.py``,
  ``CUDA-BEVFusion/configs/nuscenes/det/transfusion/secfpn/camera+lidar/resnet50/default.yaml``.
- ``neck``: ``GeneralizedLSSFPN`` (``bevfusion:mmdet3d/models/necks/generalized_lss.py``), mmcv
  ``ConvModule`` children ``conv``/``bn`` with ReLU, bilinear upsampling with
  ``align_corners=False``
  (``bevfusion:configs/nuscenes/det/transfusion/secfpn/camera+lidar/default.yaml``).
- ``vtransform``: the learnable ``dtransform``/``depthnet``/``downsample`` Sequentials of
  ``DepthLSSTransform`` (``bevfusion:mmdet3d/models/vtransforms/depth_lss.py``). The frozen
  ``frustum``/``dx``/``bx``/``nx`` parameters of ``bevfusion:mmdet3d/models/vtransforms/base.py``
  are geometry, not network, and are left out.

The export wrappers reproduce ``SubclassCameraModule`` and the ``downsample`` export of
``CUDA-BEVFusion/qat/export-camera.py`` (pipeline spec 2.2, 2.3).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bevfusion_ros.model.presets import ModelPreset

RESNET_OUT_INDICES = (1, 2, 3)    # stages whose outputs feed the neck: C3, C4, C5
BOTTLENECK_EXPANSION = 4
FEATURE_STRIDE = 8                # stride of C3 = stride of the neck output P3
ONNX_OPSET = 13
CAMERA_BACKBONE_ONNX = "camera.backbone.onnx"
CAMERA_VTRANSFORM_ONNX = "camera.vtransform.onnx"


class Bottleneck(nn.Module):
    """mmdet ResNet Bottleneck, pytorch style: 1x1 -> 3x3 (stride) -> 1x1 (x4), residual, ReLU."""

    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        super().__init__()
        out_channels = planes * BOTTLENECK_EXPANSION
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in, H, W] -> [B, 4*planes, H/stride, W/stride]."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """mmdet ResNet without fc: 7x7/2 stem, 3x3/2 max-pool, four Bottleneck stages.

    Stage i has ``base * 2**i`` planes and outputs ``base * 4 * 2**i`` channels at stride
    ``4 * 2**i`` (stage 0 keeps stride 4); ``forward`` returns the stages in ``RESNET_OUT_INDICES``.
    """

    def __init__(self, depth_blocks: tuple[int, ...], base_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = base_channels
        self.stage_names = []
        for stage, num_blocks in enumerate(depth_blocks):
            planes = base_channels * 2 ** stage
            stride = 1 if stage == 0 else 2
            blocks = [Bottleneck(in_channels, planes, stride)]
            in_channels = planes * BOTTLENECK_EXPANSION
            blocks += [Bottleneck(in_channels, planes, 1) for _ in range(num_blocks - 1)]
            name = f"layer{stage + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)

    @staticmethod
    def out_channels(base_channels: int) -> list[int]:
        """Channels of the returned stages, e.g. [512, 1024, 2048] for base 64."""
        return [base_channels * BOTTLENECK_EXPANSION * 2 ** stage for stage in RESNET_OUT_INDICES]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """images [B, 3, H, W] -> (C3 [B, 8b, H/8, W/8], C4 [B, 16b, H/16, W/16],
        C5 [B, 32b, H/32, W/32]) with b = base_channels."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        outputs = []
        for stage, name in enumerate(self.stage_names):
            x = getattr(self, name)(x)
            if stage in RESNET_OUT_INDICES:
                outputs.append(x)
        return tuple(outputs)


class ConvModule(nn.Module):
    """mmcv ConvModule with BN and ReLU: children ``conv`` (no bias, BN follows) and ``bn``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class GeneralizedLSSFPN(nn.Module):
    """Top-down FPN that concatenates instead of adding (mit-han-lab GeneralizedLSSFPN).

    For levels i = n-2 ... 0: ``L_i = fpn_convs[i](lateral_convs[i](cat[L_i, up(L_{i+1})]))`` with
    ``L_{n-1} = C_{n-1}`` (the top input is used raw) and ``up`` = bilinear resize to L_i's size,
    ``align_corners=False``. With inputs (C3, C4, C5): P4 = f(cat[C4, up(C5)]) and
    P3 = f(cat[C3, up(P4)]); lateral widths are ``in[i] + in[i+1]`` for the top pair and
    ``in[i] + out`` below it.
    """

    def __init__(self, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        top = len(in_channels) - 2
        self.lateral_convs = nn.ModuleList(
            ConvModule(in_channels[i] + (in_channels[i + 1] if i == top else out_channels),
                       out_channels, 1)
            for i in range(len(in_channels) - 1))
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3) for _ in range(len(in_channels) - 1))

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """(C3, C4, C5) -> (P3 [B, out, H3, W3], P4 [B, out, H4, W4]); the camera branch uses P3."""
        levels = list(inputs)
        for i in reversed(range(len(levels) - 1)):
            upper = F.interpolate(levels[i + 1], size=levels[i].shape[2:], mode="bilinear",
                                  align_corners=False)
            levels[i] = self.fpn_convs[i](self.lateral_convs[i](torch.cat([levels[i], upper], dim=1)))
        return tuple(levels[:-1])


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                  bias: bool = True) -> list[nn.Module]:
    """[Conv2d (padding k//2), BatchNorm2d, ReLU] as flat Sequential entries (indices matter)."""
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                      padding=kernel_size // 2, bias=bias),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class DepthLSSNets(nn.Module):
    """Learnable parts of mit-han-lab DepthLSSTransform.

    - ``dtransform``: depth [B, 1, H, W] -> [B, t2, H/8, W/8]: 1x1 (1->t0), 5x5/4 (t0->t1),
      5x5/2 (t1->t2), each + BN + ReLU, convs with bias.
    - ``depthnet``: cat[dtransform, P3] [B, t2+F, fH, fW] -> [B, D+C, fH, fW]: 3x3 (->F), BN, ReLU,
      3x3 (F->F), BN, ReLU, 1x1 (F->D+C); channels 0..D-1 are depth logits, D..D+C-1 context.
    - ``downsample``: camera BEV [B, C, X, Y] -> [B, C, X/2, Y/2]: 3x3, 3x3/2, 3x3 without bias,
      each + BN + ReLU.
    """

    def __init__(self, feature_channels: int, dtransform_channels: tuple[int, int, int],
                 depth_bins: int, context_channels: int, bev_stride: int,
                 lss_geometry: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        for name, value in (lss_geometry or {}).items():    # registered first, as in BaseTransform
            setattr(self, name, nn.Parameter(value, requires_grad=False))
        if bev_stride != 2:
            raise ValueError(f"DepthLSSTransform supports a BEV downsample of 2, got {bev_stride}")
        self.depth_bins = depth_bins
        self.context_channels = context_channels
        t0, t1, t2 = dtransform_channels
        self.dtransform = nn.Sequential(*_conv_bn_relu(1, t0, 1), *_conv_bn_relu(t0, t1, 5, stride=4),
                                        *_conv_bn_relu(t1, t2, 5, stride=2))
        self.depthnet = nn.Sequential(*_conv_bn_relu(feature_channels + t2, feature_channels, 3),
                                      *_conv_bn_relu(feature_channels, feature_channels, 3),
                                      nn.Conv2d(feature_channels, depth_bins + context_channels, 1))
        self.downsample = nn.Sequential(
            *_conv_bn_relu(context_channels, context_channels, 3, bias=False),
            *_conv_bn_relu(context_channels, context_channels, 3, stride=bev_stride, bias=False),
            *_conv_bn_relu(context_channels, context_channels, 3, bias=False))

    def depth_and_context(self, features: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """features P3 [N, F, fH, fW], depth [N, 1, H, W] -> depthnet output [N, D+C, fH, fW]."""
        return self.depthnet(torch.cat([self.dtransform(depth), features], dim=1))


def lss_geometry_parameters(preset: ModelPreset) -> dict[str, torch.Tensor]:
    """mit-han-lab BaseTransform's fixed tensors, kept so state_dict keys match their checkpoints.

    ``dx`` (cell size), ``bx`` (first cell centre), ``nx`` (cell counts, int64) from ``gen_dx_bx``
    and ``frustum`` [D, fH, fW, 3] = (u, v, d) network-input pixels and depth from
    ``create_frustum`` (mmdet3d/models/vtransforms/base.py). The deploy pipeline recomputes the
    geometry itself (spec 3.2); these are not used in any forward.
    """
    geometry, image = preset.pipeline.camera_geometry, preset.pipeline.image
    bounds = (geometry.xbound, geometry.ybound, geometry.zbound)
    depth = torch.arange(*geometry.dbound, dtype=torch.float32)
    shape = (depth.shape[0], geometry.feature_height, geometry.feature_width)
    u = torch.linspace(0, image.output_width - 1, geometry.feature_width).view(1, 1, -1).expand(shape)
    v = torch.linspace(0, image.output_height - 1, geometry.feature_height).view(1, -1, 1).expand(shape)
    return {
        "dx": torch.tensor([step for _, _, step in bounds]),
        "bx": torch.tensor([low + step / 2.0 for low, _, step in bounds]),
        "nx": torch.tensor([int((high - low) / step) for low, high, step in bounds], dtype=torch.long),
        "frustum": torch.stack([u, v, depth.view(-1, 1, 1).expand(shape)], dim=-1),
    }


def _check_preset(preset: ModelPreset) -> None:
    """The camera nets need depthnet width = neck width and a feature map at image stride 8."""
    spec, pipeline = preset.camera, preset.pipeline
    if spec.depthnet_channels != spec.neck_out_channels:
        raise ValueError(f"preset {preset.name!r}: depthnet_channels {spec.depthnet_channels} must "
                         f"equal neck_out_channels {spec.neck_out_channels} (depthnet eats P3)")
    image, geometry = pipeline.image, pipeline.camera_geometry
    expected = (image.output_height // FEATURE_STRIDE, image.output_width // FEATURE_STRIDE)
    if (geometry.feature_height, geometry.feature_width) != expected:
        raise ValueError(f"preset {preset.name!r}: feature map {geometry.feature_height}x"
                         f"{geometry.feature_width} must be the image / {FEATURE_STRIDE} = "
                         f"{expected[0]}x{expected[1]}")


def build_camera_encoder(preset: ModelPreset) -> nn.ModuleDict:
    """``encoders.camera`` of BEVFusion: ModuleDict(backbone=ResNet, neck=GeneralizedLSSFPN,
    vtransform=DepthLSSNets), widths from ``preset.camera`` and D/C/stride from ``preset.pipeline``."""
    _check_preset(preset)
    spec, geometry = preset.camera, preset.pipeline.camera_geometry
    return nn.ModuleDict({
        "backbone": ResNet(spec.resnet_depth_blocks, spec.resnet_base_channels),
        "neck": GeneralizedLSSFPN(ResNet.out_channels(spec.resnet_base_channels),
                                  spec.neck_out_channels),
        "vtransform": DepthLSSNets(spec.depthnet_channels, spec.dtransform_channels,
                                   geometry.depth_bins, geometry.camera_channels,
                                   preset.camera_downsample, lss_geometry_parameters(preset)),
    })


class CameraBackboneExport(nn.Module):
    """``camera.backbone.onnx`` graph (export-camera.py SubclassCameraModule, spec 2.2).

    forward(img [1, N, 3, H, W] normalized RGB, depth [1, N, 1, H, W] metres, 0 = no point) ->
    - ``camera_feature``        [N, fH, fW, C] NHWC: depthnet channels D..D+C-1, permuted;
    - ``camera_depth_weights``  [N, D, fH, fW]: softmax over D of depthnet channels 0..D-1.
    The depth x context outer product of LSS is not part of it (BEVPool does it).
    """

    def __init__(self, camera_encoder: nn.ModuleDict, preset: ModelPreset) -> None:
        super().__init__()
        self.camera_encoder = camera_encoder
        image = preset.pipeline.image
        self.image_shape = (preset.pipeline.num_cameras, image.output_height, image.output_width)

    def forward(self, img: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_cameras, height, width = self.image_shape
        images = img.reshape(num_cameras, 3, height, width)
        depth_maps = depth.reshape(num_cameras, 1, height, width)
        p3 = self.camera_encoder["neck"](self.camera_encoder["backbone"](images))[0]
        vtransform = self.camera_encoder["vtransform"]
        output = vtransform.depth_and_context(p3, depth_maps)
        depth_bins, context_channels = vtransform.depth_bins, vtransform.context_channels
        camera_depth_weights = output[:, :depth_bins].softmax(dim=1)
        camera_feature = output[:, depth_bins:depth_bins + context_channels].permute(0, 2, 3, 1)
        return camera_feature, camera_depth_weights


class VTransformExport(nn.Module):
    """``camera.vtransform.onnx`` graph (spec 2.3): feat_in [1, C, X, Y] -> feat_out [1, C, X/2, Y/2]."""

    def __init__(self, camera_encoder: nn.ModuleDict) -> None:
        super().__init__()
        self.downsample = camera_encoder["vtransform"].downsample

    def forward(self, feat_in: torch.Tensor) -> torch.Tensor:
        return self.downsample(feat_in)


def camera_sample_inputs(preset: ModelPreset, seed: int, depth_density: float = 0.05
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random network inputs shaped like the real ones, reproducible from ``seed``.

    Returns ``img`` [1, N, 3, H, W] float32: uniform [0, 1] pixels normalized with the preset's
    mean/std, and ``depth`` [1, N, 1, H, W] float32: ``depth_density`` of the pixels hold a depth
    uniform in [dbound min, dbound max] metres (e.g. [1, 60]), the rest 0.
    """
    pipeline = preset.pipeline
    image = pipeline.image
    shape = (1, pipeline.num_cameras, 1, image.output_height, image.output_width)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(shape[:2] + (3,) + shape[3:], generator=generator)
    mean = torch.tensor(image.mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(image.std).view(1, 1, 3, 1, 1)
    img = (pixels - mean) / std
    low, high, _ = pipeline.camera_geometry.dbound
    hit = torch.rand(shape, generator=generator) < depth_density
    depth = torch.where(hit, low + (high - low) * torch.rand(shape, generator=generator),
                        torch.zeros(shape))
    return img, depth


def _export(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path,
            input_names: list[str], output_names: list[str]) -> None:
    """Legacy TorchScript export, opset 13, static shapes, constant folding (folds eval BN).

    ``module`` is put in eval mode first: the exporter restores the mode it found afterwards, and
    a wrapper left in training mode would switch the wrapped encoder back to training.
    """
    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, inputs, str(path), input_names=input_names,
                          output_names=output_names, opset_version=ONNX_OPSET,
                          do_constant_folding=True, dynamo=False)


def export_camera_onnx(camera_encoder: nn.ModuleDict, preset: ModelPreset,
                       out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``camera.backbone.onnx`` and ``camera.vtransform.onnx`` into ``out_dir``.

    Puts ``camera_encoder`` in eval mode (BatchNorm uses running stats and is folded into the
    convs). Shapes are static: img [1, N, 3, H, W], depth [1, N, 1, H, W] -> camera_feature
    [N, fH, fW, C], camera_depth_weights [N, D, fH, fW]; feat_in [1, C, X, Y] -> feat_out
    [1, C, X/2, Y/2]. All graph I/O is float32. Returns (backbone path, vtransform path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone_path = out_dir / CAMERA_BACKBONE_ONNX
    _export(CameraBackboneExport(camera_encoder, preset), camera_sample_inputs(preset, seed=0),
            backbone_path, ["img", "depth"], ["camera_feature", "camera_depth_weights"])
    bev_x, bev_y = preset.camera_bev_size
    feat_in = torch.zeros(1, preset.pipeline.camera_geometry.camera_channels, bev_x, bev_y)
    vtransform_path = out_dir / CAMERA_VTRANSFORM_ONNX
    _export(VTransformExport(camera_encoder), (feat_in,), vtransform_path, ["feat_in"], ["feat_out"])
    return backbone_path, vtransform_path
