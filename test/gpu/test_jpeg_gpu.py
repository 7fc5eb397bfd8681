"""nvJPEG decoding (ImageDecoder(device="cuda")) against the OpenCV decode, and the GPU pipeline
fed device (CuPy) images, alone or mixed with host images.

nvJPEG (the H100's hardware JPEG decoder for baseline JPEGs) and libjpeg-turbo do not decode
bit-identically: their IDCTs and their chroma upsampling of 4:2:0 differ. Bounds on the six
CUDA-BEVFusion example JPEGs (1600x900, 4:2:0), all pixels and channels:
- mean |nvJPEG - OpenCV| <= MEAN_BOUND grey levels;
- 99.9th percentile <= P999_BOUND, maximum <= MAX_BOUND (sharp colour edges, where the
  upsampling filters differ most).
PROVISIONAL: MAX_BOUND and P999_BOUND are set before any measurement; the test prints the measured
values, which the bounds should be tightened to (with a margin) once measured on the H100.
"""
from __future__ import annotations

import dataclasses
import io
import time

import cv2
import numpy as np
import pytest

from bevfusion_ros.camera.jpeg import ImageDecoder, ImageError, decode_rgb, nvjpeg_unavailable
from bevfusion_ros.config import NUSCENES_CAMERA_NAMES
from bevfusion_ros.pipeline import BEVFusionPipeline, InputError

cupy = pytest.importorskip("cupy")
torch = pytest.importorskip("torch")

MEAN_BOUND = 1.5
P999_BOUND = 24           # provisional, see the module docstring
MAX_BOUND = 96            # provisional, see the module docstring


@pytest.fixture(scope="module")
def decoder():
    reason = nvjpeg_unavailable()
    if reason is not None:
        pytest.skip(f"nvJPEG unavailable: {reason}")
    with ImageDecoder("cuda") as instance:
        yield instance


@pytest.fixture(scope="module")
def example_jpegs(example_data_dir) -> list[bytes]:
    return [(example_data_dir / f"{index}-{name}.jpg").read_bytes()
            for index, name in enumerate(NUSCENES_CAMERA_NAMES)]


@pytest.fixture(scope="module")
def gpu_pipeline(tiny_dir):
    return BEVFusionPipeline.from_model_dir(tiny_dir, backend="gpu", precision="fp32")


def difference_stats(got: np.ndarray, expected: np.ndarray) -> tuple[float, float, int]:
    difference = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    return float(difference.mean()), float(np.percentile(difference, 99.9)), int(difference.max())


# -- decoding --------------------------------------------------------------------------------

def test_nvjpeg_matches_opencv_on_the_example_jpegs(decoder, example_jpegs, capsys):
    out = decoder.decode(example_jpegs)
    assert decoder.fallbacks == {}                           # all six went through nvJPEG
    stats = []
    for got, data in zip(out, example_jpegs):
        assert isinstance(got, cupy.ndarray) and got.dtype == np.uint8 and got.flags.c_contiguous
        assert got.device.id == cupy.cuda.Device().id
        expected = decode_rgb(data)
        assert got.shape == expected.shape == (900, 1600, 3)
        stats.append(difference_stats(cupy.asnumpy(got), expected))
    with capsys.disabled():
        print("\n[nvjpeg vs opencv] per camera (mean, p99.9, max): "
              + ", ".join(f"({mean:.3f}, {p999:.0f}, {peak})" for mean, p999, peak in stats))
    assert max(mean for mean, _, _ in stats) <= MEAN_BOUND
    assert max(p999 for _, p999, _ in stats) <= P999_BOUND
    assert max(peak for _, _, peak in stats) <= MAX_BOUND


