"""Sparse conv primitives and SparseEncoder against dense float64 conv3d references (spec 5.1, 5.3, 5.4)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from bevfusion_ros.model.mit_han_lab_keys import load_table  # noqa: E402
from bevfusion_ros.model.presets import NUSCENES_R50, TINY  # noqa: E402
from bevfusion_ros.model.sparse_encoder import (  # noqa: E402
    SparseConvolution,
    SparseEncoder,
    SparseVoxelTensor,
    build_rulebook,
    sparse_conv,
    voxel_sample_inputs,
)


def small_grid_preset(cells: int = 24):
    """TINY with a cells x cells x 41 grid, small enough for a dense reference of the whole grid."""
    voxelization = TINY.pipeline.voxelization
    side = (voxelization.point_range_max[0] - voxelization.point_range_min[0]) / cells
    return dataclasses.replace(TINY, name="small-grid", pipeline=dataclasses.replace(
        TINY.pipeline, voxelization=dataclasses.replace(voxelization, voxel_size=(side, side, 0.2))))


SMALL_GRID = small_grid_preset()


def random_sites(rng: np.random.Generator, box: tuple[int, int, int], count: int) -> torch.Tensor:
    """``count`` unique int64 (x, y, z) sites inside ``box``, in random order."""
    keys = rng.choice(int(np.prod(box)), size=count, replace=False)
    return torch.from_numpy(np.stack(np.unravel_index(keys, box), axis=1).astype(np.int64))


def densify(features: torch.Tensor, coords: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [1, C, X, Y, Z] values and [1, 1, X, Y, Z] occupancy (1.0 at the sites)."""
    dense = torch.zeros(1, features.shape[1], *shape, dtype=torch.float64)
    mask = torch.zeros(1, 1, *shape, dtype=torch.float64)
    x, y, z = coords.long().unbind(1)
    dense[0, :, x, y, z] = features.double().t()
    mask[0, 0, x, y, z] = 1.0
    return dense, mask


def dense_sparse_conv(dense, mask, weight, kernel_size, stride, padding, subm):
    """Dense float64 reference of a sparse conv: conv3d, active sites = input sites (subm) or
    every output the kernel reaches from an active input (regular); inactive sites zeroed."""
    out = F.conv3d(dense, weight.double().permute(4, 3, 0, 1, 2), stride=stride, padding=padding)
    if not subm:
        ones = torch.ones(1, 1, *kernel_size, dtype=torch.float64)
        reach = F.conv3d(mask, ones, stride=stride, padding=padding)
        mask = (reach > 0).double()
    return out * mask, mask


def active_sites(mask: torch.Tensor) -> list[tuple[int, int, int]]:
    return sorted(map(tuple, torch.nonzero(mask[0, 0]).tolist()))


@pytest.mark.parametrize("shape, kernel_size, stride, padding, subm", [
    ((9, 11, 7), (3, 3, 3), (1, 1, 1), (1, 1, 1), True),
    ((8, 6, 9), (3, 1, 3), (1, 1, 1), (1, 0, 1), True),
    ((9, 11, 7), (3, 3, 3), (2, 2, 2), (1, 1, 1), False),
    ((10, 8, 5), (3, 3, 3), (2, 2, 2), (1, 1, 0), False),       # encoder_layer3 down (spec 5.4)
    ((6, 5, 5), (1, 1, 3), (1, 1, 2), (0, 0, 0), False),        # conv_out
    ((7, 6, 7), (3, 3, 3), (1, 1, 1), (0, 0, 0), False),        # regular conv, stride 1, shrinking
])
def test_sparse_conv_matches_dense_conv3d(shape, kernel_size, stride, padding, subm):
    rng = np.random.default_rng(sum(shape) + sum(kernel_size))
    coords = random_sites(rng, shape, int(0.3 * np.prod(shape)))
    features = torch.from_numpy(rng.normal(size=(coords.shape[0], 4)))
    weight = torch.from_numpy(rng.normal(size=(*kernel_size, 4, 5)))
    bias = torch.from_numpy(rng.normal(size=5))

    rulebook = build_rulebook(coords, shape, kernel_size, stride, padding, subm)
    out = sparse_conv(features, weight, rulebook, bias)

    dense, mask = densify(features, coords, shape)
    expected, expected_mask = dense_sparse_conv(dense, mask, weight, kernel_size, stride, padding, subm)
    assert rulebook.out_spatial_shape == tuple(expected.shape[2:])
    assert sorted(map(tuple, rulebook.out_coords.tolist())) == active_sites(expected_mask)
    x, y, z = rulebook.out_coords.unbind(1)
    torch.testing.assert_close(out - bias, expected[0, :, x, y, z].t(), rtol=1e-6, atol=1e-12)
    if subm:
        assert torch.equal(rulebook.out_coords, coords)           # subm keeps the input order


