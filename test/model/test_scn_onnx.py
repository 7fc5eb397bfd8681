"""lidar.backbone.xyz.onnx: the nuscenes-r50 graph against spec 5.3/5.4, BN folding, round trip and runner."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")

from bevfusion_ros.lidar.scn_graph import read_scn_onnx  # noqa: E402
from bevfusion_ros.model.presets import NUSCENES_R50, TINY  # noqa: E402
from bevfusion_ros.model.scn_onnx import run_scn_graph, scn_graph_from_encoder, write_scn_onnx  # noqa: E402
from bevfusion_ros.model.sparse_encoder import SparseEncoder, voxel_sample_inputs  # noqa: E402

# Spec 5.4 wiring: node name, op, data inputs -> output (tensor ids in creation order, "0" = graph input).
EXPECTED_WIRING = """
conv0 SparseConvolution 0 1 | conv1 SparseConvolution 1 2 | conv2 SparseConvolution 2 3 | add0 Add 3,1 4
relu0 Relu 4 5 | conv3 SparseConvolution 5 6 | conv4 SparseConvolution 6 7 | add1 Add 7,5 8 | relu1 Relu 8 9
conv5 SparseConvolution 9 10
conv6 SparseConvolution 10 11 | conv7 SparseConvolution 11 12 | add2 Add 12,10 13 | relu2 Relu 13 14
conv8 SparseConvolution 14 15 | conv9 SparseConvolution 15 16 | add3 Add 16,14 17 | relu3 Relu 17 18
conv10 SparseConvolution 18 19
conv11 SparseConvolution 19 20 | conv12 SparseConvolution 20 21 | add4 Add 21,19 22 | relu4 Relu 22 23
conv13 SparseConvolution 23 24 | conv14 SparseConvolution 24 25 | add5 Add 25,23 26 | relu5 Relu 26 27
conv15 SparseConvolution 27 28
conv16 SparseConvolution 28 29 | conv17 SparseConvolution 29 30 | add6 Add 30,28 31 | relu6 Relu 31 32
conv18 SparseConvolution 32 33 | conv19 SparseConvolution 33 34 | add7 Add 34,32 35 | relu7 Relu 35 36
conv20 SparseConvolution 36 37
scatter0 ScatterDense 37 38 | transpose0 Transpose 38 39 | reshape0 Reshape 39 40
"""
GRIDS = [(1440, 1440, 41), (720, 720, 21), (360, 360, 11), (180, 180, 5), (180, 180, 2)]


def expected_convs() -> list[dict]:
    """Spec 5.4 table, one dict of attributes per SparseConvolution node (conv0 ... conv20)."""
    def conv(rulebook, subm, cin, cout, grid_in, grid_out, activation, kernel=(3, 3, 3), stride=(1, 1, 1),
             padding=(1, 1, 1)):
        return dict(rulebook=rulebook, subm=subm, in_channels=cin, out_channels=cout, kernel_size=kernel,
                    stride=stride, padding=padding, activation=activation,
                    input_spatial_shape=GRIDS[grid_in], output_spatial_shape=GRIDS[grid_out])

    rows = [conv("subm1", 1, 5, 16, 0, 0, "ReLU")]
    downs = [(32, (1, 1, 1)), (64, (1, 1, 1)), (128, (1, 1, 0)), None]
    for stage, (channels, down) in enumerate(zip((16, 32, 64, 128), downs)):
        key = f"subm{stage + 1}"
        rows += [conv(key, 1, channels, channels, stage, stage, activation)
                 for _ in range(2) for activation in ("ReLU", "None")]
        if down is not None:
            rows.append(conv(f"spconv{stage + 1}", 0, channels, down[0], stage, stage + 1, "ReLU",
                             stride=(2, 2, 2), padding=down[1]))
    rows.append(conv("spconv_down2", 0, 128, 128, 3, 4, "ReLU", kernel=(1, 1, 3), stride=(1, 1, 2),
                     padding=(0, 0, 0)))
    return rows


def conv_bn_paths() -> list[tuple[str, str]]:
    """mit-han-lab module paths (conv, its BN) in spec 5.4 order."""
    paths = [("conv_input.0", "conv_input.1")]
    for stage in range(1, 5):
        prefix = f"encoder_layers.encoder_layer{stage}"
        paths += [(f"{prefix}.{block}.conv{i}", f"{prefix}.{block}.bn{i}")
                  for block in (0, 1) for i in (1, 2)]
        if stage < 4:
            paths.append((f"{prefix}.2.0", f"{prefix}.2.1"))
    return paths + [("conv_out.0", "conv_out.1")]


def fold_batchnorm(encoder) -> list:
    """The encoder's 21 convolutions with BN folded in, in spec 5.4 order (conv0 ... conv20)."""
    return [node.layer for node in scn_graph_from_encoder(encoder) if node.layer is not None]


