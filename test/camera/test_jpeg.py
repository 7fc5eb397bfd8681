"""Compressed-image decoding on the CPU (bevfusion_ros.camera.jpeg): the OpenCV core against
Pillow (an independent libjpeg-turbo/libpng decoder), per-image errors, the thread pool, and the
JPEG header screening that decides what nvJPEG gets (the nvJPEG path itself:
test/gpu/test_jpeg_gpu.py)."""
from __future__ import annotations

import array
import io

import cv2
import numpy as np
import pytest

from bevfusion_ros.camera import jpeg
from bevfusion_ros.camera.jpeg import (
    ImageDecoder,
    ImageError,
    choose_decode_device,
    decode_rgb,
    nvjpeg_refusal,
    nvjpeg_unavailable,
    uint8_buffer,
)

Image = pytest.importorskip("PIL.Image")


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """Random but smooth RGB (a coarse random grid, cubic upsampling): JPEG keeps it within a few
    grey levels, and every pixel differs from its neighbours (a flipped or shifted decode shows)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 12 + 2, width // 12 + 2, 3)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, ext: str = ".jpg", *params: int) -> bytes:
    """cv2.imencode of an RGB (or grey, or RGBA) array (cv2 wants BGR)."""
    if rgb.ndim == 3:
        rgb = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR if rgb.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, data = cv2.imencode(ext, rgb, list(params))
    assert ok
    return data.tobytes()


def pil_rgb(data: bytes) -> np.ndarray:
    """The independent reference: Pillow's decode, converted to RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def pil_jpeg(rgb: np.ndarray, mode: str = "RGB", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, "JPEG", **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def frame_jpegs():
    """Six camera-like JPEGs (quality 90, 4:2:0) of different sizes and their source images."""
    sources = [smooth_image(90 + 6 * index, 160 - 8 * index, seed=index) for index in range(6)]
    return sources, [encode(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 90) for rgb in sources]


