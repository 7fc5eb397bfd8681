"""Pinned-staging upload (bevfusion_ros.runtime.upload) against a plain full-image upload."""
from __future__ import annotations

import numpy as np
import pytest

from bevfusion_ros.camera.normalize import normalize_images
from bevfusion_ros.config import ImageConfig
from bevfusion_ros.runtime.upload import FrameUploader, source_row_band

cupy = pytest.importorskip("cupy")
NUSCENES = ImageConfig()


@pytest.mark.parametrize("seed", [0, 1])
def test_uploaded_images_normalize_like_a_full_upload(seed):
    rng = np.random.default_rng(seed)
    uploader = FrameUploader(NUSCENES, 6, 1000, 5)
    stream = cupy.cuda.Stream(non_blocking=True)
    for _ in range(2):                                       # buffers reused by the second frame
        images = [rng.integers(0, 256, (900, 1600, 3), dtype=np.uint8) for _ in range(6)]
        with stream:
            staged = uploader.images(images, stream)
            got = normalize_images(staged, NUSCENES, 6)
        stream.synchronize()
        expected = normalize_images(cupy.asarray(np.stack(images)), NUSCENES, 6)
        np.testing.assert_array_equal(cupy.asnumpy(got), cupy.asnumpy(expected))
        band = source_row_band(NUSCENES)
        np.testing.assert_array_equal(cupy.asnumpy(staged[:, band]), np.stack(images)[:, band])


def test_uploaded_points_and_capacity():
    rng = np.random.default_rng(2)
    uploader = FrameUploader(NUSCENES, 6, 1000, 5)
    stream = cupy.cuda.Stream(non_blocking=True)
    for count in (1000, 17, 0):
        points = rng.normal(size=(count, 5)).astype(np.float32)
        device = uploader.points(points, stream)
        stream.synchronize()
        assert device.shape == (count, 5)
        np.testing.assert_array_equal(cupy.asnumpy(device), points)
    with pytest.raises(ValueError, match="staging buffer"):
        uploader.points(np.zeros((1001, 5), np.float32), stream)
    with pytest.raises(ValueError, match="staging buffer"):
        uploader.points(np.zeros((10, 4), np.float32), stream)


def test_upload_timing(capsys):
    """Prints host wall time of the staging calls and the device time of the copies (no assert)."""
    import time
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (900, 1600, 3), dtype=np.uint8) for _ in range(6)]
    points = rng.normal(size=(242180, 5)).astype(np.float32)
    uploader = FrameUploader(NUSCENES, 6, 300000, 5)
    stream = cupy.cuda.Stream(non_blocking=True)
    samples = {"images": [], "points": []}
    for _ in range(20):
        for name, call in (("images", lambda: uploader.images(images, stream)),
                           ("points", lambda: uploader.points(points, stream))):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            begin = time.perf_counter()
            start.record(stream)
            call()
            end.record(stream)
            host = (time.perf_counter() - begin) * 1e3
            end.synchronize()
            samples[name].append((host, cupy.cuda.get_elapsed_time(start, end)))
    with capsys.disabled():
        for name, values in samples.items():
            host, device = np.median(np.asarray(values[5:]), axis=0)
            print(f"\n[gpu timing] upload {name}: host {host:.3f} ms, stream span {device:.3f} ms")
