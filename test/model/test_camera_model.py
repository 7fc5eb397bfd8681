"""Camera branch (ResNet + GeneralizedLSSFPN + DepthLSS nets) and its two ONNX graphs.

nuscenes-r50: names/shapes of the state dict against an independently written table of
mit-han-lab's ResNet50 camera encoder, and the ONNX interface of spec 2.2/2.3.
tiny: numerics. ONNX Runtime against PyTorch with non-trivial BatchNorm statistics (so the BN
folding is exercised), softmax and NHWC layout against a separate depthnet run, and the neck
against a float64 recomputation built from explicit F.interpolate / cat / conv / BN formulas.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bevfusion_ros.model.camera import (
    CameraBackboneExport,
    VTransformExport,
    build_camera_encoder,
    camera_sample_inputs,
    export_camera_onnx,
)
from bevfusion_ros.model.presets import NUSCENES_R50, TINY

# torchvision's resnet50 has 25,557,032 parameters; its fc (2048 x 1000 + 1000) is absent in mmdet.
RESNET50_PARAMS_WITHOUT_FC = 25_557_032 - (2048 * 1000 + 1000)


# ---------------------------------------------------------------- helpers

def batchnorm_shapes(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    """State-dict entries of one BatchNorm2d."""
    names = ("weight", "bias", "running_mean", "running_var")
    shapes = {f"{prefix}.{name}": (channels,) for name in names}
    shapes[f"{prefix}.num_batches_tracked"] = ()
    return shapes


def conv_bn_shapes(conv: str, bn: str, out_ch: int, in_ch: int, kernel: int, bias: bool
                   ) -> dict[str, tuple[int, ...]]:
    """State-dict entries of a conv followed by a BatchNorm2d."""
    shapes = {f"{conv}.weight": (out_ch, in_ch, kernel, kernel)}
    if bias:
        shapes[f"{conv}.bias"] = (out_ch,)
    return shapes | batchnorm_shapes(bn, out_ch)


def expected_r50_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """mit-han-lab ``encoders.camera`` state dict of the ResNet50 model, written from the
    definitions (mmdet ResNet-50, GeneralizedLSSFPN [512,1024,2048]->256, DepthLSSTransform
    in 256 / out 80, D=118, dtransform 1->8->32->64, downsample 2)."""
    shapes = conv_bn_shapes("backbone.conv1", "backbone.bn1", 64, 3, 7, bias=False)
    in_ch = 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = 64 * 2 ** stage
        for block in range(blocks):
            p = f"backbone.layer{stage + 1}.{block}"
            shapes |= conv_bn_shapes(f"{p}.conv1", f"{p}.bn1", planes, in_ch, 1, bias=False)
            shapes |= conv_bn_shapes(f"{p}.conv2", f"{p}.bn2", planes, planes, 3, bias=False)
            shapes |= conv_bn_shapes(f"{p}.conv3", f"{p}.bn3", planes * 4, planes, 1, bias=False)
            if block == 0:
                shapes |= conv_bn_shapes(f"{p}.downsample.0", f"{p}.downsample.1", planes * 4,
                                         in_ch, 1, bias=False)
            in_ch = planes * 4
    for i, lateral_in in enumerate((512 + 256, 1024 + 2048)):
        shapes |= conv_bn_shapes(f"neck.lateral_convs.{i}.conv", f"neck.lateral_convs.{i}.bn", 256,
                                 lateral_in, 1, bias=False)
        shapes |= conv_bn_shapes(f"neck.fpn_convs.{i}.conv", f"neck.fpn_convs.{i}.bn", 256, 256, 3,
                                 bias=False)
    # BaseTransform's frozen geometry (gen_dx_bx, create_frustum): x/y/z bounds, D x fH x fW x 3.
    shapes |= {"vtransform.dx": (3,), "vtransform.bx": (3,), "vtransform.nx": (3,),
               "vtransform.frustum": (118, 32, 88, 3)}
    for index, (out_ch, in_ch, kernel) in zip((0, 3, 6), ((8, 1, 1), (32, 8, 5), (64, 32, 5))):
        shapes |= conv_bn_shapes(f"vtransform.dtransform.{index}", f"vtransform.dtransform.{index + 1}",
                                 out_ch, in_ch, kernel, bias=True)
    for index, in_ch in zip((0, 3), (256 + 64, 256)):
        shapes |= conv_bn_shapes(f"vtransform.depthnet.{index}", f"vtransform.depthnet.{index + 1}",
                                 256, in_ch, 3, bias=True)
    shapes |= {"vtransform.depthnet.6.weight": (118 + 80, 256, 1, 1),
               "vtransform.depthnet.6.bias": (118 + 80,)}
    for index in (0, 3, 6):
        shapes |= conv_bn_shapes(f"vtransform.downsample.{index}", f"vtransform.downsample.{index + 1}",
                                 80, 80, 3, bias=False)
    return shapes


def randomize_batchnorm(module: nn.Module, seed: int) -> None:
    """Give every BatchNorm2d non-trivial running stats and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.normal_(0.0, 0.3, generator=generator)
            bn.running_var.uniform_(0.5, 2.0, generator=generator)
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.normal_(0.0, 0.2, generator=generator)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|."""
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def onnx_io(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (static shape, element type) of every graph input and output."""
    values = list(model.graph.input) + list(model.graph.output)
    return {v.name: (tuple(d.dim_value for d in v.type.tensor_type.shape.dim),
                     v.type.tensor_type.elem_type) for v in values}