def test_subm_layers_with_one_indice_key_share_the_rulebook():
    rng = np.random.default_rng(3)
    coords = random_sites(rng, (6, 6, 6), 60)
    x = SparseVoxelTensor(torch.randn(60, 2), coords, (6, 6, 6))
    first = SparseConvolution(2, 3, 3, padding=1, subm=True, indice_key="subm1")
    second = SparseConvolution(3, 3, 3, padding=1, subm=True, indice_key="subm1")
    y = second(first(x))
    assert list(y.rulebooks) == ["subm1"] and y.rulebooks is x.rulebooks
    with pytest.raises(ValueError, match="built for 60 sites"):
        second(SparseVoxelTensor(torch.randn(5, 3), coords[:5], (6, 6, 6), x.rulebooks))


def dense_encoder_reference(encoder: SparseEncoder, features, coords, shape) -> torch.Tensor:
    """The encoder as dense float64 conv3d + BN + ReLU, masked to the active sites after every layer,
    then BEV channel c * Z + z built by explicit indexing (spec 5.3)."""
    def conv(x, mask, module):
        return dense_sparse_conv(x, mask, module.weight, module.kernel_size, module.stride, module.padding,
                                 module.subm)

    def bn(x, module):
        mean, var, gamma, beta = (t.double().view(1, -1, 1, 1, 1) for t in
                                  (module.running_mean, module.running_var, module.weight, module.bias))
        return (x - mean) / torch.sqrt(var + module.eps) * gamma + beta

    def conv_bn_relu(x, mask, sequential):
        x, mask = conv(x, mask, sequential[0])
        return torch.relu(bn(x, sequential[1])) * mask, mask

    x, mask = conv_bn_relu(*densify(features, coords, shape), encoder.conv_input)
    for stage in encoder.encoder_layers:
        for unit in stage:
            if hasattr(unit, "conv1"):
                hidden = torch.relu(bn(conv(x, mask, unit.conv1)[0], unit.bn1)) * mask
                x = torch.relu(bn(conv(hidden, mask, unit.conv2)[0], unit.bn2) * mask + x)
            else:
                x, mask = conv_bn_relu(x, mask, unit)
    x, mask = conv_bn_relu(x, mask, encoder.conv_out)
    channels, depth = x.shape[1], x.shape[4]
    return torch.stack([x[0, c, :, :, z] for c in range(channels) for z in range(depth)])[None]


def test_encoder_matches_dense_reference_on_a_small_grid(randomized_encoder):
    encoder = randomized_encoder(SMALL_GRID, seed=1).double()
    shape = SMALL_GRID.pipeline.voxelization.sparse_shape
    features, coords = voxel_sample_inputs(SMALL_GRID, seed=1, num_voxels=3000)
    with torch.no_grad():
        bev = encoder(features.double(), coords)
        expected = dense_encoder_reference(encoder, features, coords[:, 1:], shape)
    assert bev.shape == (1, 2 * SMALL_GRID.lidar.output_channels, 3, 3) == expected.shape
    assert expected.abs().max() > 0
    torch.testing.assert_close(bev, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))


def test_encoder_matches_dense_reference_on_the_tiny_grid_corner(randomized_encoder):
    """Voxels in the far corner box [X-48, X) x [Y-48, Y) x [0, 40) of the tiny grid (e.g. 288 x 288 x 41).

    X - 48 is a multiple of 8 (three stride-2 stages), so the dense reference can run on the box alone:
    its output is the last 6 x 6 cells of the encoder's BEV, and every other cell is 0.
    """
    size_x, size_y, size_z = TINY.pipeline.voxelization.sparse_shape
    origin = torch.tensor([size_x - 48, size_y - 48, 0])
    assert origin[0] % 8 == 0 and origin[1] % 8 == 0
    encoder = randomized_encoder(TINY, seed=2).double()
    rng = np.random.default_rng(2)
    local = random_sites(rng, (48, 48, size_z - 1), 2500)
    coords = torch.cat([torch.zeros(2500, 1, dtype=torch.int64), local + origin], dim=1)
    features = torch.from_numpy(rng.normal(size=(2500, 5)) * [20.0, 20.0, 2.0, 100.0, 0.2])
    with torch.no_grad():
        bev = encoder(features, coords)
        expected = dense_encoder_reference(encoder, features, local, (48, 48, size_z))
    channels = 2 * TINY.lidar.output_channels
    assert bev.shape == (1, channels, *TINY.bev_size) and expected.shape == (1, channels, 6, 6)
    assert expected.abs().max() > 0
    torch.testing.assert_close(bev[..., -6:, -6:], expected, rtol=1e-6,
                               atol=1e-9 * float(expected.abs().max()))
    bev[..., -6:, -6:] = 0
    assert not bev.any()


def test_state_dict_matches_mit_han_lab_lidar_backbone_keys():
    """Names, order and shapes equal mit-han-lab's ``encoders.lidar.backbone.*`` checkpoint entries."""
    prefix = "encoders.lidar.backbone."
    expected = [(name[len(prefix):], shape) for name, shape in load_table().items()
                if name.startswith(prefix)]
    ours = [(name, tuple(value.shape)) for name, value in SparseEncoder(NUSCENES_R50).state_dict().items()]
    assert ours == expected
    assert ("encoders.lidar.backbone.encoder_layers.encoder_layer1.2.0.weight", (3, 3, 3, 16, 32)) in \
        [(prefix + name, shape) for name, shape in ours]


