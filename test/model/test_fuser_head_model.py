"""Fuser, BEV decoder and TransFusion head (spec 2.4, 2.5, 6.2).

nuscenes-r50: ONNX interfaces and mit-han-lab state-dict names/shapes. tiny: ONNX Runtime
against PyTorch, the fuser/decoder against a float64 re-computation from checkpoint keys, the
proposal selection against brute-force loops, the decoder layer against torch's own attention.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
onnxruntime = pytest.importorskip("onnxruntime")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bevfusion_ros.model.fuser import (  # noqa: E402
    FuserExport,
    build_decoder,
    build_fuser,
    export_fuser_head_onnx,
    fuser_sample_inputs,
)
from bevfusion_ros.model.head import (  # noqa: E402
    HEATMAP_PRIOR_BIAS,
    HeadExport,
    LocalMaxSuppression,
    TransformerDecoderLayer,
    TransFusionHead,
    bev_cell_centres,
    head_sample_inputs,
    select_top_proposals,
)
from bevfusion_ros.model.presets import NUSCENES_R50, TINY  # noqa: E402

UNSUPPRESSED = ("pedestrian", "traffic_cone")


def build_modules(preset, seed: int) -> nn.ModuleDict:
    """fuser, decoder and heads.object laid out as mit-han-lab's BEVFusion model, eval mode."""
    torch.manual_seed(seed)
    return nn.ModuleDict({
        "fuser": build_fuser(preset),
        "decoder": build_decoder(preset),
        "heads": nn.ModuleDict({"object": TransFusionHead(preset)}),
    }).eval()