def batchnorm64(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode BatchNorm from its formula in float64."""
    shape = (1, -1, 1, 1)
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return (x - bn.running_mean.double().view(shape)) * scale.view(shape) + bn.bias.double().view(shape)


def conv_bn_relu64(x: torch.Tensor, conv_module: nn.Module) -> torch.Tensor:
    """mmcv ConvModule (conv without bias, BN, ReLU) in float64; 'same' padding."""
    weight = conv_module.conv.weight.double()
    y = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
    return torch.relu(batchnorm64(y, conv_module.bn))


# ---------------------------------------------------------------- nuscenes-r50 (interface only)

@pytest.fixture(scope="module")
def r50_encoder() -> nn.ModuleDict:
    return build_camera_encoder(NUSCENES_R50)


@pytest.fixture(scope="module")
def r50_onnx(r50_encoder, tmp_path_factory) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    backbone_path, vtransform_path = export_camera_onnx(r50_encoder, NUSCENES_R50,
                                                        tmp_path_factory.mktemp("r50"))
    assert backbone_path.name == "camera.backbone.onnx"
    assert vtransform_path.name == "camera.vtransform.onnx"
    return onnx.load(str(backbone_path)), onnx.load(str(vtransform_path))


def test_r50_backbone_onnx_interface(r50_onnx):
    backbone, _ = r50_onnx
    onnx.checker.check_model(backbone)
    float32 = onnx.TensorProto.FLOAT
    assert [v.name for v in backbone.graph.input] == ["img", "depth"]
    assert [v.name for v in backbone.graph.output] == ["camera_feature", "camera_depth_weights"]
    assert onnx_io(backbone) == {
        "img": ((1, 6, 3, 256, 704), float32),
        "depth": ((1, 6, 1, 256, 704), float32),
        "camera_feature": ((6, 32, 88, 80), float32),
        "camera_depth_weights": ((6, 118, 32, 88), float32),
    }
    assert {imp.domain for imp in backbone.opset_import} == {""}
    assert backbone.opset_import[0].version == 13


def test_r50_vtransform_onnx_interface(r50_onnx):
    _, vtransform = r50_onnx
    onnx.checker.check_model(vtransform)
    float32 = onnx.TensorProto.FLOAT
    assert onnx_io(vtransform) == {"feat_in": ((1, 80, 360, 360), float32),
                                   "feat_out": ((1, 80, 180, 180), float32)}
    assert vtransform.opset_import[0].version == 13


def test_r50_state_dict_names_and_shapes_equal_mit_han_lab(r50_encoder):
    actual = {name: tuple(t.shape) for name, t in r50_encoder.state_dict().items()}
    expected = expected_r50_state_dict_shapes()
    assert sorted(set(actual) ^ set(expected)) == []
    assert actual == expected
    assert actual["backbone.layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert actual["vtransform.depthnet.6.weight"] == (198, 256, 1, 1)


def test_r50_parameter_counts(r50_encoder):
    count = {part: sum(p.numel() for p in r50_encoder[part].parameters())
             for part in ("backbone", "neck", "vtransform")}
    assert count["backbone"] == RESNET50_PARAMS_WITHOUT_FC == 23_508_032
    bn = 2  # weight + bias per channel
    assert count["neck"] == (768 + 3072) * 256 + 2 * 256 * 256 * 9 + 4 * bn * 256
    dtransform = (1 * 8 + 8) + (8 * 32 * 25 + 32) + (32 * 64 * 25 + 64) + bn * (8 + 32 + 64)
    depthnet = (320 * 256 * 9 + 256) + (256 * 256 * 9 + 256) + (256 * 198 + 198) + bn * 2 * 256
    downsample = 3 * (80 * 80 * 9 + bn * 80)
    geometry = 3 + 3 + 3 + 118 * 32 * 88 * 3
    assert count["vtransform"] == dtransform + depthnet + downsample + geometry


def test_lss_geometry_values_follow_mit_han_lab(r50_encoder):
    vtransform = r50_encoder["vtransform"]
    assert vtransform.dx.tolist() == pytest.approx([0.3, 0.3, 20.0])
    assert vtransform.bx.tolist() == pytest.approx([-53.85, -53.85, 0.0])
    assert vtransform.nx.tolist() == [360, 360, 1] and not vtransform.nx.requires_grad
    frustum = vtransform.frustum
    assert frustum[5, 7, 11].tolist() == pytest.approx([11 * 703 / 87, 7 * 255 / 31, 1 + 0.5 * 5])
    assert frustum[117, 31, 87].tolist() == pytest.approx([703, 255, 59.5])
    convs = [m for m in r50_encoder["backbone"].modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * (3 + 4 + 6 + 3) + 4   # stem + 3 per Bottleneck + 4 downsample


def test_r50_resnet_is_pytorch_style_stride_on_conv2(r50_encoder):
    backbone = r50_encoder["backbone"]
    for stage, stride in zip((1, 2, 3, 4), (1, 2, 2, 2)):
        first = getattr(backbone, f"layer{stage}")[0]
        assert first.conv1.stride == (1, 1)
        assert first.conv2.stride == (stride, stride)
        assert first.downsample[0].stride == (stride, stride)
    assert (backbone.conv1.stride, backbone.conv1.padding) == ((2, 2), (3, 3))
    assert (backbone.maxpool.kernel_size, backbone.maxpool.stride, backbone.maxpool.padding) == (3, 2, 1)


# ---------------------------------------------------------------- tiny (numerics)

@pytest.fixture(scope="module")
def tiny_encoder() -> nn.ModuleDict:
    torch.manual_seed(0)
    encoder = build_camera_encoder(TINY)
    randomize_batchnorm(encoder, seed=1)
    return encoder.eval()


@pytest.fixture(scope="module")
def tiny_onnx_paths(tiny_encoder, tmp_path_factory):
    return export_camera_onnx(tiny_encoder, TINY, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_sessions(tiny_onnx_paths):
    """(camera.backbone, camera.vtransform) ONNX Runtime CPU sessions."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return tuple(ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                 for p in tiny_onnx_paths)


@pytest.fixture(scope="module")
def tiny_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return camera_sample_inputs(TINY, seed=7)


@pytest.fixture(scope="module")
def tiny_torch_outputs(tiny_encoder, tiny_inputs) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        feature, weights = CameraBackboneExport(tiny_encoder, TINY)(*tiny_inputs)
    return feature.numpy(), weights.numpy()


def test_tiny_backbone_onnx_runtime_equals_pytorch(tiny_sessions, tiny_inputs, tiny_torch_outputs):
    backbone_session, _ = tiny_sessions
    img, depth = tiny_inputs
    feature, weights = backbone_session.run(["camera_feature", "camera_depth_weights"],
                                            {"img": img.numpy(), "depth": depth.numpy()})
    torch_feature, torch_weights = tiny_torch_outputs
    geometry = TINY.pipeline.camera_geometry
    assert feature.shape == (6, geometry.feature_height, geometry.feature_width,
                             geometry.camera_channels)
    assert weights.shape == (6, geometry.depth_bins, geometry.feature_height, geometry.feature_width)
    assert relative_error(feature, torch_feature) < 1e-4
    assert relative_error(weights, torch_weights) < 1e-4
    assert np.abs(torch_feature).max() > 0.1   # a dead network would make the comparison vacuous
    np.testing.assert_allclose(weights.astype(np.float64).sum(axis=1), 1.0, atol=1e-5)


def test_tiny_batchnorm_is_folded_into_convs(tiny_onnx_paths):
    backbone_path, vtransform_path = tiny_onnx_paths
    # backbone graph: stem + 3 per Bottleneck + 4 downsample, 2 x 2 neck, 3 dtransform, 3 depthnet
    for path, expected_convs in ((backbone_path, 1 + 4 * 3 + 4 + 2 * 2 + 3 + 3), (vtransform_path, 3)):
        model = onnx.load(str(path))
        ops = [node.op_type for node in model.graph.node]
        assert "BatchNormalization" not in ops
        assert ops.count("Conv") == expected_convs


def test_tiny_vtransform_onnx_runtime_equals_pytorch(tiny_encoder, tiny_sessions):
    _, vtransform_session = tiny_sessions
    bev_x, bev_y = TINY.camera_bev_size
    channels = TINY.pipeline.camera_geometry.camera_channels
    feat_in = torch.rand((1, channels, bev_x, bev_y), generator=torch.Generator().manual_seed(3))
    (feat_out,) = vtransform_session.run(["feat_out"], {"feat_in": feat_in.numpy()})
    with torch.no_grad():
        expected = VTransformExport(tiny_encoder)(feat_in).numpy()
    assert feat_out.shape == (1, channels, bev_x // 2, bev_y // 2)
    assert np.abs(expected).max() > 0.1
    assert relative_error(feat_out, expected) < 1e-4


def test_tiny_outputs_are_softmax_depth_and_nhwc_context(tiny_encoder, tiny_inputs, tiny_torch_outputs):
    """Recompute depthnet by hand (module by module) and split/permute it with numpy."""
    img, depth = tiny_inputs
    encoder = tiny_encoder
    with torch.no_grad():
        c3_c4_c5 = encoder["backbone"](img[0])
        p3 = encoder["neck"](c3_c4_c5)[0]
        depth_features = encoder["vtransform"].dtransform(depth[0])
        depthnet_out = encoder["vtransform"].depthnet(torch.cat([depth_features, p3], dim=1)).numpy()
    geometry = TINY.pipeline.camera_geometry
    bins, channels = geometry.depth_bins, geometry.camera_channels
    assert depthnet_out.shape[1] == bins + channels
    feature, weights = tiny_torch_outputs

    np.testing.assert_array_equal(feature, np.transpose(depthnet_out[:, bins:], (0, 2, 3, 1)))
    assert feature[2, 5, 7, 3] == depthnet_out[2, bins + 3, 5, 7]

    logits = depthnet_out[:, :bins].astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(weights, exp / exp.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(weights.astype(np.float64).sum(axis=1), 1.0, atol=1e-5)
    assert weights.min() >= 0.0


def test_tiny_neck_dataflow_brute_force(tiny_encoder, tiny_inputs):
    """P4 = f1(cat[C4, up(C5)]), P3 = f0(cat[C3, up(P4)]), bilinear align_corners=False, float64."""
    img, _ = tiny_inputs
    neck = tiny_encoder["neck"]
    with torch.no_grad():
        c3, c4, c5 = tiny_encoder["backbone"](img[0])
        p3, p4 = neck((c3, c4, c5))
        c3, c4, c5 = c3.double(), c4.double(), c5.double()

        def level(lower: torch.Tensor, upper: torch.Tensor, index: int) -> torch.Tensor:
            upsampled = F.interpolate(upper, size=tuple(lower.shape[-2:]), mode="bilinear",
                                      align_corners=False)
            lateral = conv_bn_relu64(torch.cat([lower, upsampled], dim=1), neck.lateral_convs[index])
            return conv_bn_relu64(lateral, neck.fpn_convs[index])

        expected_p4 = level(c4, c5, 1)
        expected_p3 = level(c3, expected_p4, 0)
    spec = TINY.camera
    base = spec.resnet_base_channels
    assert (c3.shape[1], c4.shape[1], c5.shape[1]) == (8 * base, 16 * base, 32 * base)
    assert c3.shape[-2:] == (TINY.pipeline.camera_geometry.feature_height,
                             TINY.pipeline.camera_geometry.feature_width)
    assert c4.shape[-2:] == (c3.shape[-2] // 2, c3.shape[-1] // 2)
    assert p3.shape == (6, spec.neck_out_channels, *c3.shape[-2:])
    assert expected_p3.abs().max() > 0.1
    torch.testing.assert_close(p4.double(), expected_p4, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p3.double(), expected_p3, rtol=1e-5, atol=1e-5)


def test_tiny_state_dict_has_r50_names():
    tiny_names = set(build_camera_encoder(TINY).state_dict())
    r50_names = {n for n in expected_r50_state_dict_shapes()
                 if not n.startswith("backbone.layer") or n.split(".")[2] == "0"}
    assert tiny_names == r50_names   # tiny has one Bottleneck per stage, same names otherwise


def test_export_switches_to_eval_mode(tmp_path):
    encoder = build_camera_encoder(TINY).train()
    export_camera_onnx(encoder, TINY, tmp_path)
    assert not any(module.training for module in encoder.modules())


def test_depthnet_width_must_match_neck():
    preset = replace(TINY, camera=replace(TINY.camera, depthnet_channels=16))
    with pytest.raises(ValueError, match="depthnet_channels"):
        build_camera_encoder(preset)


# ---------------------------------------------------------------- sample inputs

@pytest.mark.parametrize("preset", [TINY, NUSCENES_R50], ids=lambda p: p.name)
def test_camera_sample_inputs_look_like_network_inputs(preset):
    img, depth = camera_sample_inputs(preset, seed=5)
    image = preset.pipeline.image
    assert img.shape == (1, 6, 3, image.output_height, image.output_width)
    assert depth.shape == (1, 6, 1, image.output_height, image.output_width)
    assert img.dtype == depth.dtype == torch.float32
    std, mean = (torch.tensor(values, dtype=torch.float64).view(1, 1, 3, 1, 1)
                 for values in (image.std, image.mean))
    pixels = img.double() * std + mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert pixels.min() < 0.01 and pixels.max() > 0.99
    hits = depth[depth != 0]
    assert 0.045 < hits.numel() / depth.numel() < 0.055
    low, high, _ = preset.pipeline.camera_geometry.dbound
    assert hits.min() >= low and hits.max() <= high
    assert hits.min() < low + 1 and hits.max() > high - 1


def test_camera_sample_inputs_are_reproducible():
    first = camera_sample_inputs(TINY, seed=11)
    again = camera_sample_inputs(TINY, seed=11)
    other = camera_sample_inputs(TINY, seed=12)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