def test_fallbacks_and_errors_in_one_batch(decoder, example_jpegs):
    """PNG, grey JPEG, empty data and garbage go to the CPU path (or come back as errors) while
    the other images of the batch still decode on the GPU."""
    rgb = decode_rgb(example_jpegs[1])[:240, :320].copy()
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    ok, grey = cv2.imencode(".jpg", rgb[..., 1].copy())
    ok, progressive = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    batch = [example_jpegs[0], png.tobytes(), grey.tobytes(), b"", b"garbage", progressive.tobytes(),
             example_jpegs[5]]
    out = decoder.decode(batch)
    assert set(decoder.fallbacks) == {1, 2, 3, 4}, decoder.fallbacks
    assert "grey JPEG" in decoder.fallbacks[2] and "not a JPEG" in decoder.fallbacks[1]
    for index in (0, 5, 6):
        assert isinstance(out[index], cupy.ndarray), index
        assert difference_stats(cupy.asnumpy(out[index]), decode_rgb(batch[index]))[0] <= MEAN_BOUND
    np.testing.assert_array_equal(out[1], rgb)                # PNG, exact, on the host
    np.testing.assert_array_equal(out[2], decode_rgb(batch[2]))
    assert isinstance(out[3], ImageError) and isinstance(out[4], ImageError)


