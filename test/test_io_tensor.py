"""The .tensor reader/writer against a hand-packed struct reference and NVIDIA's files."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from bevfusion_ros.io.tensor import (
    TENSOR_MAGIC,
    TensorFileError,
    decode_tensor,
    encode_tensor,
    read_tensor,
    write_tensor,
)

# Independent table of the format's dtype codes (spec 1.6) for the reference packer.
CODES = {1: "<i4", 2: "<f2", 3: "<f4", 4: "<i8", 5: "<u8", 6: "<u4", 7: "i1", 8: "u1",
         9: "<u2", 10: "<i2"}


def pack_reference(code: int, array: np.ndarray) -> bytes:
    """Build a .tensor file byte by byte with struct, independent of the module under test."""
    header = struct.pack("<i", TENSOR_MAGIC) + struct.pack("<i", array.ndim) + struct.pack("<i", code)
    header += b"".join(struct.pack("<i", dim) for dim in array.shape)
    return header + array.astype(CODES[code]).tobytes(order="C")


@pytest.mark.parametrize("code", sorted(CODES))
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (1, 6, 4, 4), (2, 1, 3, 1, 2)])
def test_round_trip_is_exact_for_every_dtype(code, shape, tmp_path):
    rng = np.random.default_rng(code * 100 + len(shape))
    dtype = np.dtype(CODES[code])
    if dtype.kind == "f":
        array = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    encoded = encode_tensor(array)
    assert encoded == pack_reference(code, array)
    path = tmp_path / "a.tensor"
    write_tensor(path, array)
    loaded = read_tensor(path)
    assert loaded.dtype == dtype and loaded.shape == array.shape
    assert loaded.tobytes() == array.tobytes()


def test_big_endian_and_non_contiguous_input_are_normalised():
    array = np.arange(24, dtype=">f4").reshape(4, 6)[:, ::2]
    decoded = decode_tensor(encode_tensor(array))
    np.testing.assert_array_equal(decoded, array)
    assert decoded.dtype == np.dtype("<f4")


def test_float16_special_values_survive():
    array = np.array([np.inf, -np.inf, 65504, 6e-8, -0.0], dtype=np.float16)
    decoded = decode_tensor(encode_tensor(array))
    assert decoded.tobytes() == array.tobytes()


@pytest.mark.parametrize("data, message", [
    (b"\x01\x02", "truncated header"),
    (struct.pack("<iii", 0x12345678, 1, 3) + struct.pack("<i", 1) + b"\0" * 4, "bad magic 0x12345678"),
    (struct.pack("<iii", TENSOR_MAGIC, 1, 0) + struct.pack("<i", 1), "unknown dtype code 0"),
    (struct.pack("<iii", TENSOR_MAGIC, 1, 11) + struct.pack("<i", 1), "unknown dtype code 11"),
    (struct.pack("<iii", TENSOR_MAGIC, 17, 3), "ndim 17 outside 0..16"),
    (struct.pack("<iii", TENSOR_MAGIC, 2, 3) + struct.pack("<i", 3), "truncated header"),
    (struct.pack("<iii", TENSOR_MAGIC, 1, 3) + struct.pack("<i", -2), "negative dimension"),
    (struct.pack("<iii", TENSOR_MAGIC, 2, 3) + struct.pack("<ii", 2, 3) + b"\0" * 20,
     "truncated data: shape [2, 3] of float32 needs 24 bytes, file has 20"),
    (struct.pack("<iii", TENSOR_MAGIC, 1, 8) + struct.pack("<i", 2) + b"\0" * 3,
     "trailing bytes after data"),
])
def test_bad_files_raise_clear_errors(data, message, tmp_path):
    path = tmp_path / "bad.tensor"
    path.write_bytes(data)
    with pytest.raises(TensorFileError, match=str(path).replace(".", r"\.")) as error:
        read_tensor(path)
    assert message in str(error.value)


@pytest.mark.parametrize("array", [np.zeros(3, bool), np.zeros(3, np.float64), np.zeros(3, complex)])
def test_unsupported_dtypes_are_refused(array):
    with pytest.raises(TensorFileError, match="cannot be stored"):
        encode_tensor(array)


def test_nvidia_example_files_parse_and_re_encode_byte_identically(example_data_dir):
    expected = {"points": ("float16", (242180, 5)), "camera2lidar": ("float32", (1, 6, 4, 4)),
                "lidar2ego": ("float32", (1, 4, 4)), "gt_bboxes_3d": ("float32", (35, 9)),
                "gt_labels_3d": ("int64", (35,))}
    for name, (dtype, shape) in expected.items():
        path = example_data_dir / f"{name}.tensor"
        array = read_tensor(path)
        assert (array.dtype.name, array.shape) == (dtype, shape)
        assert encode_tensor(array) == path.read_bytes()
