"""Content-addressed cache of serialized TensorRT engines (``.plan`` files).

A plan is only valid for the exact ONNX bytes, TensorRT version, GPU model and build settings
it was built from. :meth:`PlanCache.key` hashes all of them into the file name, so changing
any field (a re-exported model, a TensorRT upgrade, another GPU, int8 instead of fp16, another
workspace size) looks up a different file: a stale plan is never loaded, and plans of several
models, GPUs or versions share one folder. Next to each ``<digest>.plan`` a ``<digest>.json``
sidecar records the key fields (for people, and checked again on load) and the plan's sha256.

Writes are atomic (temporary file in the same folder, ``fsync``, ``os.replace``) and the plan
is written before its sidecar, so a reader never sees a partial plan, even while another
process stores the same key. TensorRT's timing cache (per TensorRT version and GPU, shared by
all models) lives in the same folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

LOGGER = logging.getLogger(__name__)
DIGEST_LENGTH = 24
"""Hex digits of the sha256 of the key fields used in file names (96 bits)."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/bevfusion_ros/tensorrt`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bevfusion_ros" / "tensorrt"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest(fields: dict[str, object]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return sha256_hex(canonical.encode())[:DIGEST_LENGTH]


@dataclass(frozen=True)
class PlanKey:
    """Everything a serialized engine depends on; ``file_name`` is derived from all of it."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    flags: tuple[str, ...]

    def fields(self) -> dict[str, object]:
        """The key as JSON-ready fields (``flags`` as a list)."""
        fields = asdict(self)
        fields["flags"] = list(self.flags)
        return fields

    @property
    def file_name(self) -> str:
        """``<digest>.plan``."""
        return f"{_digest(self.fields())}.plan"


class PlanCache:
    """A folder of ``.plan`` files with JSON sidecars; see the module docstring."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def key(self, onnx_bytes_sha256: str, tensorrt_version: str, gpu_name: str,
            compute_capability: str, precision: str, flags: tuple[str, ...]) -> PlanKey:
        """The key of a build; its ``file_name`` names the plan. ``flags`` are the build
        options as strings (order-insensitive: they are sorted)."""
        return PlanKey(onnx_bytes_sha256, tensorrt_version, gpu_name, compute_capability,
                       precision, tuple(sorted(flags)))

    def plan_path(self, key: PlanKey) -> Path:
        return self.directory / key.file_name

    def sidecar_path(self, key: PlanKey) -> Path:
        return self.plan_path(key).with_suffix(".json")

    def load(self, key: PlanKey) -> bytes | None:
        """The cached plan, or ``None`` when absent or when its sidecar does not vouch for it
        (other key fields, or a plan whose sha256 differs from the recorded one)."""
        sidecar, plan_path = self.sidecar_path(key), self.plan_path(key)
        if not sidecar.is_file() or not plan_path.is_file():
            return None
        try:
            record = json.loads(sidecar.read_text())
        except (OSError, ValueError) as error:
            LOGGER.warning("ignoring unreadable plan sidecar %s: %s", sidecar, error)
            return None
        if record.get("key") != key.fields():
            LOGGER.warning("ignoring plan %s: its sidecar records another key", plan_path)
            return None
        plan = plan_path.read_bytes()
        if sha256_hex(plan) != record.get("plan_sha256"):
            LOGGER.warning("ignoring plan %s: its sha256 differs from the sidecar's", plan_path)
            return None
        return plan

    def store(self, key: PlanKey, plan: bytes, source: str = "") -> Path:
        """Write ``plan`` and then its sidecar atomically; returns the plan's path.

        ``source`` (e.g. the ONNX path) is recorded in the sidecar for people only.
        """
        record = {"key": key.fields(), "plan_sha256": sha256_hex(plan), "plan_bytes": len(plan),
                  "source": source}
        path = self.plan_path(key)
        atomic_write(path, plan)
        atomic_write(self.sidecar_path(key), (json.dumps(record, indent=2) + "\n").encode())
        return path

    def timing_cache_path(self, tensorrt_version: str, gpu_name: str,
                          compute_capability: str) -> Path:
        """TensorRT timing cache shared by every build on this TensorRT version and GPU."""
        digest = _digest({"tensorrt_version": tensorrt_version, "gpu_name": gpu_name,
                          "compute_capability": compute_capability})
        return self.directory / f"timing-{digest}.cache"


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
