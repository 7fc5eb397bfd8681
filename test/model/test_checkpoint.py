"""mit-han-lab key table (against independent numbers and our model) and checkpoint loading."""
from __future__ import annotations

import fractions

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bevfusion_ros.model.checkpoint import MAX_LISTED, CheckpointError, load_checkpoint  # noqa: E402
from bevfusion_ros.model.mit_han_lab_keys import (  # noqa: E402
    TABLE_PATH,
    bevfusion_entries,
    format_table,
    load_table,
    main,
    parameter_count,
    parse_table,
)

# torchvision resnet50: 25,557,032 parameters, of which fc (2048 x 1000 + 1000) = 2,049,000.
RESNET50_WITHOUT_FC = 25_557_032 - 2_049_000


@pytest.fixture(scope="module")
def table():
    return load_table()


def test_committed_table_is_what_the_generator_writes():
    entries = bevfusion_entries()
    assert TABLE_PATH.read_text(encoding="utf-8") == format_table(entries)
    assert parse_table(format_table(entries)) == entries
    assert main(["--check"]) == 0


def test_resnet50_backbone_parameter_count(table):
    assert RESNET50_WITHOUT_FC == 23_508_032
    assert parameter_count(table, "encoders.camera.backbone.") == RESNET50_WITHOUT_FC


@pytest.mark.parametrize("name, shape", [
    ("encoders.camera.vtransform.depthnet.6.weight", (198, 256, 1, 1)),      # spec 2.2: 256 -> 118 + 80
    ("encoders.camera.neck.lateral_convs.1.conv.weight", (256, 3072, 1, 1)),  # spec 2.2: P4 1x1 3072 -> 256
    ("encoders.camera.neck.lateral_convs.0.conv.weight", (256, 768, 1, 1)),   # spec 2.2: P3 1x1 768 -> 256
    ("encoders.camera.vtransform.frustum", (118, 32, 88, 3)),                 # D x fH x fW (spec 2.2, 3.1)
    ("fuser.0.weight", (256, 336, 3, 3)),                                     # spec 2.4: 80 + 256 -> 256
    ("decoder.neck.deblocks.1.0.weight", (256, 256, 2, 2)),                   # spec 2.4: ConvTranspose2d k2 s2
    ("encoders.lidar.backbone.conv_input.0.weight", (3, 3, 3, 5, 16)),        # spec 5.3: [kx,ky,kz,I,O]
    ("encoders.lidar.backbone.conv_out.0.weight", (1, 1, 3, 128, 128)),       # spec 5.4: kernel (1,1,3)
    ("heads.object.shared_conv.weight", (128, 512, 3, 3)),                    # spec 6.2: 512 -> 128
    ("heads.object.heatmap_head.1.weight", (10, 128, 3, 3)),                  # spec 6.2: 128 -> 10 classes
    ("heads.object.class_encoding.weight", (128, 10, 1)),                     # spec 6.2: Conv1d 10 -> 128
    ("heads.object.decoder.0.linear1.weight", (256, 128)),                    # spec 6.2: FFN 256
])
def test_shapes_stated_in_the_spec(table, name, shape):
    assert table[name] == shape


def test_sparse_encoder_has_the_21_convolutions_of_the_scn_export(table):
    """Spec 5.4: 21 SparseConvolution nodes (+ BN folded into each), in->out per layer."""
    prefix = "encoders.lidar.backbone."
    weights = {name: shape for name, shape in table.items()
               if name.startswith(prefix) and name.endswith(".weight") and len(shape) == 5}
    assert len(weights) == 21
    assert sum(name.endswith(".running_mean") for name in table if name.startswith(prefix)) == 21
    in_out = [shape[3:] for shape in weights.values()]
    assert in_out == [(5, 16), *[(16, 16)] * 4, (16, 32), *[(32, 32)] * 4, (32, 64),
                      *[(64, 64)] * 4, (64, 128), *[(128, 128)] * 4, (128, 128)]


def test_prediction_heads_match_the_head_outputs(table):
    """Spec 6.2: Conv1d 128 -> 64 + BN1d per head, then 64 -> center 2, height 1, dim 3, rot 2,
    vel 2, heatmap 10."""
    prefix = "heads.object.prediction_heads.0."
    outputs = {name[len(prefix):].split(".")[0]: shape[0] for name, shape in table.items()
               if name.startswith(prefix) and name.endswith(".1.weight")}
    assert outputs == {"center": 2, "height": 1, "dim": 3, "rot": 2, "vel": 2, "heatmap": 10}
    assert all(table[f"{prefix}{head}.0.conv.weight"] == (64, 128, 1) for head in outputs)