def independent_fold(encoder) -> list[tuple[np.ndarray, np.ndarray]]:
    """Float64 BN folding from the state dict: (weight [kx,ky,kz,I,O], bias [O]) per conv."""
    state = {name: value.double().numpy() for name, value in encoder.state_dict().items()}
    folded = []
    for conv, bn in conv_bn_paths():
        scale = state[f"{bn}.weight"] / np.sqrt(state[f"{bn}.running_var"] + 1e-3)
        bias = state[f"{bn}.bias"] - state[f"{bn}.running_mean"] * scale
        folded.append((state[f"{conv}.weight"] * scale, bias))
    return folded


def encoder_input_amax(encoder, frames) -> tuple[list[float], list[float]]:
    """amax of every conv input and of both Add inputs (block input, bn2 output), by forward hooks on
    the unfolded encoder: (21 conv values in spec order, 8 Add values)."""
    modules = dict(encoder.named_modules())
    conv_amax, add_parts = [0.0] * 21, {}

    def conv_hook(index):
        def hook(_, inputs):
            conv_amax[index] = max(conv_amax[index], float(inputs[0].features.abs().max()))
        return hook

    def record(key):
        def hook(_, inputs, output=None):
            value = inputs[0].features if output is None else output
            add_parts[key] = max(add_parts.get(key, 0.0), float(value.abs().max()))
        return hook

    blocks = [name for name, m in modules.items() if hasattr(m, "bn2")]
    handles = [modules[conv].register_forward_pre_hook(conv_hook(index))
               for index, (conv, _) in enumerate(conv_bn_paths())]
    for name in blocks:
        handles += [modules[name].register_forward_pre_hook(record((name, "identity"))),
                    modules[f"{name}.bn2"].register_forward_hook(record((name, "bn2")))]
    with torch.no_grad():
        for features, coords in frames:
            encoder(features, coords)
    for handle in handles:
        handle.remove()
    return conv_amax, [max(add_parts[(name, "identity")], add_parts[(name, "bn2")]) for name in blocks]


@pytest.fixture(scope="module")
def r50(tmp_path_factory, randomized_encoder):
    encoder = randomized_encoder(NUSCENES_R50, seed=10)
    frames = [voxel_sample_inputs(NUSCENES_R50, seed, num_voxels=100) for seed in (11, 12)]
    path = tmp_path_factory.mktemp("scn") / "lidar.backbone.xyz.onnx"
    write_scn_onnx(encoder, NUSCENES_R50, path, calibration_inputs=frames)
    return encoder, frames, onnx.load(str(path))


@pytest.fixture(scope="module")
def r50_amax(r50):
    encoder, frames, _ = r50
    return encoder_input_amax(encoder, frames)


