"""NumPy sparse convolution and SCN graph runner: dense float64 convolutions, the example frame,
and the PyTorch graph runner on a tiny export."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from bevfusion_ros.io.tensor import read_tensor
from bevfusion_ros.lidar.scn import SparseEncoderRunner
from bevfusion_ros.lidar.scn_graph import read_scn_onnx
from bevfusion_ros.lidar.sparse_conv import ConvGeometry, build_rulebook, linear_keys, sparse_conv
from bevfusion_ros.lidar.voxelize import voxelize
from bevfusion_ros.model.presets import NUSCENES_R50, TINY

GRID = (9, 8, 7)


def dense_conv(dense: np.ndarray, weight: np.ndarray, stride, padding) -> np.ndarray:
    """Float64 cross-correlation: dense [I, X, Y, Z], weight [kx, ky, kz, I, O] -> [O, X', Y', Z']."""
    kernel = weight.shape[:3]
    out_shape = [(n + 2 * p - k) // s + 1 for n, k, s, p in zip(dense.shape[1:], kernel, stride, padding)]
    padded = np.pad(dense, [(0, 0)] + [(p, p) for p in padding])
    out = np.zeros((weight.shape[4], *out_shape))
    for tap in np.ndindex(*kernel):
        window = padded[(slice(None),) + tuple(slice(k, k + s * (n - 1) + 1, s)
                                               for k, s, n in zip(tap, stride, out_shape))]
        out += np.einsum("ixyz,io->oxyz", window, weight[tap].astype(np.float64))
    return out


def random_sites(rng, count: int, grid=GRID) -> np.ndarray:
    """``count`` unique sites (x, y, z) int32 [count, 3] in random order."""
    keys = rng.choice(math.prod(grid), size=count, replace=False)
    return np.stack(np.unravel_index(keys, grid), axis=1).astype(np.int32)


def densify(features: np.ndarray, coords: np.ndarray, grid=GRID) -> np.ndarray:
    dense = np.zeros((features.shape[1], *grid))
    dense[:, coords[:, 0], coords[:, 1], coords[:, 2]] = features.T
    return dense


def assert_one_to_one_per_tap(rulebook) -> None:
    """The scatter relies on it: within a tap no input and no output row repeats."""
    for in_rows, out_rows in zip(rulebook.in_rows, rulebook.out_rows):
        assert in_rows.size == out_rows.size == np.unique(in_rows).size == np.unique(out_rows).size


def conv_case(seed: int, kernel, channels=(4, 6)):
    rng = np.random.default_rng(seed)
    coords = random_sites(rng, 120)
    features = rng.normal(size=(120, channels[0])).astype(np.float32)
    weight = rng.normal(size=(*kernel, *channels)).astype(np.float16)     # fp16 like the ONNX file
    bias = rng.normal(size=channels[1]).astype(np.float16)
    return coords, features, weight, bias


@pytest.mark.parametrize("kernel, padding", [((3, 3, 3), (1, 1, 1)), ((1, 3, 3), (0, 1, 1)),
                                             ((1, 1, 3), (0, 0, 1))])
def test_subm_conv_matches_dense(kernel, padding):
    coords, features, weight, bias = conv_case(0, kernel)
    rulebook = build_rulebook(coords, GRID, ConvGeometry(kernel, (1, 1, 1), padding, subm=True))
    out = sparse_conv(features, weight, rulebook, bias)

    dense = dense_conv(densify(features, coords), weight, (1, 1, 1), padding)
    expected = dense[:, coords[:, 0], coords[:, 1], coords[:, 2]].T + bias
    np.testing.assert_array_equal(rulebook.out_coords, coords)
    assert out.dtype == np.float32 and rulebook.output_shape == GRID
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert_one_to_one_per_tap(rulebook)


@pytest.mark.parametrize("kernel, stride, padding", [
    ((3, 3, 3), (2, 2, 2), (1, 1, 1)),     # encoder down convs
    ((3, 3, 3), (2, 2, 2), (1, 1, 0)),     # encoder_layer3 down
    ((1, 1, 3), (1, 1, 2), (0, 0, 0)),     # conv_out
    ((2, 3, 3), (3, 1, 2), (0, 2, 1)),
])
def test_strided_conv_matches_dense(kernel, stride, padding):
    coords, features, weight, bias = conv_case(1, kernel)
    rulebook = build_rulebook(coords, GRID, ConvGeometry(kernel, stride, padding, subm=False))
    out = sparse_conv(features, weight, rulebook, bias)

    occupancy = dense_conv(densify(np.ones((len(coords), 1)), coords), np.ones((*kernel, 1, 1)),
                           stride, padding)[0]
    active = np.argwhere(occupancy > 0)                    # C order = ascending key
    dense = dense_conv(densify(features, coords), weight, stride, padding)
    assert rulebook.output_shape == occupancy.shape
    np.testing.assert_array_equal(rulebook.out_coords, active)
    np.testing.assert_allclose(out, dense[:, active[:, 0], active[:, 1], active[:, 2]].T + bias,
                               rtol=1e-5, atol=1e-5)
    assert_one_to_one_per_tap(rulebook)


def test_empty_sites_and_subm_stride():
    geometry = ConvGeometry((3, 3, 3), (2, 2, 2), (1, 1, 1), subm=False)
    empty = build_rulebook(np.zeros((0, 3), np.int32), GRID, geometry)
    assert empty.num_outputs == 0 and empty.output_shape == (5, 4, 4)
    assert sparse_conv(np.zeros((0, 4), np.float32), np.ones((3, 3, 3, 4, 2)), empty).shape == (0, 2)
    with pytest.raises(ValueError, match="stride 1"):
        ConvGeometry((3, 3, 3), (2, 2, 2), (1, 1, 1), subm=True)


def example_voxels(example_data_dir, preset):
    return voxelize(read_tensor(example_data_dir / "points.tensor"), preset.pipeline.voxelization)


def test_site_counts_on_example_frame(example_data_dir):
    """Spec 5.4 geometry on the nuscenes-r50 grid: sites per level of the encoder."""
    voxels = example_voxels(example_data_dir, NUSCENES_R50)
    coords, grid = voxels.coords[:, 1:], NUSCENES_R50.pipeline.voxelization.sparse_shape
    counts = [len(coords)]
    for padding in ((1, 1, 1), (1, 1, 1), (1, 1, 0)):
        rulebook = build_rulebook(coords, grid, ConvGeometry((3, 3, 3), (2, 2, 2), padding, subm=False))
        coords, grid = rulebook.out_coords, rulebook.output_shape
        counts.append(len(coords))
    subm = build_rulebook(coords, grid, ConvGeometry((3, 3, 3), (1, 1, 1), (1, 1, 1), subm=True))
    assert_one_to_one_per_tap(subm)
    out = build_rulebook(coords, grid, ConvGeometry((1, 1, 3), (1, 1, 2), (0, 0, 0), subm=False))
    counts.append(out.num_outputs)
    assert counts == [44224, 57461, 36921, 17366, 14246]
    assert out.output_shape == (180, 180, 2)


@pytest.fixture(scope="module")
def tiny_voxels(example_data_dir):
    return example_voxels(example_data_dir, TINY)


@pytest.fixture(scope="module")
def tiny_nodes(tmp_path_factory, tiny_voxels):
    """The tiny preset's lidar.backbone.xyz.onnx, random weights with BN calibrated on a quarter of
    the example frame (activations of a trained network's order), read back by the deploy reader."""
    torch = pytest.importorskip("torch")
    from bevfusion_ros.model.bevfusion import calibrate_batchnorm
    from bevfusion_ros.model.scn_onnx import write_scn_onnx
    from bevfusion_ros.model.sparse_encoder import SparseEncoder
    torch.manual_seed(7)
    encoder = SparseEncoder(TINY).eval()
    quarter = slice(None, None, 4)
    frame = (torch.from_numpy(tiny_voxels.features[quarter].astype(np.float32)),
             torch.from_numpy(tiny_voxels.coords[quarter]))
    with torch.no_grad():
        calibrate_batchnorm(encoder, lambda args: encoder(*args), [frame])
    path = tmp_path_factory.mktemp("tiny") / "lidar.backbone.xyz.onnx"
    write_scn_onnx(encoder, TINY, path, calibration_inputs=[frame])
    return read_scn_onnx(path)


def test_runner_matches_torch_graph_runner(tiny_nodes, tiny_voxels):
    torch = pytest.importorskip("torch")
    from bevfusion_ros.model.scn_onnx import run_scn_graph
    voxels = tiny_voxels
    grid = TINY.pipeline.voxelization.sparse_shape
    runner = SparseEncoderRunner(tiny_nodes)

    out = runner.run(voxels.features, voxels.coords, grid)
    with torch.no_grad():
        expected = run_scn_graph(tiny_nodes, torch.from_numpy(voxels.features.astype(np.float32)),
                                 torch.from_numpy(voxels.coords), grid).numpy()
    channels, (size_x, size_y) = TINY.lidar_bev_channels, TINY.bev_size
    assert out.shape == expected.shape == (1, channels, size_x, size_y) and out.dtype == np.float32
    assert out.flags.c_contiguous and np.count_nonzero(out) > 0.05 * out.size
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_residual_blocks_are_fused(tiny_nodes):
    from bevfusion_ros.lidar.scn import _fusions
    fusions = _fusions(tiny_nodes)
    adds = [i for i, node in enumerate(tiny_nodes) if node.op_type == "Add"]
    assert len(fusions) == len(adds) == 8                  # 4 encoder stages x 2 basic blocks
    for conv, fusion in fusions.items():
        add, relu = (tiny_nodes[i] for i in fusion.skipped)
        assert (add.op_type, relu.op_type) == ("Add", "Relu") and fusion.relu
        assert tiny_nodes[conv].outputs[0] in add.inputs and fusion.residual in add.inputs
        assert fusion.output == relu.outputs[0]
        assert tiny_nodes[conv].layer.activation == "None"


def test_fused_residual_and_relu_follow_the_graph_order():
    coords, features, weight, bias = conv_case(3, (3, 3, 3), channels=(4, 4))
    rulebook = build_rulebook(coords, GRID, ConvGeometry((3, 3, 3), (1, 1, 1), (1, 1, 1), subm=True))
    residual = np.random.default_rng(4).normal(size=(len(coords), 4)).astype(np.float32)
    fused = sparse_conv(features, weight, rulebook, bias, residual, relu=True)
    expected = np.maximum(sparse_conv(features, weight, rulebook, bias) + residual, 0)
    np.testing.assert_array_equal(fused, expected)      # float32, same order of operations
    assert (fused == 0).any() and (fused > 0).any()


def test_runner_input_errors(tiny_nodes):
    runner = SparseEncoderRunner(tiny_nodes)
    grid = TINY.pipeline.voxelization.sparse_shape
    rng = np.random.default_rng(2)
    coords = np.concatenate([np.zeros((50, 1), np.int32), random_sites(rng, 50, grid)], axis=1)
    features = rng.normal(size=(50, 5)).astype(np.float16)
    assert runner.run(features, coords, grid).shape == (1, TINY.lidar_bev_channels, *TINY.bev_size)
    empty = runner.run(np.zeros((0, 5), np.float16), np.zeros((0, 4), np.int32), grid)
    assert empty.shape == (1, TINY.lidar_bev_channels, *TINY.bev_size) and not empty.any()

    outside = coords.copy()
    outside[7, 3] = grid[2]                                   # z = 41 on a 41-slice grid
    with pytest.raises(ValueError, match=r"1 voxel coordinate\(s\) outside the sparse grid"):
        runner.run(features, outside, grid)
    outside[7, 3] = -1
    with pytest.raises(ValueError, match="outside the sparse grid"):
        runner.run(features, outside, grid)
    duplicate = coords.copy()
    duplicate[9] = duplicate[3]
    with pytest.raises(ValueError, match="not unique: 1 duplicate"):
        runner.run(features, duplicate, grid)
    second_frame = coords.copy()
    second_frame[0, 0] = 1
    with pytest.raises(ValueError, match="batch index"):
        runner.run(features, second_frame, grid)
    with pytest.raises(ValueError, match=r"features \[M, C\] and coords \[M, 4\]"):
        runner.run(features, coords[:, 1:], grid)
    with pytest.raises(ValueError, match="graph expects 5 channels"):
        runner.run(features[:, :4], coords, grid)
    with pytest.raises(ValueError, match="graph expects 5 channels on grid"):
        runner.run(features, coords, (grid[0], grid[1], grid[2] - 1))


def test_rulebook_key_shared_by_incompatible_layers(tiny_nodes):
    """A strided conv reusing a subm layer's rulebook key is a graph error, not a silent misuse."""
    down = next(i for i, node in enumerate(tiny_nodes) if node.layer is not None and not node.layer.subm)
    nodes = list(tiny_nodes)
    nodes[down] = replace(nodes[down], layer=replace(nodes[down].layer, rulebook="subm1"))
    rng = np.random.default_rng(3)
    grid = TINY.pipeline.voxelization.sparse_shape
    coords = np.concatenate([np.zeros((30, 1), np.int32), random_sites(rng, 30, grid)], axis=1)
    with pytest.raises(ValueError, match="rulebook 'subm1' was built for"):
        SparseEncoderRunner(nodes).run(np.ones((30, 5), np.float32), coords, grid)


def test_malformed_graphs(tiny_nodes):
    with pytest.raises(ValueError, match=r"conv2: input\(s\) \['2'\] not produced by an earlier node"):
        SparseEncoderRunner([node for node in tiny_nodes if node.name != "conv1"])
    with pytest.raises(ValueError, match=r"unsupported SCN op\(s\) \['MaxPool'\]"):
        SparseEncoderRunner([*tiny_nodes[:-1], replace(tiny_nodes[-1], op_type="MaxPool")])
    with pytest.raises(ValueError, match="starts with a SparseConvolution"):
        SparseEncoderRunner(tiny_nodes[3:])            # add0 first


def test_linear_keys_are_row_major():
    coords = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0], [8, 7, 6]])
    np.testing.assert_array_equal(linear_keys(coords, GRID), [1, 7, 56, 503])
