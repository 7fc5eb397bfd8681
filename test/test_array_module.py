"""Array-module dispatch without a GPU."""
import numpy as np

from bevfusion_ros.runtime.array_module import get_array_module, is_cupy, to_numpy


def test_numpy_dispatch():
    array = np.arange(3)
    assert get_array_module(array, [1]) is np and not is_cupy(array)
    assert to_numpy(array) is array
