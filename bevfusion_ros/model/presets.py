"""Model presets: network widths plus the sensor geometry each model is built for.

``nuscenes-r50`` is CUDA-BEVFusion's ResNet50 camera+lidar model (spec 2.2-2.5, 5.4, 6.2).
``tiny`` keeps every stage, name and interface of it with fewer channels, a smaller network
input and coarser BEV/voxel grids, so the whole chain runs on a 2-core CPU in seconds (CI).
Importing this module does not need torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from bevfusion_ros.config import CameraGeometryConfig, HeadConfig, ImageConfig, PipelineConfig, VoxelizationConfig

if TYPE_CHECKING:
    from bevfusion_ros.io.rig import Rig


@dataclass(frozen=True)
class CameraBackboneSpec:
    """ResNet (mmdet Bottleneck blocks) + GeneralizedLSSFPN neck + DepthLSS depth/context net."""

    resnet_depth_blocks: tuple[int, int, int, int] = (3, 4, 6, 3)   # ResNet50
    resnet_base_channels: int = 64            # stem width; stage i outputs base * 4 * 2**i
    neck_out_channels: int = 256
    dtransform_channels: tuple[int, int, int] = (8, 32, 64)
    depthnet_channels: int = 256              # mit-han-lab: in_channels of DepthLSSTransform


@dataclass(frozen=True)
class SparseEncoderSpec:
    """mmdet3d SparseEncoder with basic blocks (spec 5.4)."""

    in_channels: int = 5
    base_channels: int = 16
    output_channels: int = 128
    encoder_channels: tuple[tuple[int, ...], ...] = ((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128))
    encoder_paddings: tuple[tuple, ...] = ((0, 0, 1), (0, 0, 1), (0, 0, (1, 1, 0)), (0, 0))


@dataclass(frozen=True)
class FuserDecoderSpec:
    """ConvFuser + SECOND + SECONDFPN (spec 2.4)."""

    fuser_out_channels: int = 256
    second_out_channels: tuple[int, int] = (128, 256)
    second_layer_nums: tuple[int, int] = (5, 5)
    second_strides: tuple[int, int] = (1, 2)
    fpn_out_channels: tuple[int, int] = (256, 256)
    fpn_upsample_strides: tuple[int, int] = (1, 2)


@dataclass(frozen=True)
class HeadSpec:
    """TransFusion head (spec 6.2)."""

    hidden_channels: int = 128
    num_heads: int = 8
    ffn_channels: int = 256
    head_conv_channels: int = 64
    num_decoder_layers: int = 1
    nms_kernel_size: int = 3


@dataclass(frozen=True)
class ModelPreset:
    """A complete model description: architecture widths + pipeline geometry."""

    name: str
    pipeline: PipelineConfig
    camera: CameraBackboneSpec = field(default_factory=CameraBackboneSpec)
    lidar: SparseEncoderSpec = field(default_factory=SparseEncoderSpec)
    fuser: FuserDecoderSpec = field(default_factory=FuserDecoderSpec)
    head: HeadSpec = field(default_factory=HeadSpec)

    @property
    def num_classes(self) -> int:
        return len(self.pipeline.head.class_names)

    @property
    def lidar_bev_channels(self) -> int:
        """Channels of the lidar BEV: output_channels x 2 z-slices (spec 5.3 Reshape)."""
        return self.lidar.output_channels * 2

    @property
    def bev_size(self) -> tuple[int, int]:
        """(X, Y) cells of the fused BEV = voxel grid / out_size_factor (e.g. 180 x 180)."""
        return self.pipeline.bev_size

    @property
    def camera_bev_size(self) -> tuple[int, int]:
        """(X, Y) cells of the camera BEV before camera.vtransform (e.g. 360 x 360)."""
        nx, ny, _ = self.pipeline.camera_geometry.bev_size
        return nx, ny

    @property
    def camera_downsample(self) -> int:
        """Stride of camera.vtransform: camera BEV -> fused BEV (2 for both presets)."""
        return self.camera_bev_size[0] // self.bev_size[0]

    def for_rig(self, rig: "Rig") -> "ModelPreset":
        """This model for ``rig``'s cameras: its ``camera_names`` (the camera batch of
        ``camera.backbone``) and image size (:meth:`ImageConfig.for_input_size`: same network
        input, resize chosen for the size). The networks' weights do not depend on either, so
        a checkpoint of one rig loads into the model of another. Self when nothing changes."""
        pipeline = self.pipeline
        image = pipeline.image.for_input_size(*rig.image_size)
        if rig.camera_names == pipeline.camera_names and image == pipeline.image:
            return self
        return replace(self, pipeline=replace(pipeline, camera_names=rig.camera_names, image=image).validate())


NUSCENES_R50 = ModelPreset(name="nuscenes-r50", pipeline=PipelineConfig())

TINY = ModelPreset(
    name="tiny",
    pipeline=PipelineConfig(
        image=ImageConfig(output_width=256, output_height=128, resize_scale=0.16),
        camera_geometry=CameraGeometryConfig(
            xbound=(-54.0, 54.0, 1.5), ybound=(-54.0, 54.0, 1.5), zbound=(-10.0, 10.0, 20.0),
            dbound=(1.0, 61.0, 2.0), feature_width=32, feature_height=16, camera_channels=20),
        voxelization=VoxelizationConfig(voxel_size=(0.375, 0.375, 0.2), max_voxels=60000),
        head=replace(HeadConfig(), num_proposals=50, score_threshold=0.0),
    ),
    camera=CameraBackboneSpec(resnet_depth_blocks=(1, 1, 1, 1), resnet_base_channels=8,
                              neck_out_channels=32, dtransform_channels=(4, 8, 16),
                              depthnet_channels=32),
    lidar=SparseEncoderSpec(base_channels=8, output_channels=32,
                            encoder_channels=((8, 8, 16), (16, 16, 32), (32, 32, 32), (32, 32))),
    fuser=FuserDecoderSpec(fuser_out_channels=32, second_out_channels=(32, 64), second_layer_nums=(1, 1),
                           fpn_out_channels=(32, 32)),
    head=HeadSpec(hidden_channels=32, num_heads=4, ffn_channels=64, head_conv_channels=16),
)

PRESETS: dict[str, ModelPreset] = {preset.name: preset for preset in (NUSCENES_R50, TINY)}


def get_preset(name: str) -> ModelPreset:
    """Look a preset up by name; the error lists the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[name]
    preset.pipeline.validate()
    return preset
