"""Decoding a frame's compressed camera images (JPEG, PNG, ...) to RGB, on the CPU or the GPU.

ROS-free. :func:`decode_rgb` is the decoding core (OpenCV, as ``cv2.imdecode(IMREAD_COLOR)``
does); ``convert.compressed_to_rgb`` uses it. :class:`ImageDecoder` decodes the images of a
frame together: on a CPU thread pool (``device="cpu"``), or as one nvJPEG batch with the images
nvJPEG cannot decode like OpenCV decoded on the CPU meanwhile (``device="cuda"``). A per-image
failure never fails the others. Which images go where, the CUDA streams, and how nvJPEG and
OpenCV differ: docs/pipeline.md, "Compressed images".
"""
from __future__ import annotations

import struct
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

try:
    import cv2
except ImportError:  # decode_rgb then raises ImportError
    cv2 = None  # type: ignore[assignment]

__all__ = ["DEFAULT_WORKERS", "ImageDecoder", "ImageError", "choose_decode_device", "decode_rgb",
           "nvjpeg_refusal", "nvjpeg_unavailable", "uint8_buffer"]

DEFAULT_WORKERS = 6           # one thread per camera of a nuScenes rig
DEVICES = ("cpu", "cuda")

# OpenCV >= 4.10 decodes straight to RGB (libjpeg-turbo writes RGB itself: no BGR->RGB pass);
# older versions decode BGR and swap.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None) if cv2 is not None else None


class ImageError(ValueError):
    """Image data (an Image/CompressedImage message, encoded bytes) that cannot be turned into
    RGB pixels."""


# ----------------------------------------------------------------------------------------------
# CPU decoding core
# ----------------------------------------------------------------------------------------------

def uint8_buffer(data: Any) -> np.ndarray:
    """``data`` (bytes, bytearray, memoryview, array.array, a uint8 NumPy array, a list of ints)
    as a flat C-contiguous uint8 array, without copying when it exposes a contiguous buffer."""
    if isinstance(data, np.ndarray) and data.dtype == np.uint8:
        return np.ascontiguousarray(data).reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:  # e.g. a plain list of ints
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def decode_rgb(data: Any, name: str = "image", format: str = "") -> np.ndarray:
    """Decodes ``data`` (JPEG, PNG, ... whatever OpenCV reads) to a C-contiguous ``[H, W, 3]``
    uint8 RGB array.

    Grey images are replicated to 3 channels, alpha is dropped, 16-bit images are scaled to
    8 bit, an EXIF orientation is applied (``cv2.imdecode`` with ``IMREAD_COLOR``). Raises
    :class:`ImageError` when the data is empty or cannot be decoded; ``name`` and ``format``
    (e.g. ``"CompressedImage"``, ``"jpeg"``) go into its message.
    """
    if cv2 is None:
        raise ImportError("decoding compressed images needs OpenCV (pip install opencv-python-headless)")
    buffer = uint8_buffer(data)
    if buffer.size == 0:
        raise ImageError(f"empty {name}" + (f" (format {format!r})" if format else ""))
    detail = (f"format {format!r}, " if format else "") + f"{buffer.size} bytes"
    try:
        if _IMREAD_RGB is not None:
            rgb = cv2.imdecode(buffer, _IMREAD_RGB)
        else:
            bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
            rgb = None if bgr is None or bgr.size == 0 else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    except cv2.error as error:
        raise ImageError(f"cannot decode {name} ({detail}): {error}") from error
    if rgb is None or rgb.size == 0:
        raise ImageError(f"cannot decode {name} ({detail})")
    return rgb


# ----------------------------------------------------------------------------------------------
# What nvJPEG may decode: the JPEG headers, read on the host
# ----------------------------------------------------------------------------------------------

_SOF_GPU = (0xC0, 0xC1, 0xC2)               # baseline, extended sequential, progressive (Huffman)
_NOT_SOF = (0xC4, 0xC8, 0xCC)               # DHT, JPG, DAC share the 0xC0-0xCF range
_EXIF_ORIENTATION = 0x0112