def test_corrupt_jpeg_data_does_not_fail_the_batch(decoder, example_jpegs):
    """Valid headers, garbage or truncated entropy-coded data: nvJPEG's batch fails, the batch is
    retried image by image, the broken ones go to OpenCV (which may still return a picture, as
    libjpeg pads a truncated scan) and the rest decode on the GPU."""
    data = example_jpegs[2]
    scan = data.index(b"\xff\xda")
    rng = np.random.default_rng(0)
    garbage = data[:scan + 200] + rng.integers(0, 255, 4000, dtype=np.uint8).tobytes() + b"\xff\xd9"
    truncated = data[:len(data) // 2]
    batch = [example_jpegs[0], garbage, truncated, example_jpegs[3]]
    out = decoder.decode(batch)
    for index in (0, 3):
        assert isinstance(out[index], cupy.ndarray)
        assert difference_stats(cupy.asnumpy(out[index]), decode_rgb(batch[index]))[0] <= MEAN_BOUND
    for index in (1, 2):
        assert isinstance(out[index], (ImageError, np.ndarray, cupy.ndarray)), type(out[index])
        if not isinstance(out[index], ImageError):
            assert out[index].shape == (900, 1600, 3)
    print("corrupt JPEGs:", {index: decoder.fallbacks.get(index, "decoded by nvJPEG") for index in (1, 2)})


def test_decode_on_a_side_stream(decoder, example_jpegs):
    """Results are queued on the current CuPy stream; torch's current stream is left as it was."""
    expected = [cupy.asnumpy(image) for image in decoder.decode(example_jpegs[:3])]
    torch_stream = torch.cuda.current_stream()
    stream = cupy.cuda.Stream(non_blocking=True)
    for _ in range(3):
        with stream:
            out = decoder.decode(example_jpegs[:3])
            copies = [image.copy() for image in out]          # work queued after the decode
        stream.synchronize()
        for got, want in zip(copies, expected):
            np.testing.assert_array_equal(cupy.asnumpy(got), want)
    assert torch.cuda.current_stream() == torch_stream


def test_decode_timing(decoder, example_jpegs, capsys):
    """Prints the wall time of decoding the six example JPEGs (no assert)."""
    cpu_pool, sequential = ImageDecoder("cpu", workers=6), ImageDecoder("cpu", workers=1)
    timings = {}
    for name, run in (("nvjpeg", lambda: (decoder.decode(example_jpegs), cupy.cuda.get_current_stream().synchronize())),
                      ("cpu pool 6", lambda: cpu_pool.decode(example_jpegs)),
                      ("cpu sequential", lambda: sequential.decode(example_jpegs))):
        samples = []
        for _ in range(12):
            begin = time.perf_counter()
            run()
            samples.append((time.perf_counter() - begin) * 1e3)
        timings[name] = float(np.median(samples[2:]))
    cpu_pool.close()
    with capsys.disabled():
        print("\n[gpu timing] decode 6 example JPEGs, median ms: "
              + ", ".join(f"{name} {ms:.2f}" for name, ms in timings.items()))


def test_choose_device_for_a_gpu_pipeline():
    reason = nvjpeg_unavailable()
    if reason is not None:
        pytest.skip(f"nvJPEG unavailable: {reason}")
    decoder, why = ImageDecoder.for_pipeline("cuda", workers=2)
    assert decoder.device == "cuda" and "nvJPEG" in why
    decoder.close()


# -- the pipeline with device images ---------------------------------------------------------

def test_device_images_give_the_host_images_boxes(gpu_pipeline, frame):
    host = gpu_pipeline.forward(frame)
    device_frame = dataclasses.replace(frame, images=[cupy.asarray(image) for image in frame.images])
    device = gpu_pipeline.forward(device_frame)
    assert device.boxes.shape == host.boxes.shape
    np.testing.assert_allclose(device.boxes, host.boxes, atol=1e-4)
    mixed = [cupy.asarray(image) if index % 2 else image for index, image in enumerate(frame.images)]
    np.testing.assert_allclose(gpu_pipeline.forward(dataclasses.replace(frame, images=mixed)).boxes,
                               host.boxes, atol=1e-4)
    side = cupy.cuda.Stream(non_blocking=True)           # images written on the caller's own stream
    with side:
        on_side = [cupy.asarray(image).copy() for image in frame.images]
        np.testing.assert_allclose(gpu_pipeline.forward(dataclasses.replace(frame, images=on_side)).boxes,
                                   host.boxes, atol=1e-4)


def test_device_images_with_a_missing_camera(gpu_pipeline, frame):
    """A missing camera gets the host black image among device images."""
    used = gpu_pipeline.config.camera_names[:2] + gpu_pipeline.config.camera_names[3:]
    host = gpu_pipeline.forward(frame, used)
    device_images = [cupy.asarray(image) for image in frame.images]
    device = gpu_pipeline.forward(dataclasses.replace(frame, images=device_images), used)
    assert device.cameras_used == host.cameras_used == used
    np.testing.assert_allclose(device.boxes, host.boxes, atol=1e-4)


def test_nvjpeg_images_through_the_pipeline(gpu_pipeline, decoder, frame, example_jpegs):
    decoded = decoder.decode(example_jpegs)
    assert all(isinstance(image, cupy.ndarray) for image in decoded)
    detections = gpu_pipeline.forward(dataclasses.replace(frame, images=decoded))
    assert np.isfinite(detections.boxes).all() and len(detections.boxes) > 0


def test_bad_device_images(gpu_pipeline, tiny_dir, frame):
    images = [cupy.asarray(image) for image in frame.images]
    with pytest.raises(InputError, match="camera 1: expected size"):
        gpu_pipeline.forward(dataclasses.replace(frame, images=[images[0], images[1][:-2]] + images[2:]))
    unchecked = object.__new__(type(frame))            # Frame's own checks would refuse float32
    for field in dataclasses.fields(frame):
        object.__setattr__(unchecked, field.name, getattr(frame, field.name))
    object.__setattr__(unchecked, "images", images[:2] + [images[2].astype(cupy.float32)] + images[3:])
    with pytest.raises(InputError, match="camera 2: expected a uint8 numpy or cupy image, got float32"):
        gpu_pipeline.forward(unchecked)
    cpu_pipeline = BEVFusionPipeline.from_model_dir(tiny_dir, backend="cpu")
    with pytest.raises(InputError, match="camera 0: a CuPy \\(GPU\\) image was given to a CPU pipeline"):
        cpu_pipeline.forward(dataclasses.replace(frame, images=images))


def test_uploader_mixes_host_and_device_images():
    from bevfusion_ros.config import ImageConfig
    from bevfusion_ros.runtime.upload import FrameUploader, source_row_band
    config = ImageConfig()
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (900, 1600, 3), dtype=np.uint8) for _ in range(6)]
    uploader = FrameUploader(config, 6, 1000, 5)
    stream = cupy.cuda.Stream(non_blocking=True)
    band = source_row_band(config)
    strided = cupy.asarray(np.ascontiguousarray(np.stack([images[5]] * 2, axis=1)))[:, 0]   # not contiguous
    mixed = [cupy.asarray(images[0]), images[1], cupy.asarray(images[2]), images[3], images[4], strided]
    staged = uploader.images(mixed, stream)
    stream.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(staged[:, band]), np.stack(images)[:, band])


def test_pil_cmyk_goes_to_the_cpu(decoder):
    Image = pytest.importorskip("PIL.Image")
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24] = (200, 30, 60)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, "JPEG")
    (out,) = decoder.decode([buffer.getvalue()])
    assert isinstance(out, np.ndarray) and "CMYK" in decoder.fallbacks[0]
    np.testing.assert_array_equal(out, decode_rgb(buffer.getvalue()))