def attributes(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_graph_io_opset_and_producer(r50):
    _, _, model = r50
    assert [(o.domain, o.version) for o in model.opset_import] == [("ai.onnx", 11)]
    assert (model.producer_name, model.producer_version) == ("pytorch", "1.9")
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output
    for value, name, shape in ((graph_input, "0", [1, 5]), (graph_output, "40", [1, 256, 180, 180])):
        assert value.name == name
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        assert [d.dim_value for d in value.type.tensor_type.shape.dim] == shape


def test_nodes_and_wiring_follow_spec_5_4(r50):
    _, _, model = r50
    expected = [entry.split() for line in EXPECTED_WIRING.strip().splitlines() for entry in line.split("|")]
    assert len(model.graph.node) == len(expected) == 40
    for node, (name, op_type, inputs, output) in zip(model.graph.node, expected):
        data_inputs = inputs.split(",")
        if op_type == "SparseConvolution":
            index = name[len("conv"):]
            data_inputs += [f"spconv{index}.weight", f"spconv{index}.bias"]
        assert (node.name, node.op_type, list(node.input), list(node.output), node.domain) == \
            (name, op_type, data_inputs, [output], "")


def test_sparse_convolution_attributes(r50, r50_amax):
    encoder, frames, model = r50
    convs = [node for node in model.graph.node if node.op_type == "SparseConvolution"]
    folded = independent_fold(encoder)
    conv_amax, _ = r50_amax
    assert conv_amax[0] == pytest.approx(max(float(f.abs().max()) for f, _ in frames))   # raw features
    for index, (node, table, (weight, _)) in enumerate(zip(convs, expected_convs(), folded)):
        attrs = attributes(node)
        constant = dict(ndim=3, dilation=[1, 1, 1], output_padding=[0, 0, 0], transposed=0, inverse=0,
                        groups=1, output_bound=200000, input_shape=[1, table["in_channels"]],
                        output_shape=[1, table["out_channels"]],
                        precision=b"fp16" if index == 0 else b"int8",
                        output_precision=b"fp16" if index == 20 else b"int8")
        as_onnx = {k: list(v) if isinstance(v, tuple) else v.encode() if isinstance(v, str) else v
                   for k, v in table.items()}                          # ints, lists, bytes strings
        expected = {**constant, **as_onnx}
        ranges = {k: attrs.pop(k) for k in ("input_dynamic_range", "weight_dynamic_ranges")}
        assert attrs == expected, node.name
        assert ranges["input_dynamic_range"] == pytest.approx(conv_amax[index], rel=1e-4)
        np.testing.assert_allclose(ranges["weight_dynamic_ranges"], np.abs(weight).max(axis=(0, 1, 2, 3)),
                                   rtol=1e-6)


def test_add_relu_and_tensor_op_attributes(r50, r50_amax):
    _, _, model = r50
    _, add_amax = r50_amax
    adds = [node for node in model.graph.node if node.op_type == "Add"]
    for node, amax in zip(adds, add_amax, strict=True):
        attrs = attributes(node)
        assert attrs["input0_dynamic_range"] == attrs["input1_dynamic_range"] == pytest.approx(amax, rel=1e-4)
        assert (attrs["precision"], attrs["output_precision"], len(attrs)) == (b"int8", b"int8", 4)
    assert all(not node.attribute for node in model.graph.node if node.op_type == "Relu")
    scatter, transpose, reshape = model.graph.node[-3:]
    assert attributes(scatter) == {"input_spatial_shape": [180, 180, 2], "format": b"xyz",
                                   "output_shape": [1, 128, 180, 180, 2]}
    assert attributes(transpose) == {"dims": [0, 1, 4, 2, 3]}
    assert attributes(reshape) == {"dims": [1, 256, 180, 180]}


def test_weight_initializers_are_the_folded_weights_in_fp16(r50):
    encoder, _, model = r50
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    assert len(initializers) == 42
    for index, (weight, bias) in enumerate(independent_fold(encoder)):
        for name, expected in ((f"spconv{index}.weight", weight.transpose(4, 0, 1, 2, 3)),
                               (f"spconv{index}.bias", bias)):
            tensor = initializers[name]
            assert tensor.data_type == onnx.TensorProto.FLOAT16
            assert list(tensor.dims) == list(expected.shape)
            assert len(tensor.raw_data) == 2 * math.prod(expected.shape)        # libspconv reads raw_data
            # fp16 rounding: relative 2**-11 for normal numbers, absolute 2**-25 for subnormals.
            np.testing.assert_allclose(numpy_helper.to_array(tensor).astype(np.float64), expected,
                                       rtol=2.0 ** -11, atol=2.0 ** -25)
    assert initializers["spconv0.weight"].dims == [16, 3, 3, 3, 5]
    assert initializers["spconv20.weight"].dims == [128, 1, 1, 3, 128]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, randomized_encoder):
    encoder = randomized_encoder(TINY, seed=20)
    frames = [voxel_sample_inputs(TINY, seed=21, num_voxels=1500)]
    path = tmp_path_factory.mktemp("scn") / "tiny.onnx"
    written = write_scn_onnx(encoder, TINY, path, calibration_inputs=frames)
    return encoder, path, written


@pytest.fixture(scope="module")
def tiny_frame(tiny):
    """A frame other than the calibration one, and the float32 encoder's BEV of it."""
    features, coords = voxel_sample_inputs(TINY, seed=22, num_voxels=1500)
    with torch.no_grad():
        expected = tiny[0](features, coords)
    assert expected.shape == (1, 2 * TINY.lidar.output_channels, *TINY.bev_size)
    assert expected.abs().max() > 0
    return features, coords, expected