@torch.no_grad()
def randomize_batchnorm(module: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine terms, so BN folding in the export is exercised."""
    generator = torch.Generator().manual_seed(seed)
    for norm in module.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            channels = norm.num_features
            norm.running_mean.copy_(0.2 * torch.randn(channels, generator=generator))
            norm.running_var.copy_(0.5 + 1.5 * torch.rand(channels, generator=generator))
            norm.weight.copy_(0.5 + torch.rand(channels, generator=generator))
            norm.bias.copy_(0.2 * torch.randn(channels, generator=generator))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# -- independent references ------------------------------------------------------------------

def brute_force_suppression(probabilities: np.ndarray, class_names) -> np.ndarray:
    """[C, X, Y] -> same with every non-local-maximum zeroed, one cell at a time (spec 6.2.2)."""
    classes, x_size, y_size = probabilities.shape
    kept = np.zeros_like(probabilities)
    for c in range(classes):
        exempt = class_names[c] in UNSUPPRESSED
        for x in range(x_size):
            for y in range(y_size):
                value = probabilities[c, x, y]
                if exempt:
                    keep = True
                elif 1 <= x < x_size - 1 and 1 <= y < y_size - 1:
                    keep = value == probabilities[c, x - 1:x + 2, y - 1:y + 2].max()
                else:
                    keep = False            # border: local max is 0 there
                kept[c, x, y] = value if keep else 0.0
    return kept


def brute_force_kept(out) -> np.ndarray:
    """Brute-force suppression of a tiny head output's dense heatmap (its float32 sigmoid)."""
    return brute_force_suppression(torch.sigmoid(out.dense_heatmap)[0].numpy(),
                                   TINY.pipeline.head.class_names)


def brute_force_top_k(kept: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k of the class-major flattening -> (class, x, y) arrays, by argsort."""
    _, x_size, y_size = kept.shape
    order = np.argsort(-kept.ravel(), kind="stable")[:k]
    cls, cell = np.divmod(order, x_size * y_size)
    x, y = np.divmod(cell, y_size)
    return cls, x, y


def assert_unambiguous_top_k(values: np.ndarray, k: int, margin: float) -> None:
    """The k+1 largest values differ pairwise by more than ``margin`` (no top-k ties)."""
    top = np.sort(values.ravel())[::-1][:k + 1]
    assert np.all(-np.diff(top) > margin), f"top-{k} values too close: min gap {-np.diff(top).min()}"


def conv_bn_relu64(x, state, conv: str, norm: str, eps: float, stride: int = 1, transpose: bool = False):
    """float64 conv (padding k//2, or transposed k=s) + eval BN + ReLU from state-dict keys."""
    weight = state[f"{conv}.weight"]
    if transpose:
        y = F.conv_transpose2d(x, weight, stride=stride)
    else:
        y = F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2)
    scale = state[f"{norm}.weight"] / torch.sqrt(state[f"{norm}.running_var"] + eps)
    y = (y - state[f"{norm}.running_mean"][:, None, None]) * scale[:, None, None]
    return torch.relu(y + state[f"{norm}.bias"][:, None, None])


def reference_fuser_decoder(state, camera, lidar, spec):
    """ConvFuser + SECOND + SECONDFPN recomputed in float64 from mit-han-lab key names."""
    x = conv_bn_relu64(torch.cat([camera, lidar], dim=1), state, "fuser.0", "fuser.1", eps=1e-5)
    x_size, y_size = x.shape[-2:]
    stages = []
    for stage, (layer_num, stride) in enumerate(zip(spec.second_layer_nums, spec.second_strides)):
        for layer in range(layer_num + 1):
            prefix = f"decoder.backbone.blocks.{stage}"
            x = conv_bn_relu64(x, state, f"{prefix}.{3 * layer}", f"{prefix}.{3 * layer + 1}", eps=1e-3,
                               stride=stride if layer == 0 else 1)
        stages.append(x)
    upsampled = [conv_bn_relu64(stage_map, state, f"decoder.neck.deblocks.{i}.0",
                                f"decoder.neck.deblocks.{i}.1", eps=1e-3, stride=stride,
                                transpose=stride > 1)[..., :x_size, :y_size]
                 for i, (stage_map, stride) in enumerate(zip(stages, spec.fpn_upsample_strides))]
    return torch.cat(upsampled, dim=1)


def reference_decoder_layer(layer: TransformerDecoderLayer, num_heads: int, query, key,
                            query_pos, key_pos):
    """mit-han-lab's layer in float64, sequence-first, with torch's reference attention."""
    p = {name: value.double() for name, value in layer.state_dict().items()}
    channels = query.shape[1]

    def position_embedding(prefix, positions):                 # [B, P, 2] -> [P, B, C]
        h = positions @ p[f"{prefix}.0.weight"][:, :, 0].T + p[f"{prefix}.0.bias"]
        h = (h - p[f"{prefix}.1.running_mean"]) / torch.sqrt(p[f"{prefix}.1.running_var"] + 1e-5)
        h = torch.relu(h * p[f"{prefix}.1.weight"] + p[f"{prefix}.1.bias"])
        return (h @ p[f"{prefix}.3.weight"][:, :, 0].T + p[f"{prefix}.3.bias"]).transpose(0, 1)

    def attention(prefix, q, k, v):
        return F.multi_head_attention_forward(
            q, k, v, channels, num_heads, p[f"{prefix}.in_proj_weight"], p[f"{prefix}.in_proj_bias"],
            None, None, False, 0.0, p[f"{prefix}.out_proj.weight"], p[f"{prefix}.out_proj.bias"],
            training=False, need_weights=False)[0]

    def norm(name, x):
        return F.layer_norm(x, (channels,), p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-5)

    query_embed = position_embedding("self_posembed.position_embedding_head", query_pos.double())
    key_embed = position_embedding("cross_posembed.position_embedding_head", key_pos.double())
    x, memory = query.double().permute(2, 0, 1), key.double().permute(2, 0, 1)
    x = norm("norm1", x + attention("self_attn", x + query_embed, x + query_embed, x + query_embed))
    x = norm("norm2", x + attention("multihead_attn", x + query_embed, memory + key_embed,
                                    memory + key_embed))
    hidden = torch.relu(x @ p["linear1.weight"].T + p["linear1.bias"])
    x = norm("norm3", x + hidden @ p["linear2.weight"].T + p["linear2.bias"])
    return x.permute(1, 2, 0)


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def r50_model():
    return build_modules(NUSCENES_R50, seed=0)


@pytest.fixture(scope="module")
def r50_onnx(r50_model, tmp_path_factory):
    paths = export_fuser_head_onnx(r50_model["fuser"], r50_model["decoder"],
                                   r50_model["heads"]["object"], NUSCENES_R50,
                                   tmp_path_factory.mktemp("r50"))
    return {path.name: onnx.load(str(path)) for path in paths}


@pytest.fixture(scope="module")
def tiny_model():
    model = build_modules(TINY, seed=0)
    randomize_batchnorm(model, seed=4)   # a sample whose proposals mix suppressed and exempt classes
    return model


@pytest.fixture(scope="module")
def tiny_run(tiny_model):
    """(camera, lidar, middle, HeadOutput) on seeded random inputs."""
    camera, lidar = fuser_sample_inputs(TINY, seed=3)
    with torch.no_grad():
        middle = FuserExport(tiny_model["fuser"], tiny_model["decoder"])(camera, lidar)
        return camera, lidar, middle, tiny_model["heads"]["object"](middle)


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model, tmp_path_factory):
    return export_fuser_head_onnx(tiny_model["fuser"], tiny_model["decoder"],
                                  tiny_model["heads"]["object"], TINY, tmp_path_factory.mktemp("tiny"))


# -- nuscenes-r50: interfaces and names ------------------------------------------------------

R50_INTERFACES = {
    "fuser.onnx": ({"camera": [1, 80, 180, 180], "lidar": [1, 256, 180, 180]},
                   {"middle": [1, 512, 180, 180]}),
    "head.bbox.onnx": ({"middle": [1, 512, 180, 180]},
                       {"score": [1, 10, 200], "rot": [1, 2, 200], "dim": [1, 3, 200],
                        "reg": [1, 2, 200], "height": [1, 1, 200], "vel": [1, 2, 200]}),
}


def _io(values) -> dict[str, tuple[int, list[int]]]:
    return {v.name: (v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in values}


@pytest.mark.parametrize("name", sorted(R50_INTERFACES))
def test_r50_onnx_interfaces(r50_onnx, name):
    model = r50_onnx[name]
    onnx.checker.check_model(model)
    inputs, outputs = R50_INTERFACES[name]
    float32 = onnx.TensorProto.FLOAT
    assert list(_io(model.graph.input).items()) == [(k, (float32, v)) for k, v in inputs.items()]
    assert list(_io(model.graph.output).items()) == [(k, (float32, v)) for k, v in outputs.items()]
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert {node.domain for node in model.graph.node} == {""}          # standard ops only
    assert "BatchNormalization" not in {node.op_type for node in model.graph.node}


def test_r50_onnx_fuser_node_scopes_follow_module_names(r50_onnx):
    """Quantization skips layers by scope, e.g. '/decoder/neck/deblocks.0/' (spec 2.7)."""
    names = {node.name for node in r50_onnx["fuser.onnx"].graph.node}
    assert "/decoder/neck/deblocks.0/deblocks.0.0/Conv" in names
    assert "/decoder/neck/deblocks.1/deblocks.1.0/ConvTranspose" in names
    assert "/fuser/fuser.0/Conv" in names


MIT_HAN_LAB_ENTRIES = {   # name -> shape, from mit-han-lab's module definitions (spec 2.4, 6.2)
    "fuser.0.weight": (256, 336, 3, 3),
    "fuser.1.running_var": (256,),
    "decoder.backbone.blocks.0.0.weight": (128, 256, 3, 3),
    "decoder.backbone.blocks.0.15.weight": (128, 128, 3, 3),
    "decoder.backbone.blocks.0.16.num_batches_tracked": (),
    "decoder.backbone.blocks.1.0.weight": (256, 128, 3, 3),
    "decoder.backbone.blocks.1.16.bias": (256,),
    "decoder.neck.deblocks.0.0.weight": (256, 128, 1, 1),
    "decoder.neck.deblocks.1.0.weight": (256, 256, 2, 2),
    "decoder.neck.deblocks.1.1.running_mean": (256,),
    "heads.object.shared_conv.weight": (128, 512, 3, 3),
    "heads.object.shared_conv.bias": (128,),
    "heads.object.heatmap_head.0.conv.weight": (128, 128, 3, 3),
    "heads.object.heatmap_head.0.bn.running_mean": (128,),
    "heads.object.heatmap_head.1.weight": (10, 128, 3, 3),
    "heads.object.heatmap_head.1.bias": (10,),
    "heads.object.class_encoding.weight": (128, 10, 1),
    "heads.object.decoder.0.self_attn.in_proj_weight": (384, 128),
    "heads.object.decoder.0.self_attn.in_proj_bias": (384,),
    "heads.object.decoder.0.multihead_attn.out_proj.weight": (128, 128),
    "heads.object.decoder.0.linear1.weight": (256, 128),
    "heads.object.decoder.0.linear2.weight": (128, 256),
    "heads.object.decoder.0.norm3.bias": (128,),
    "heads.object.decoder.0.self_posembed.position_embedding_head.0.weight": (128, 2, 1),
    "heads.object.decoder.0.cross_posembed.position_embedding_head.1.running_var": (128,),
    "heads.object.decoder.0.cross_posembed.position_embedding_head.3.weight": (128, 128, 1),
    "heads.object.prediction_heads.0.center.0.conv.weight": (64, 128, 1),
    "heads.object.prediction_heads.0.center.0.bn.weight": (64,),
    "heads.object.prediction_heads.0.center.1.weight": (2, 64, 1),
    "heads.object.prediction_heads.0.height.1.bias": (1,),
    "heads.object.prediction_heads.0.dim.1.bias": (3,),
    "heads.object.prediction_heads.0.rot.1.bias": (2,),
    "heads.object.prediction_heads.0.vel.1.weight": (2, 64, 1),
    "heads.object.prediction_heads.0.heatmap.1.weight": (10, 64, 1),
}


def test_r50_state_dict_names_and_shapes_match_mit_han_lab(r50_model):
    state = r50_model.state_dict()
    assert {name: tuple(state[name].shape) for name in MIT_HAN_LAB_ENTRIES if name in state} \
        == MIT_HAN_LAB_ENTRIES
    head_children = {name.split(".")[2] for name in state if name.startswith("heads.object.")}
    assert head_children == {"shared_conv", "heatmap_head", "class_encoding", "decoder",
                             "prediction_heads"}
    ffn = [name for name in state if name.startswith("heads.object.prediction_heads.0.")]
    assert list(dict.fromkeys(name.split(".")[4] for name in ffn)) == [
        "center", "height", "dim", "rot", "vel", "heatmap"]
    decoder_norms = [m for m in r50_model["decoder"].modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(decoder_norms) == 14 and all(m.eps == 1e-3 and m.momentum == 0.01 for m in decoder_norms)
    assert (r50_model["fuser"][1].eps, r50_model["fuser"][1].momentum) == (1e-5, 0.1)


# -- tiny: numerics --------------------------------------------------------------------------

def test_fuser_and_decoder_match_float64_reference(tiny_model, tiny_run):
    camera, lidar, middle, _ = tiny_run
    state = {name: value.double() for name, value in tiny_model.state_dict().items()}
    expected = reference_fuser_decoder(state, camera.double(), lidar.double(), TINY.fuser)
    assert middle.shape == (1, sum(TINY.fuser.fpn_out_channels), *TINY.bev_size)
    assert relative_error(middle.numpy(), expected.numpy()) < 1e-5


def test_tiny_onnx_runtime_matches_pytorch(tiny_model, tiny_run, tiny_onnx):
    camera, lidar, middle, out = tiny_run
    fuser_path, head_path = tiny_onnx
    options = {"providers": ["CPUExecutionProvider"]}
    fuser = onnxruntime.InferenceSession(str(fuser_path), **options)
    (ort_middle,) = fuser.run(None, {"camera": camera.numpy(), "lidar": lidar.numpy()})
    assert relative_error(ort_middle, middle.numpy()) < 1e-4
    head = onnxruntime.InferenceSession(str(head_path), **options)
    assert [o.name for o in head.get_outputs()] == list(HeadExport.OUTPUT_NAMES)
    kept = brute_force_kept(out)
    assert_unambiguous_top_k(kept, TINY.pipeline.head.num_proposals, margin=1e-7)
    ort_outputs = head.run(None, {"middle": middle.numpy()})
    expected = (out.score, out.rot, out.dim, out.center, out.height, out.vel)
    for name, actual, reference in zip(HeadExport.OUTPUT_NAMES, ort_outputs, expected):
        assert actual.shape == tuple(reference.shape), name
        assert relative_error(actual, reference.numpy()) < 1e-4, name
    # the export neither left the modules in training mode nor folded the caller's decoder
    assert not tiny_model.training
    assert isinstance(tiny_model["decoder"]["neck"].deblocks[1][1], nn.BatchNorm2d)


def test_head_proposals_match_brute_force(tiny_run):
    *_, out = tiny_run
    class_names = TINY.pipeline.head.class_names
    k = TINY.pipeline.head.num_proposals
    _, y_size = TINY.bev_size
    kept = brute_force_kept(out)
    assert_unambiguous_top_k(kept, k, margin=0.0)
    cls, x, y = brute_force_top_k(kept, k)
    np.testing.assert_array_equal(out.proposal_class[0].numpy(), cls)
    np.testing.assert_array_equal(out.proposal_index[0].numpy(), x * y_size + y)
    np.testing.assert_array_equal(out.query_heatmap_score[0].numpy(), kept[:, x, y])
    # both suppressed and exempt classes are among the proposals in this sample
    assert {class_names[c] in UNSUPPRESSED for c in cls} == {True, False}


def test_head_score_is_prediction_times_heatmap_for_own_class_only(tiny_run):
    *_, out = tiny_run
    kept = brute_force_kept(out)
    cls, x, y = brute_force_top_k(kept, TINY.pipeline.head.num_proposals)
    logits = out.heatmap[0].numpy().astype(np.float64)
    expected = np.zeros_like(logits)
    proposals = np.arange(len(cls))
    expected[cls, proposals] = kept[cls, x, y] / (1.0 + np.exp(-logits[cls, proposals]))
    np.testing.assert_allclose(out.score[0].numpy(), expected, rtol=1e-6, atol=0)
    assert np.all(expected[cls, proposals] > 0)


def test_head_center_is_query_cell_centre_plus_offset(tiny_model, tiny_run):
    """With the center FFN's last conv zeroed, ``reg`` is exactly (x + 0.5, y + 0.5)."""
    _, _, middle, out = tiny_run
    head = copy.deepcopy(tiny_model["heads"]["object"])
    torch.nn.init.zeros_(head.prediction_heads[0].center[1].weight)
    torch.nn.init.zeros_(head.prediction_heads[0].center[1].bias)
    with torch.no_grad():
        centred = head(middle)
    x, y = np.divmod(out.proposal_index[0].numpy(), TINY.bev_size[1])
    np.testing.assert_array_equal(centred.center[0].numpy(), np.stack([x + 0.5, y + 0.5]))


def test_random_head_scores_start_near_the_class_prior():
    """Seeded random weights: both heatmap biases at -2.19 (prior 0.1), scores far from 0 and 1."""
    torch.manual_seed(0)
    head = TransFusionHead(TINY).eval()
    assert torch.all(head.heatmap_head[-1].bias == HEATMAP_PRIOR_BIAS)
    assert torch.all(head.prediction_heads[0].heatmap[-1].bias == HEATMAP_PRIOR_BIAS)
    with torch.no_grad():
        out = head(head_sample_inputs(TINY, seed=0))
    assert 0.05 < float(out.heatmap.sigmoid().median()) < 0.2
    best = out.score.max(dim=1).values
    assert float(best.min()) > 1e-3 and float(best.max()) < 0.2


# -- building blocks -------------------------------------------------------------------------

def test_local_max_and_top_k_on_non_square_grid():
    """x-major layout on X != Y: the selection and cell centres against loops (spec 6.2.3-4)."""
    class_names = TINY.pipeline.head.class_names
    x_size, y_size, k = 7, 11, 40
    generator = torch.Generator().manual_seed(5)
    heatmap = torch.rand(1, len(class_names), x_size, y_size, generator=generator)
    suppressed = LocalMaxSuppression(class_names, (x_size, y_size), kernel_size=3)(heatmap)
    kept = brute_force_suppression(heatmap[0].numpy(), class_names)
    np.testing.assert_array_equal(suppressed[0].numpy(), kept)
    proposal_class, proposal_index = select_top_proposals(suppressed.reshape(1, len(class_names), -1), k)
    cls, x, y = brute_force_top_k(kept, k)
    np.testing.assert_array_equal(proposal_class[0].numpy(), cls)
    np.testing.assert_array_equal(proposal_index[0].numpy(), x * y_size + y)
    centres = bev_cell_centres(x_size, y_size).numpy()
    for cx in range(x_size):
        for cy in range(y_size):
            assert tuple(centres[cx * y_size + cy]) == (cx + 0.5, cy + 0.5)


def test_decoder_layer_matches_reference_attention():
    """Our batch-first layer == mit-han-lab's sequence-first one (positional embedding added to
    the cross-attention key and value) built on torch's multi_head_attention_forward."""
    spec = TINY.head
    torch.manual_seed(7)
    layer = TransformerDecoderLayer(spec.hidden_channels, spec.num_heads, spec.ffn_channels, 0.1)
    randomize_batchnorm(layer, seed=8)
    with torch.no_grad():     # non-zero biases everywhere (the module initialises some to 0)
        for parameter in layer.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    layer.eval()
    generator = torch.Generator().manual_seed(9)
    query = torch.randn(2, spec.hidden_channels, 12, generator=generator)
    key = torch.randn(2, spec.hidden_channels, 30, generator=generator)
    query_pos = 10 * torch.rand(2, 12, 2, generator=generator)
    key_pos = 10 * torch.rand(2, 30, 2, generator=generator)
    with torch.no_grad():
        actual = layer(query, key, query_pos, key_pos)
        expected = reference_decoder_layer(layer, spec.num_heads, query, key, query_pos, key_pos)
    assert actual.shape == query.shape
    assert relative_error(actual.numpy(), expected.numpy()) < 1e-5