def test_encoder_layers_follow_the_spec_table():
    """Spec 5.4: kernels, strides, paddings, rulebook keys and BN1d(eps 1e-3, momentum 0.01)."""
    encoder = SparseEncoder(NUSCENES_R50)
    convs = {name: module for name, module in encoder.named_modules()
             if isinstance(module, SparseConvolution)}
    assert len(convs) == 21
    down = {name: (c.kernel_size, c.stride, c.padding, c.indice_key)
            for name, c in convs.items() if not c.subm}
    assert down == {
        "encoder_layers.encoder_layer1.2.0": ((3, 3, 3), (2, 2, 2), (1, 1, 1), "spconv1"),
        "encoder_layers.encoder_layer2.2.0": ((3, 3, 3), (2, 2, 2), (1, 1, 1), "spconv2"),
        "encoder_layers.encoder_layer3.2.0": ((3, 3, 3), (2, 2, 2), (1, 1, 0), "spconv3"),
        "conv_out.0": ((1, 1, 3), (1, 1, 2), (0, 0, 0), "spconv_down2"),
    }
    for name, conv in convs.items():
        if conv.subm:
            stage = 1 if name.startswith("conv_input") else int(name.split(".encoder_layer")[1][0])
            assert (conv.kernel_size, conv.stride, conv.padding, conv.indice_key) == \
                ((3, 3, 3), (1, 1, 1), (1, 1, 1), f"subm{stage}")
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 21 and all(m.eps == 1e-3 and m.momentum == 0.01 for m in norms)


def test_nuscenes_forward_output_and_rulebooks():
    encoder = SparseEncoder(NUSCENES_R50).eval()
    features, coords = voxel_sample_inputs(NUSCENES_R50, seed=4, num_voxels=200)
    with torch.no_grad():
        out = encoder.forward_sparse(features, coords)
        bev = encoder(features, coords)
    assert bev.shape == (1, 256, 180, 180)
    assert out.spatial_shape == (180, 180, 2)
    assert sorted(out.rulebooks) == ["spconv1", "spconv2", "spconv3", "spconv_down2",
                                     "subm1", "subm2", "subm3", "subm4"]
    shapes = {key: rulebook.out_spatial_shape for key, rulebook in out.rulebooks.items()}
    assert shapes == {"subm1": (1440, 1440, 41), "spconv1": (720, 720, 21), "subm2": (720, 720, 21),
                      "spconv2": (360, 360, 11), "subm3": (360, 360, 11), "spconv3": (180, 180, 5),
                      "subm4": (180, 180, 5), "spconv_down2": (180, 180, 2)}
    x, y, z = out.coords.unbind(1)
    channel = 2 * torch.arange(128)[:, None] + z                     # spec 5.3: BEV channel c * 2 + z
    torch.testing.assert_close(bev[0, channel, x, y], out.features.t(), rtol=0, atol=0)


def test_voxel_sample_inputs():
    features, coords = voxel_sample_inputs(NUSCENES_R50, seed=5, num_voxels=5000)
    voxelization = NUSCENES_R50.pipeline.voxelization
    assert features.dtype == torch.float32 and features.shape == (5000, 5)
    assert coords.dtype == torch.int32 and coords.shape == (5000, 4)
    assert (coords[:, 0] == 0).all()
    xyz = coords[:, 1:].long()
    assert (xyz >= 0).all() and (xyz < torch.tensor(voxelization.grid_size)).all()   # z <= 39, not 40
    assert len(set(map(tuple, xyz.tolist()))) == 5000
    size = torch.tensor(voxelization.voxel_size)
    low = torch.tensor(voxelization.point_range_min) + xyz * size
    inside = (features[:, :3] >= low - 1e-4) & (features[:, :3] <= low + size + 1e-4)
    assert inside.all()
    assert 0 <= features[:, 3].min() and features[:, 3].max() <= 255 and features[:, 3].max() > 200
    assert 0 <= features[:, 4].min() and features[:, 4].max() <= 0.5
    again = voxel_sample_inputs(NUSCENES_R50, seed=5, num_voxels=5000)
    assert torch.equal(again[0], features) and torch.equal(again[1], coords)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.__setitem__((1, 0), 1), "batch index 0"),
    (lambda c: c.__setitem__((1, 3), 41), "outside the grid"),
    (lambda c: c.__setitem__(1, c[0]), "not unique"),
])
def test_encoder_rejects_invalid_voxel_coordinates(change, message):
    encoder = SparseEncoder(TINY)
    features, coords = voxel_sample_inputs(TINY, seed=6, num_voxels=10)
    change(coords)
    with pytest.raises(ValueError, match=message):
        encoder(features, coords)


def test_an_empty_frame_gives_an_all_zero_bev():
    encoder = SparseEncoder(TINY).eval()
    with torch.no_grad():
        bev = encoder(torch.zeros(0, 5), torch.zeros(0, 4, dtype=torch.int32))
    assert bev.shape == (1, 2 * TINY.lidar.output_channels, *TINY.bev_size) and not bev.any()
