"""int8 Q/DQ insertion: graph form, calibrated scales against numpy, accuracy against float."""
from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
onnxruntime = pytest.importorskip("onnxruntime")

from bevfusion_ros.model.quantize import quantize_qdq  # noqa: E402


class SmallNet(torch.nn.Module):
    """Conv-BN-ReLU, a strided conv, a transposed conv and a softmax: the op mix of our models."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                        torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.down = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(16, 8, 2, stride=2)

    def forward(self, x):
        features = self.up(torch.relu(self.down(self.stem(x))))
        return features.softmax(dim=1)


def export(model, sample) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(model, (sample,), buffer, dynamo=False, opset_version=13,
                      input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def float_and_int8():
    torch.manual_seed(0)
    model = SmallNet().eval()
    with torch.no_grad():
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    float_model = export(model, torch.from_numpy(samples[0]["x"]))
    int8_model, report = quantize_qdq(float_model, samples)
    return model, float_model, int8_model, report, samples


def run(model: onnx.ModelProto, inputs):
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def test_every_conv_reads_dequantized_activation_and_int8_weight(float_and_int8):
    _, float_model, int8_model, report, _ = float_and_int8
    producers = {out: node for node in int8_model.graph.node for out in node.output}
    initializers = {init.name: init for init in int8_model.graph.initializer}
    convs = [node for node in int8_model.graph.node if node.op_type in ("Conv", "ConvTranspose")]
    assert len(convs) == 3 and len(report.quantized_nodes) == 3
    for conv in convs:
        activation_dq, weight_dq = producers[conv.input[0]], producers[conv.input[1]]
        assert activation_dq.op_type == weight_dq.op_type == "DequantizeLinear"
        assert producers[activation_dq.input[0]].op_type == "QuantizeLinear"
        weight = numpy_helper.to_array(initializers[weight_dq.input[0]])
        scale = numpy_helper.to_array(initializers[weight_dq.input[1]])
        zero = numpy_helper.to_array(initializers[weight_dq.input[2]])
        axis = next(a.i for a in weight_dq.attribute if a.name == "axis")
        assert weight.dtype == np.int8 and (zero == 0).all()
        assert axis == (1 if conv.op_type == "ConvTranspose" else 0)
        assert scale.shape == (weight.shape[axis],)
        assert np.abs(weight).max() == 127                 # symmetric: the largest weight maps to 127
    softmax = [node for node in int8_model.graph.node if node.op_type == "Softmax"]
    assert producers[softmax[0].input[0]].op_type == "ConvTranspose"   # softmax input stays float


def test_activation_scales_equal_numpy_amax(float_and_int8):
    model, _, int8_model, report, samples = float_and_int8
    with torch.no_grad():
        stem = [model.stem(torch.from_numpy(s["x"])) for s in samples]
        down = [torch.relu(model.down(t)) for t in stem]
    expected = sorted([max(np.abs(s["x"]).max() for s in samples),
                       max(float(t.abs().max()) for t in stem), max(float(t.abs().max()) for t in down)])
    np.testing.assert_allclose(sorted(report.activation_amax.values()), expected, rtol=1e-5)


def test_int8_output_close_to_float_and_fake_quant_reference(float_and_int8):
    model, float_model, int8_model, _, samples = float_and_int8
    inputs = samples[1]
    float_out, int8_out = run(float_model, inputs), run(int8_model, inputs)
    with torch.no_grad():
        torch_out = model(torch.from_numpy(inputs["x"])).numpy()
    np.testing.assert_allclose(float_out, torch_out, rtol=1e-4, atol=1e-6)
    relative = np.linalg.norm(int8_out - float_out) / np.linalg.norm(float_out)
    assert 0 < relative < 0.02                       # quantized, and close


def test_skip_nodes_leave_conv_float(float_and_int8):
    _, float_model, _, _, samples = float_and_int8
    weight_name = next(n.input[1] for n in float_model.graph.node if n.op_type == "ConvTranspose")
    partial, report = quantize_qdq(float_model, samples[:1], skip_nodes=[weight_name])
    assert len(report.quantized_nodes) == 2 and len(report.skipped_nodes) == 1
    producers = {out: node for node in partial.graph.node for out in node.output}
    transposed = next(n for n in partial.graph.node if n.op_type == "ConvTranspose")
    assert transposed.input[1] == weight_name and producers[transposed.input[0]].op_type == "Relu"