def _exif_orientation(tiff: memoryview) -> int | None:
    """The Orientation tag (1-8) of IFD0 of an EXIF TIFF block, None when absent or unreadable."""
    if len(tiff) < 8:
        return None
    order = bytes(tiff[:2])
    endian = "<" if order == b"II" else ">" if order == b"MM" else None
    if endian is None:
        return None
    (ifd,) = struct.unpack_from(endian + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(endian + "H", tiff, ifd)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind = struct.unpack_from(endian + "HH", tiff, entry)
        if tag == _EXIF_ORIENTATION:
            if kind == 3:                                   # SHORT, left-justified in the field
                return struct.unpack_from(endian + "H", tiff, entry + 8)[0]
            if kind == 4:                                   # LONG (not standard, seen in the wild)
                return struct.unpack_from(endian + "I", tiff, entry + 8)[0]
            return None
    return None


def nvjpeg_refusal(data: Any) -> str | None:
    """Why nvJPEG should not decode ``data`` (None: it may), from the JPEG markers up to the
    first scan.

    nvJPEG gets 8-bit, 3-component JPEGs of Huffman coding (SOF0 baseline, SOF1 extended, SOF2
    progressive) whose components are YCbCr and that carry no EXIF rotation (OpenCV applies
    it; nvJPEG does not). Everything else is refused: not a JPEG (PNG, ...), grey (1 component:
    nvJPEG's RGB output of it is not checked against OpenCV's), CMYK/YCCK (4 components),
    RGB-coded (Adobe transform 0, or component ids 'R', 'G', 'B'), lossless, hierarchical or
    arithmetic-coded frames, 12-bit samples, an EXIF orientation other than 1, headers that end
    early or have no frame header.
    """
    view = memoryview(uint8_buffer(data))
    if len(view) < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return "not a JPEG (no SOI marker)"
    position, frame, adobe_transform = 2, False, None
    while True:
        segment = _next_segment(view, position)
        if isinstance(segment, str):
            return segment
        marker, payload, position = segment
        if marker == 0xDA:                                   # start of scan: headers done
            break
        if marker == 0xE1 and bytes(payload[:6]) == b"Exif\x00\x00":
            orientation = _exif_orientation(payload[6:])
            if orientation not in (None, 1):
                return f"EXIF orientation {orientation} (OpenCV rotates/flips the image, nvJPEG would not)"
        elif marker == 0xEE and bytes(payload[:5]) == b"Adobe" and len(payload) >= 12:
            adobe_transform = payload[11]
        elif 0xC0 <= marker <= 0xCF and marker not in _NOT_SOF:
            refusal = _frame_refusal(marker, payload)
            if refusal is not None:
                return refusal
            frame = True
    if not frame:
        return "JPEG without a frame header before the first scan"
    if adobe_transform == 0:
        return "RGB-coded JPEG (Adobe transform 0)"
    return None


def _next_segment(view: memoryview, position: int) -> tuple[int, memoryview, int] | str:
    """The marker segment at ``position`` (after any fill bytes and the length-less TEM and RSTn
    markers): (marker, payload, position after it), or why the header cannot be read on."""
    size = len(view)
    while True:
        if position + 2 > size:
            return "JPEG header ends before the first scan"
        if view[position] != 0xFF:
            return f"malformed JPEG header (no marker at byte {position})"
        marker = view[position + 1]
        if marker == 0xFF:                                   # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:         # TEM, RSTn: no length
            position += 2
            continue
        if marker == 0xD9:
            return "JPEG ends (EOI) before the first scan"
        if position + 4 > size:
            return "JPEG header ends before the first scan"
        length = (view[position + 2] << 8) | view[position + 3]
        end = position + 2 + length
        if length < 2 or end > size:
            return f"truncated JPEG segment (marker 0x{marker:02X} at byte {position})"
        return marker, view[position + 4:end], end


def _frame_refusal(marker: int, payload: memoryview) -> str | None:
    """Why nvJPEG should not decode the frame of an SOF segment (None: it may)."""
    if marker not in _SOF_GPU:
        return f"SOF{marker - 0xC0} JPEG (lossless, hierarchical or arithmetic coding)"
    if len(payload) < 6:
        return "truncated JPEG frame header"
    precision, components = payload[0], payload[5]
    height, width = (payload[1] << 8) | payload[2], (payload[3] << 8) | payload[4]
    if precision != 8:
        return f"{precision}-bit JPEG"
    if components == 1:
        return "grey JPEG (1 component)"
    if components != 3:
        return f"{components}-component JPEG (CMYK/YCCK)" if components == 4 else \
            f"{components}-component JPEG"
    if len(payload) < 6 + 3 * components:
        return "truncated JPEG frame header"
    if bytes(payload[6:15:3]) == b"RGB":
        return "RGB-coded JPEG (component ids R, G, B)"
    if height == 0 or width == 0:
        return f"JPEG frame header with size {width}x{height} (height in a DNL marker)"
    return None


# ----------------------------------------------------------------------------------------------
# nvJPEG availability
# ----------------------------------------------------------------------------------------------

def nvjpeg_unavailable() -> str | None:
    """Why ``ImageDecoder(device="cuda")`` cannot work here (None: the libraries are there and
    a CUDA device is visible; the constructor still test-decodes an image)."""
    from bevfusion_ros.runtime.array_module import CUPY_INSTALLED, gpu_available
    if not CUPY_INSTALLED:
        return "CuPy is not installed"
    if not gpu_available():
        return "CuPy sees no CUDA device"
    try:
        import torch
    except Exception as error:                                   # ImportError, or a broken install
        return f"torch cannot be imported ({type(error).__name__}: {error})"
    try:
        import torchvision.io  # noqa: F401
    except Exception as error:
        return f"torchvision cannot be imported ({type(error).__name__}: {error}); nvJPEG decoding " \
               f"needs torchvision with CUDA"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (a CPU-only build?)"
    return None


def choose_decode_device(pipeline_device: str) -> tuple[str, str]:
    """(``"cuda"`` or ``"cpu"``, why) for the image decoder of a pipeline computing on
    ``pipeline_device`` (``BEVFusionPipeline.device``): nvJPEG for a GPU pipeline when
    :func:`nvjpeg_unavailable` finds nothing missing, else the CPU thread pool."""
    if pipeline_device != "cuda":
        return "cpu", f"the pipeline computes on {pipeline_device!r}: OpenCV on the CPU"
    reason = nvjpeg_unavailable()
    if reason is not None:
        return "cpu", f"nvJPEG unavailable ({reason}): OpenCV on the CPU"
    import torchvision
    return "cuda", f"nvJPEG through torchvision {torchvision.__version__} on the GPU"


# ----------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------

def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class ImageDecoder:
    """Decodes the encoded images of a frame to RGB ``[H, W, 3]`` uint8 arrays (docs/pipeline.md).

    ``device``: ``"cpu"`` (NumPy results) or ``"cuda"`` (nvJPEG; CuPy results, NumPy for the
    images decoded on the CPU). ``workers``: threads of the CPU pool (1: no pool). ``"cuda"``
    raises RuntimeError at construction, saying why, when nvJPEG cannot be used (it decodes a
    small test image, which also initialises nvJPEG outside the first frame).
    One caller at a time (:attr:`fallbacks` describes the last call); :meth:`close` ends the pool.
    """

    def __init__(self, device: str = "cpu", workers: int = DEFAULT_WORKERS):
        if device not in DEVICES:
            raise ValueError(f"ImageDecoder device must be one of {DEVICES}, got {device!r}")
        if int(workers) < 1:
            raise ValueError(f"ImageDecoder needs workers >= 1, got {workers}")
        if cv2 is None:
            raise ImportError("ImageDecoder needs OpenCV (pip install opencv-python-headless)")
        self.device = device
        self.workers = int(workers)
        #: Index -> why that image of the last :meth:`decode` call was decoded on the CPU
        #: (``device="cuda"`` only).
        self.fallbacks: dict[int, str] = {}
        self._pool = (ThreadPoolExecutor(self.workers, thread_name_prefix="bevfusion-decode")
                      if self.workers > 1 else None)
        if device == "cuda":
            reason = nvjpeg_unavailable()
            if reason is not None:
                self.close()
                raise RuntimeError(f"ImageDecoder(device='cuda'): {reason}")
            try:
                self._check_nvjpeg()
            except Exception as error:
                self.close()
                raise RuntimeError(f"ImageDecoder(device='cuda'): nvJPEG test decode failed: "
                                   f"{type(error).__name__}: {error}") from error

    @classmethod
    def for_pipeline(cls, pipeline_device: str, workers: int = DEFAULT_WORKERS) -> tuple["ImageDecoder", str]:
        """(decoder, why that device) for a pipeline computing on ``pipeline_device``: nvJPEG
        when :func:`choose_decode_device` says so and the test decode works, else the CPU."""
        device, reason = choose_decode_device(pipeline_device)
        if device == "cuda":
            try:
                return cls("cuda", workers), reason
            except RuntimeError as error:
                reason = f"{error}: OpenCV on the CPU"
        return cls("cpu", workers), reason

    def close(self) -> None:
        """Shut the CPU thread pool down (the decoder cannot decode afterwards)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "ImageDecoder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, encoded: Sequence[Any], names: Sequence[str] | None = None) -> list[Any]:
        """One result per item of ``encoded`` (bytes, memoryview, bytearray, array.array or a
        uint8 NumPy array of encoded image data), in order: an RGB ``[H, W, 3]`` uint8 array
        (NumPy, or CuPy for images nvJPEG decoded), or an :class:`ImageError` saying why that
        image could not be decoded. ``names`` (default ``image 0``, ``image 1``, ...) label the
        images in the error messages."""
        count = len(encoded)
        labels = list(names) if names is not None else [f"image {index}" for index in range(count)]
        if len(labels) != count:
            raise ValueError(f"{count} images but {len(labels)} names")
        self.fallbacks = {}
        buffers: list[Any] = []
        for data, label in zip(encoded, labels):
            try:
                buffers.append(uint8_buffer(data))
            except (TypeError, ValueError, OverflowError) as error:
                buffers.append(ImageError(f"{label}: not a byte buffer ({type(data).__name__}: {error})"))
        inline = self._pool is None or count == 1
        pending: dict[int, Future] = {}
        on_gpu: list[int] = []
        for index, buffer in enumerate(buffers):
            if isinstance(buffer, ImageError):
                pending[index] = _done(buffer)
                continue
            reason = nvjpeg_refusal(buffer) if self.device == "cuda" else "device='cpu'"
            if reason is None:
                on_gpu.append(index)
            else:
                if self.device == "cuda":
                    self.fallbacks[index] = reason
                pending[index] = self._submit(buffer, labels[index], inline)
        results: list[Any] = [None] * count
        if on_gpu:                                   # the CPU fallbacks decode meanwhile
            for index, decoded in zip(on_gpu, self._decode_gpu([buffers[index] for index in on_gpu])):
                if isinstance(decoded, Exception):
                    first_line = (str(decoded).strip().splitlines() or [type(decoded).__name__])[0]
                    self.fallbacks[index] = f"nvJPEG failed ({first_line})"
                    pending[index] = self._submit(buffers[index], labels[index], inline)
                else:
                    results[index] = decoded
        for index, future in pending.items():
            results[index] = future.result()
        return results

    def _submit(self, buffer: np.ndarray, label: str, inline: bool) -> Future:
        """:meth:`_decode_one` on the pool, or at once (``inline``: no pool, or one image)."""
        if inline:
            return _done(self._decode_one(buffer, label))
        return self._pool.submit(self._decode_one, buffer, label)

    @staticmethod
    def _decode_one(buffer: np.ndarray, label: str) -> Any:
        """:func:`decode_rgb`, its ImageError returned instead of raised."""
        try:
            return decode_rgb(buffer, label)
        except ImageError as error:
            return error

    # -- nvJPEG ---------------------------------------------------------------------------------

    def _decode_gpu(self, buffers: list[np.ndarray]) -> list[Any]:
        """nvJPEG batch of JPEG ``buffers`` -> CuPy ``[H, W, 3]`` arrays on the current CuPy
        device and stream; an image nvJPEG fails on gets its exception instead (a failing batch
        is decoded again image by image: torchvision returns no partial results)."""
        import cupy
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        device_id = cupy.cuda.Device().id
        device = torch.device("cuda", device_id)
        stream = cupy.cuda.get_current_stream()
        torch_stream = (torch.cuda.default_stream(device) if stream.ptr == 0
                        else torch.cuda.ExternalStream(stream.ptr, device=device))
        # torch.from_numpy warns on read-only arrays (bytes): nvJPEG only reads, but copy those
        # few hundred kB rather than touch the process-wide warning filters from a worker thread.
        tensors = [torch.from_numpy(buffer if buffer.flags.writeable else buffer.copy())
                   for buffer in buffers]
        with torch.cuda.stream(torch_stream):
            try:
                planar: list[Any] = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
            except (RuntimeError, ValueError) as batch_error:
                if len(tensors) == 1:
                    return [batch_error]
                planar = []
                for tensor in tensors:
                    try:
                        planar.append(decode_jpeg([tensor], mode=ImageReadMode.RGB, device=device)[0])
                    except (RuntimeError, ValueError) as error:
                        planar.append(error)
            return [image if isinstance(image, Exception)
                    else cupy.ascontiguousarray(cupy.from_dlpack(image).transpose(1, 2, 0))
                    for image in planar]

    def _check_nvjpeg(self) -> None:
        """Decode a small 4:2:0 JPEG with nvJPEG and compare it with OpenCV's decode."""
        import cupy
        yy, xx = np.mgrid[0:32, 0:48]
        rgb = np.stack([xx * 5, yy * 7, 255 - xx * 5], axis=-1).astype(np.uint8)
        ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok or nvjpeg_refusal(jpeg) is not None:
            why = nvjpeg_refusal(jpeg) if ok else "imencode failed"
            raise RuntimeError(f"OpenCV wrote no nvJPEG-decodable test JPEG ({why})")
        (decoded,) = self._decode_gpu([jpeg.reshape(-1)])
        if isinstance(decoded, Exception):
            raise decoded
        got = cupy.asnumpy(decoded)
        expected = decode_rgb(jpeg)
        if got.shape != expected.shape:
            raise RuntimeError(f"nvJPEG decoded a {expected.shape} image as {got.shape}")
        difference = np.abs(got.astype(np.int16) - expected.astype(np.int16)).mean()
        if difference > 4.0:
            raise RuntimeError(f"nvJPEG and OpenCV decodes differ by {difference:.1f} grey levels on "
                               f"average (channel order or layout wrong?)")
