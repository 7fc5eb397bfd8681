"""Reader and writer for CUDA-BEVFusion ``.tensor`` files (pipeline spec 1.6).

Layout, little-endian and packed::

    int32 magic 0x33ff1101 | int32 ndim | int32 dtype code | int32 dims[ndim] | raw C-order data

The reader is strict where NVIDIA's loader is not: it rejects a bad magic, an unknown dtype
code, more than 16 or negative dims, and a file whose data is shorter or longer than
``prod(dims) * itemsize``, each with a message that names the file and what is wrong.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

TENSOR_MAGIC = 0x33FF1101
MAX_DIMS = 16  # CUDA-BEVFusion's Tensor::load limit

# dtype code -> numpy dtype (CUDA-BEVFusion src/common/tensor.hpp, enum DataType); code 0 is "None".
DTYPE_BY_CODE: dict[int, np.dtype] = {
    1: np.dtype("<i4"),
    2: np.dtype("<f2"),
    3: np.dtype("<f4"),
    4: np.dtype("<i8"),
    5: np.dtype("<u8"),
    6: np.dtype("<u4"),
    7: np.dtype("i1"),
    8: np.dtype("u1"),
    9: np.dtype("<u2"),
    10: np.dtype("<i2"),
}
CODE_BY_DTYPE: dict[np.dtype, int] = {dtype: code for code, dtype in DTYPE_BY_CODE.items()}


class TensorFileError(ValueError):
    """A ``.tensor`` file is malformed, or an array cannot be stored in one."""


def decode_tensor(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of a ``.tensor`` file into a new C-contiguous little-endian array."""
    if len(data) < 12:
        raise TensorFileError(f"{name}: truncated header ({len(data)} bytes, need at least 12)")
    magic, ndim, code = struct.unpack_from("<iii", data, 0)
    if magic & 0xFFFFFFFF != TENSOR_MAGIC:
        raise TensorFileError(
            f"{name}: bad magic 0x{magic & 0xFFFFFFFF:08x}, expected 0x{TENSOR_MAGIC:08x} "
            "(not a CUDA-BEVFusion .tensor file)")
    if not 0 <= ndim <= MAX_DIMS:
        raise TensorFileError(f"{name}: ndim {ndim} outside 0..{MAX_DIMS}")
    if code not in DTYPE_BY_CODE:
        raise TensorFileError(
            f"{name}: unknown dtype code {code}; known codes {sorted(DTYPE_BY_CODE)}")
    header_size = 12 + 4 * ndim
    if len(data) < header_size:
        raise TensorFileError(f"{name}: truncated header, {ndim} dims need {header_size} bytes, "
                              f"file has {len(data)}")
    shape = struct.unpack_from(f"<{ndim}i", data, 12)
    if any(dim < 0 for dim in shape):
        raise TensorFileError(f"{name}: negative dimension in shape {shape}")
    dtype = DTYPE_BY_CODE[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        kind = "truncated data" if actual < expected else "trailing bytes after data"
        raise TensorFileError(f"{name}: {kind}: shape {list(shape)} of {dtype.name} needs "
                              f"{expected} bytes, file has {actual}")
    return np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape).copy()


def encode_tensor(array: np.ndarray) -> bytes:
    """Serialise ``array`` in the ``.tensor`` layout (data written little-endian, C order)."""
    array = np.asarray(array)
    code = CODE_BY_DTYPE.get(array.dtype.newbyteorder("<"))
    if code is None:
        supported = sorted({d.name for d in DTYPE_BY_CODE.values()})
        raise TensorFileError(f"dtype {array.dtype} cannot be stored in a .tensor file; "
                              f"supported: {supported}")
    if array.ndim > MAX_DIMS:
        raise TensorFileError(f"{array.ndim} dims exceed the format's limit of {MAX_DIMS}")
    header = struct.pack(f"<iii{array.ndim}i", TENSOR_MAGIC, array.ndim, code, *array.shape)
    return header + np.ascontiguousarray(array, dtype=DTYPE_BY_CODE[code]).tobytes()


def read_tensor(path: str | Path) -> np.ndarray:
    """Load a ``.tensor`` file; raises :class:`TensorFileError` naming the file on bad content."""
    path = Path(path)
    return decode_tensor(path.read_bytes(), str(path))


def write_tensor(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` in the ``.tensor`` layout."""
    Path(path).write_bytes(encode_tensor(array))