SAMPLING = {"420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
            "444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444}


@pytest.mark.parametrize("sampling", sorted(SAMPLING))
@pytest.mark.parametrize("quality", [75, 95])
def test_jpeg_decode_equals_pillow(quality, sampling):
    rgb = smooth_image(72, 120, seed=quality)
    data = encode(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                  SAMPLING[sampling])
    out = decode_rgb(data)
    assert out.dtype == np.uint8 and out.shape == rgb.shape and out.flags.c_contiguous
    np.testing.assert_array_equal(out, pil_rgb(data))        # both libjpeg-turbo, default IDCT
    assert np.abs(out.astype(int) - rgb).mean() < 5.0          # and it is the encoded image, RGB order
    assert np.corrcoef(out[..., 0].ravel(), rgb[..., 0].ravel())[0, 1] > 0.99


def test_progressive_and_exif_rotated_jpegs():
    rgb = smooth_image(40, 64, seed=3)
    progressive = encode(rgb, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    np.testing.assert_array_equal(decode_rgb(progressive), pil_rgb(progressive))
    exif = Image.Exif()
    exif[0x0112] = 6                                           # rotate 90 degrees clockwise to view
    rotated = pil_jpeg(rgb, exif=exif.tobytes(), quality=95)
    out = decode_rgb(rotated)                                  # OpenCV applies the orientation
    assert out.shape == (64, 40, 3)
    np.testing.assert_array_equal(out, np.rot90(pil_rgb(rotated), k=-1))


def test_grey_png_alpha_and_16_bit():
    rgb = smooth_image(30, 50, seed=4)
    grey = rgb[..., 1].copy()
    grey_jpeg = encode(grey, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95)
    out = decode_rgb(grey_jpeg)
    assert out.shape == (30, 50, 3)
    np.testing.assert_array_equal(out, pil_rgb(grey_jpeg))    # grey replicated to R, G, B
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    png = encode(rgb, ".png")
    np.testing.assert_array_equal(decode_rgb(png), rgb)        # lossless: exact
    np.testing.assert_array_equal(decode_rgb(png), pil_rgb(png))
    rgba = np.dstack([rgb, rgb[..., :1]])
    np.testing.assert_array_equal(decode_rgb(encode(rgba, ".png")), rgb)        # alpha dropped
    np.testing.assert_array_equal(decode_rgb(encode(grey, ".png")), np.dstack([grey] * 3))
    sixteen = rgb.astype(np.uint16) * 257 + 100                # 16-bit PNG: scaled to 8 bit
    np.testing.assert_array_equal(decode_rgb(encode(sixteen, ".png")), (sixteen >> 8).astype(np.uint8))


def test_input_buffer_types(frame_jpegs):
    data = frame_jpegs[1][0]
    expected = pil_rgb(data)
    serialized = np.frombuffer(b"\0" * 37 + data + b"\0" * 3, np.uint8, count=len(data), offset=37)
    serialized.flags.writeable = False                         # as ros/cdr.py hands message data over
    for form in (data, bytearray(data), memoryview(data), array.array("B", data), serialized,
                 np.frombuffer(data, np.uint8), np.frombuffer(data, np.uint8).reshape(1, -1),
                 np.repeat(np.frombuffer(data, np.uint8), 2)[::2]):      # non-contiguous
        np.testing.assert_array_equal(decode_rgb(form), expected)
    assert uint8_buffer(array.array("B", data)).base is not None          # no copy


@pytest.mark.parametrize("data, message", [
    (b"", r"empty camera 3$"),
    (b"not an image at all", r"cannot decode camera 3 \(19 bytes\)"),
    (b"\x89PNG\r\n\x1a\n" + bytes(40), r"cannot decode camera 3 \(48 bytes\)"),
])
def test_decode_rgb_errors(data, message):
    with pytest.raises(ImageError, match=message):
        decode_rgb(data, "camera 3")
    assert issubclass(ImageError, ValueError)


def test_compressed_to_rgb_uses_the_same_core():
    from bevfusion_ros.ros import convert
    assert convert.ImageError is ImageError and convert._uint8_buffer is uint8_buffer


@pytest.mark.parametrize("workers", [1, 6])
def test_decoder_matches_sequential_decode(frame_jpegs, workers):
    sources, jpegs = frame_jpegs
    with ImageDecoder("cpu", workers=workers) as decoder:
        for _ in range(2):                                     # the pool is reused
            out = decoder.decode(jpegs)
            assert len(out) == 6 and decoder.fallbacks == {}
            for got, data, rgb in zip(out, jpegs, sources):
                assert isinstance(got, np.ndarray) and got.shape == rgb.shape
                np.testing.assert_array_equal(got, decode_rgb(data))
                np.testing.assert_array_equal(got, pil_rgb(data))


def test_bad_image_does_not_fail_the_others(frame_jpegs):
    _, jpegs = frame_jpegs
    truncated_header = jpegs[2][:20]
    batch = [jpegs[0], b"", b"garbage bytes", jpegs[3], truncated_header, jpegs[5], None]
    names = [f"CAM_{index}" for index in range(len(batch))]
    out = ImageDecoder("cpu", workers=4).decode(batch, names)
    for index in (0, 3, 5):
        np.testing.assert_array_equal(out[index], decode_rgb(batch[index]))
    errors = {index: str(out[index]) for index in (1, 2, 4, 6)}
    assert all(isinstance(out[index], ImageError) for index in errors)
    assert errors[1] == "empty CAM_1"
    assert errors[2].startswith("cannot decode CAM_2 (13 bytes)")
    assert errors[4].startswith("cannot decode CAM_4 (20 bytes)")
    assert "CAM_6" in errors[6] and "not a byte buffer" in errors[6]
    with pytest.raises(ValueError, match="7 images but 2 names"):
        ImageDecoder("cpu").decode(batch, names[:2])
    assert ImageDecoder("cpu").decode([]) == []


def test_decoder_arguments():
    with pytest.raises(ValueError, match="device must be one of"):
        ImageDecoder("gpu")
    with pytest.raises(ValueError, match="workers >= 1"):
        ImageDecoder("cpu", workers=0)


# -- what nvJPEG gets ------------------------------------------------------------------------

def test_nvjpeg_gets_colour_huffman_jpegs(frame_jpegs):
    rgb = smooth_image(40, 64, seed=5)
    assert all(nvjpeg_refusal(data) is None for data in frame_jpegs[1])
    for sampling in SAMPLING.values():
        assert nvjpeg_refusal(encode(rgb, ".jpg", cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling)) is None
    assert nvjpeg_refusal(encode(rgb, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1)) is None
    assert nvjpeg_refusal(pil_jpeg(rgb, progressive=True)) is None
    exif = Image.Exif()
    exif[0x0112] = 1                                           # upright: nothing to apply
    assert nvjpeg_refusal(pil_jpeg(rgb, exif=exif.tobytes())) is None
    assert nvjpeg_refusal(np.frombuffer(frame_jpegs[1][0], np.uint8)) is None


def test_nvjpeg_refusals(frame_jpegs):
    rgb = smooth_image(40, 64, seed=6)
    jpeg_data = frame_jpegs[1][0]
    exif = Image.Exif()
    exif[0x0112] = 8
    start_of_scan = jpeg_data.index(b"\xff\xda")
    cases = {
        "not a JPEG": encode(rgb, ".png"),
        "not a JPEG ": b"",
        "grey JPEG": encode(rgb[..., 0].copy(), ".jpg"),
        "4-component JPEG (CMYK/YCCK)": pil_jpeg(rgb, "CMYK"),
        "EXIF orientation 8": pil_jpeg(rgb, exif=exif.tobytes()),
        "truncated JPEG segment": jpeg_data[:30],
        "header ends before the first scan": jpeg_data[:start_of_scan],
        "no marker at byte": jpeg_data[:2] + b"\x00" * 10,
    }
    for expected, data in cases.items():
        reason = nvjpeg_refusal(data)
        assert reason is not None and expected.strip() in reason, (expected, reason)
    # Frame header variants: patch the SOF0 segment of a real JPEG.
    sof = jpeg_data.index(b"\xff\xc0")
    variants = {
        "12-bit JPEG": (sof + 4, 12),                         # sample precision
        "SOF3 JPEG (lossless": (sof + 1, 0xC3),                # lossless marker
        "SOF9 JPEG": (sof + 1, 0xC9),                          # arithmetic coding
        "height in a DNL marker": (sof + 6, 0),                # height 0 (high byte is 0 already)
    }
    for expected, (offset, value) in variants.items():
        patched = bytearray(jpeg_data)
        patched[offset] = value
        reason = nvjpeg_refusal(bytes(patched))
        assert reason is not None and expected in reason, (expected, reason)
    rgb_ids = bytearray(jpeg_data)
    rgb_ids[sof + 10:sof + 19:3] = b"RGB"                      # component ids
    assert "component ids R, G, B" in nvjpeg_refusal(bytes(rgb_ids))
    adobe = jpeg_data[:2] + b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00" + jpeg_data[2:]
    assert "Adobe transform 0" in nvjpeg_refusal(adobe)
    ycc = jpeg_data[:2] + b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01" + jpeg_data[2:]
    assert nvjpeg_refusal(ycc) is None


# -- the device choice -----------------------------------------------------------------------

def test_cuda_decoder_needs_nvjpeg(monkeypatch):
    monkeypatch.setattr(jpeg, "nvjpeg_unavailable", lambda: "torchvision cannot be imported (test)")
    with pytest.raises(RuntimeError, match=r"ImageDecoder\(device='cuda'\): torchvision cannot be imported"):
        ImageDecoder("cuda")
    assert choose_decode_device("cuda") == ("cpu", "nvJPEG unavailable (torchvision cannot be imported "
                                                   "(test)): OpenCV on the CPU")
    decoder, reason = ImageDecoder.for_pipeline("cuda", workers=2)
    assert decoder.device == "cpu" and "torchvision cannot be imported" in reason
    device, reason = choose_decode_device("cpu")
    assert device == "cpu" and "'cpu'" in reason


def test_nvjpeg_availability_here():
    """Without CuPy, a GPU or torchvision (this machine) the reason names what is missing."""
    reason = nvjpeg_unavailable()
    if reason is None:
        pytest.skip("nvJPEG is available here: test/gpu/test_jpeg_gpu.py covers it")
    assert any(word in reason for word in ("CuPy", "CUDA", "torch"))
    with pytest.raises(RuntimeError, match=r"ImageDecoder\(device='cuda'\)"):
        ImageDecoder("cuda")