def test_second_decoder_layer_count(table):
    """Spec 2.4: two SECOND stages of 1 + 5 convs each."""
    convs = [name for name in table if name.startswith("decoder.backbone.") and name.endswith(".weight")
             and len(table[name]) == 4]
    assert len(convs) == 12


# -- against our assembled model -------------------------------------------------------------

def _random_state(table: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the table's shapes (integer counters for the integer entries)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in table.items():
        if name.endswith("num_batches_tracked") or name.endswith(".nx"):
            state[name] = torch.randint(0, 1000, shape, generator=generator, dtype=torch.int64)
        else:
            state[name] = torch.randn(shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def model():
    from bevfusion_ros.model.bevfusion import build_model
    from bevfusion_ros.model.presets import NUSCENES_R50
    return build_model(NUSCENES_R50)


def test_model_state_dict_equals_the_table(model, table):
    ours = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert list(ours.items()) == list(table.items())          # names, shapes and order


def test_table_shaped_checkpoint_loads_exactly(model, table, tmp_path):
    state = _random_state(table)
    path = tmp_path / "bevfusion-det.pth"
    torch.save({"meta": {"epoch": 6, "CLASSES": ("car", "truck")}, "state_dict": state}, path)
    load_checkpoint(model, path)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    different = [name for name, tensor in loaded.items() if not torch.equal(tensor, state[name])]
    assert different == []


def test_corrupted_checkpoint_names_all_four_faults(model, table):
    state = _random_state(table, seed=1)
    renamed, removed, wrong = ("fuser.0.weight", "heads.object.class_encoding.bias",
                               "decoder.neck.deblocks.1.0.weight")
    state["fuser.0.weights"] = state.pop(renamed)
    del state[removed]
    state["heads.object.extra"] = torch.zeros(3)
    state[wrong] = torch.zeros(256, 256, 3, 3)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(model, {"state_dict": state})
    message = str(error.value)
    assert "2 missing, 2 unexpected, 1 shape mismatches" in message
    for name in (renamed, "fuser.0.weights", removed, "heads.object.extra", wrong):
        assert name in message
    assert f"{wrong}: checkpoint [256, 256, 3, 3], model [256, 256, 2, 2]" in message
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


# -- loader mechanics on small modules -------------------------------------------------------

def test_unwraps_model_key_and_strips_data_parallel_prefix():
    source, target = nn.Linear(4, 2), nn.Linear(4, 2)
    wrapped = {f"module.{name}": tensor for name, tensor in source.state_dict().items()}
    load_checkpoint(target, {"model": wrapped})
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)


class TransposedLinear(nn.Linear):
    """A Linear that stores its weight as [in, out], i.e. transposed w.r.t. the checkpoint."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.weight = nn.Parameter(self.weight.detach().t().contiguous())

    def convert_mit_han_lab_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if name == "weight" else tensor


def test_layout_hook_converts_only_the_keys_of_its_module():
    model = nn.Sequential(TransposedLinear(4, 3), nn.Linear(3, 2))
    checkpoint = {"0.weight": torch.randn(3, 4), "0.bias": torch.randn(3),
                  "1.weight": torch.randn(2, 3), "1.bias": torch.randn(2)}
    load_checkpoint(model, checkpoint)
    assert torch.equal(model[0].weight, checkpoint["0.weight"].t())
    assert torch.equal(model[0].bias, checkpoint["0.bias"])
    assert torch.equal(model[1].weight, checkpoint["1.weight"])


def test_long_lists_are_truncated_but_counted():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)])    # 30 entries
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(model, {})
    message = str(error.value)
    assert "30 missing, 0 unexpected, 0 shape mismatches" in message
    assert "missing from the checkpoint (30):" in message
    assert f"... and {30 - MAX_LISTED} more" in message
    assert sum(line.startswith("  ") and "[2" in line for line in message.splitlines()) == MAX_LISTED
    assert "0.bias [2]" in message       # sorted: "0.bias" comes first


def test_non_tensor_entries_are_rejected():
    with pytest.raises(CheckpointError, match="1 entries are not tensors"):
        load_checkpoint(nn.Linear(2, 2), {"weight": torch.zeros(2, 2), "bias": [0.0, 0.0]})


def test_pickled_objects_need_allow_pickle(tmp_path):
    source, target = nn.Linear(3, 3), nn.Linear(3, 3)
    path = tmp_path / "with-meta.pth"
    torch.save({"state_dict": source.state_dict(), "meta": {"ratio": fractions.Fraction(1, 3)}}, path)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_checkpoint(target, str(path))
    load_checkpoint(target, path, allow_pickle=True)
    assert torch.equal(target.weight, source.weight)