def assert_same_attributes(ours: dict, theirs: dict) -> None:
    """Equal keys and values; floats to float32 precision (ONNX stores FLOAT/FLOATS as float32)."""
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        if isinstance(value, float) or (isinstance(value, tuple) and value and isinstance(value[0], float)):
            np.testing.assert_allclose(theirs[name], value, rtol=1e-6, err_msg=name)
        else:
            assert theirs[name] == value, name


def test_round_trip_gives_back_the_written_nodes(tiny):
    encoder, path, written = tiny
    read = read_scn_onnx(path)
    folded = fold_batchnorm(encoder)
    assert len(read) == len(written) == 40 and len(folded) == 21
    for ours, theirs in zip(written, read):
        assert (ours.op_type, ours.name, ours.inputs, ours.outputs) == \
            (theirs.op_type, theirs.name, theirs.inputs, theirs.outputs)
        assert_same_attributes(ours.attributes, theirs.attributes)
    for layer, parsed in zip(folded, [node.layer for node in read if node.layer is not None], strict=True):
        assert parsed.weight.dtype == np.float16 and parsed.weight.shape == layer.weight.shape
        np.testing.assert_array_equal(parsed.weight, layer.weight.astype(np.float16))
        np.testing.assert_array_equal(parsed.bias, layer.bias.astype(np.float16))
        for field in ("kernel_size", "stride", "padding", "subm", "rulebook", "activation",
                      "input_spatial_shape", "output_spatial_shape"):
            assert getattr(parsed, field) == getattr(layer, field), field


def test_folded_float32_graph_reproduces_the_encoder(tiny, tiny_frame):
    features, coords, expected = tiny_frame
    with torch.no_grad():
        ours = run_scn_graph(scn_graph_from_encoder(tiny[0]), features, coords,
                             TINY.pipeline.voxelization.sparse_shape)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_parsed_fp16_graph_reproduces_the_encoder(tiny, tiny_frame):
    """fp16 weights/biases, float32 arithmetic, float32 input features: the deviation from the float32
    encoder stays below 0.2 % of the output's max magnitude (measured 0.032-0.036 % on tiny and on the
    example frame with nuscenes-r50, seeded random weights)."""
    features, coords, expected = tiny_frame
    with torch.no_grad():
        ours = run_scn_graph(read_scn_onnx(tiny[1]), features, coords,
                             TINY.pipeline.voxelization.sparse_shape)
    scale = float(expected.abs().max())
    error = float((ours - expected).abs().max())
    assert 0 < error < 2e-3 * scale


def test_default_calibration_is_a_synthetic_frame(tmp_path, randomized_encoder):
    encoder = randomized_encoder(TINY, seed=30)
    nodes = write_scn_onnx(encoder, TINY, tmp_path / "scn.onnx")
    features, _ = voxel_sample_inputs(TINY, seed=0, num_voxels=1000)
    assert nodes[0].attributes["input_dynamic_range"] == pytest.approx(float(features.abs().max()))
    assert all(node.attributes["input_dynamic_range"] > 0 for node in nodes if node.layer is not None)


def test_writer_rejects_an_encoder_of_another_preset(tmp_path):
    with pytest.raises(ValueError, match="grid"):
        write_scn_onnx(SparseEncoder(TINY), NUSCENES_R50, tmp_path / "scn.onnx")


def attribute_named(node, name):
    return next(a for a in node.attribute if a.name == name)


def float32_initializer(model):
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first).astype(np.float32), first.name))


def grouped_conv(model):
    attribute_named(model.graph.node[0], "groups").i = 2


def unknown_op(model):
    model.graph.node[2].op_type = "MaxPool"


def missing_rulebook(model):
    model.graph.node[1].attribute.remove(attribute_named(model.graph.node[1], "rulebook"))


@pytest.mark.parametrize("corrupt, message", [
    (float32_initializer, "only FLOAT16"), (grouped_conv, "unsupported groups"),
    (unknown_op, "unsupported op"), (missing_rulebook, "missing attribute"),
])
def test_reader_rejects_what_libspconv_cannot_run(tiny, tmp_path, corrupt, message):
    model = onnx.load(str(tiny[1]))
    corrupt(model)
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(ValueError, match=message):
        read_scn_onnx(tmp_path / "bad.onnx")
