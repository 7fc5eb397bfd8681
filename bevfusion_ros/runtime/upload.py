"""Host -> GPU upload of a frame's images and points through pinned staging buffers.

:class:`FrameUploader` owns, allocated once, page-locked host buffers and device buffers for the
largest frame the configuration allows. Per frame it copies on the host only what the GPU will
read (the band of image rows that normalization reads, with lens undistortion the raw rows its
remap reads, the points' first N rows) and queues an
asynchronous host-to-device copy on the caller's stream. Why, and how: docs/pipeline.md, "Frame
upload".

The returned device arrays are views of buffers reused by the next call: the caller must be done
with a frame (the pipeline synchronises at the end of ``forward``) before uploading the next.
CuPy is imported inside the methods, so this module imports on a machine without it.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from bevfusion_ros.camera.normalize import normalize_tables
from bevfusion_ros.config import ImageConfig

COPY_THREADS = 6                 # host copy threads (at most the CPU count)


def source_row_band(image: ImageConfig) -> slice:
    """The rows of an ``[H, W, 3]`` input image that normalization reads, as a slice."""
    rows = normalize_tables(image).rows
    return slice(int(min(rows.low.min(), rows.high.min())), int(max(rows.low.max(), rows.high.max())) + 1)


def pinned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised NumPy array in page-locked host memory (kept alive by the array)."""
    import cupy
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    memory = cupy.cuda.alloc_pinned_memory(max(count * dtype.itemsize, 1))
    return np.frombuffer(memory, dtype, count).reshape(shape)


class FrameUploader:
    """Pinned host and device buffers for ``num_cameras`` images of ``image`` and up to
    ``max_points`` points of ``num_features`` float32 channels."""

    def __init__(self, image: ImageConfig, num_cameras: int, max_points: int, num_features: int):
        import cupy
        self.row_band = source_row_band(image)     # the rows staged; a caller may change it
        image_shape = (num_cameras, image.input_height, image.input_width, 3)
        self._host_images = pinned_empty(image_shape, np.uint8)
        self._device_images = cupy.empty(image_shape, dtype=cupy.uint8)
        self._host_points = pinned_empty((max_points, num_features), np.float32)
        self._device_points = cupy.empty((max_points, num_features), dtype=cupy.float32)
        self._threads = max(1, min(COPY_THREADS, os.cpu_count() or 1))
        self._copiers = ThreadPoolExecutor(self._threads, thread_name_prefix="bevfusion-upload")

    @property
    def device_id(self) -> int:
        """The CUDA device of the buffers."""
        return self._device_images.device.id

    def images(self, images: Sequence[Any], stream: Any) -> Any:
        """uint8 ``[H, W, 3]`` images (checked by the caller) -> the device ``[N, H, W, 3]``
        buffer, rows :attr:`row_band` filled; the copies are queued on ``stream``.

        Host (NumPy) images go through the pinned staging buffer; device (CuPy) images, on this
        buffer's device, are copied device to device (their band only), with no host round
        trip; the two kinds may be mixed. Device images are read in ``stream``'s order: work
        that writes them on another stream must be waited for by ``stream`` first.
        """
        import cupy
        band = self.row_band
        on_host = [index for index, image in enumerate(images) if not isinstance(image, cupy.ndarray)]
        for index, image in enumerate(images):
            if isinstance(image, cupy.ndarray):
                _copy_on_device(self._device_images[index, band], image[band], stream)
        staged = [self._host_images[index, band] for index in on_host]
        copies = self._copiers.map(np.copyto, staged, [images[index][band] for index in on_host])
        for index, target, _ in zip(on_host, staged, copies):   # in camera order, as each copy lands
            self._device_images[index, band].set(target, stream)
        return self._device_images[:len(images)]

    def points(self, points: np.ndarray, stream: Any) -> Any:
        """float32 ``[N, C]`` host points (N <= max_points) -> a device ``[N, C]`` view, the copy
        queued on ``stream``."""
        count = points.shape[0]
        if points.shape[1:] != self._host_points.shape[1:] or count > self._host_points.shape[0]:
            raise ValueError(f"points {list(points.shape)} do not fit the staging buffer "
                             f"{list(self._host_points.shape)}")
        device = self._device_points[:count]
        if count:
            staged = self._host_points[:count]
            step = -(-count // self._threads)
            slices = [slice(start, start + step) for start in range(0, count, step)]
            list(self._copiers.map(np.copyto, [staged[part] for part in slices],
                                   [points[part] for part in slices]))
            device.set(staged, stream)
        return device


def _copy_on_device(target: Any, source: Any, stream: Any) -> None:
    """Queue ``target[...] = source`` (CuPy arrays of one shape) on ``stream``: one
    ``cudaMemcpyAsync`` when both are C-contiguous, else an element-wise copy kernel."""
    import cupy
    if source.device.id != target.device.id:
        raise ValueError(f"a device image is on GPU {source.device.id}, the pipeline on GPU {target.device.id}")
    if source.flags.c_contiguous and target.flags.c_contiguous:
        target.data.copy_from_device_async(source.data, source.nbytes, stream)
    else:
        with stream:
            cupy.copyto(target, source)
