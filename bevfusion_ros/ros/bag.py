"""rosbag2-compatible MCAP bags: write and read ROS 2 messages without ``rosbag2_py``.

The files follow what rosbag2's MCAP storage plugin (``rosbag2_storage_mcap``) writes, so that
``ros2 bag info/play`` and Foxglove read them:

* header profile ``ros2``; library ``bevfusion_ros <version>; mcap-python <version>``;
* one schema per message type: name ``pkg/msg/Type``, encoding ``ros2msg``, data the complete
  message definition (:func:`message_definition`);
* one channel per topic: message encoding ``cdr`` (``rclpy.serialization``), metadata
  ``offered_qos_profiles`` (YAML, rosbag2 metadata version 9: reliable, volatile, keep_last;
  ``/tf_static`` transient_local, as tf2's static broadcaster offers it, so that ``ros2 bag play``
  latches it) and ``topic_type_hash`` (``RIHS01_...`` from the type's installed ``.json``);
* message log time = the time a recorder received it (what ``ros2 bag play`` replays by),
  publish time = ``publish_time_ns`` or the log time;
* on close, a ``rosbag2`` metadata record with ``serialized_metadata`` (the bag's
  ``metadata.yaml`` content, version 9), which is where rosbag2 reads the metadata version that
  tells it how to parse ``offered_qos_profiles``;
* zstd-compressed chunks (rosbag2 reads them; its own default is uncompressed).

Reading (:func:`read_bag`, :func:`bag_summary`) uses the ``mcap`` package and deserialises with
``rclpy.serialization`` into the message classes named by the schemas (they must be importable).
Every problem with a bag file (absent, truncated, not MCAP, unknown type) raises
:class:`BagError`.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import struct
import sys
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import yaml
from rclpy.serialization import deserialize_message, serialize_message

try:  # the "bag" extra: pip install mcap==1.6.0 mcap-ros2-support==0.6.0
    import mcap
    from mcap.exceptions import McapError
    from mcap.reader import make_reader
    from mcap.writer import CompressionType, Writer
except ImportError as _error:  # pragma: no cover - exercised only without the extra
    _MCAP_MISSING: ImportError | None = _error
else:
    _MCAP_MISSING = None

__all__ = ["BagError", "BagMessage", "BagWriter", "DELIMITER", "SCHEMA_ENCODING",
           "MESSAGE_ENCODING", "bag_custom_data", "bag_summary", "message_class", "message_definition",
           "read_bag", "read_metadata", "type_name_of"]

PROFILE = "ros2"
SCHEMA_ENCODING = "ros2msg"
MESSAGE_ENCODING = "cdr"
#: Line between the definitions of a complete ``ros2msg`` definition (rosbag2's delimiter).
DELIMITER = "=" * 80
#: Topics offered transient_local (latched) in ``offered_qos_profiles``.
LATCHED_TOPICS = frozenset({"/tf_static"})
#: rosbag2 metadata version of the ``serialized_metadata`` and QoS YAML written here (Jazzy+:
#: QoS policies as strings).
ROSBAG2_METADATA_VERSION = 9
#: Name of the MCAP metadata record that holds rosbag2's ``metadata.yaml`` content.
ROSBAG2_METADATA_RECORD = "rosbag2"

# rosbag2_cpp LocalMessageDefinitionSource: field types of a .msg ("foo_msgs/Bar" in
# "foo_msgs/Bar[] bar"), matched only at the start of the text or of a line.
_MSG_FIELD_TYPE = re.compile(r"(?:^|\n)\s*([a-zA-Z0-9_/]+)(?:\[[^\]]*\])?\s+")
_PRIMITIVE_TYPES = frozenset({"bool", "byte", "char", "float32", "float64", "int8", "uint8",
                              "int16", "uint16", "int32", "uint32", "int64", "uint64", "string",
                              "wstring"})
_NAME = r"[a-zA-Z][a-zA-Z0-9_]*"
_TYPE_NAME = re.compile(rf"^({_NAME})/(?:({_NAME})/)?({_NAME})$")


class BagError(Exception):
    """A bag cannot be written or read: absent or corrupt file, unknown type, misuse."""


def _require_mcap() -> None:
    if _MCAP_MISSING is not None:
        raise BagError("bags need the mcap package: pip install mcap==1.6.0 "
                       f"mcap-ros2-support==0.6.0 (the 'bag' extra) ({_MCAP_MISSING})")


# ----------------------------------------------------------------------------------------------
# Message definitions and type names
# ----------------------------------------------------------------------------------------------

def _split_type_name(type_name: str) -> tuple[str, str, str]:
    """``pkg/msg/Name`` or ``pkg/Name`` -> (pkg, namespace, Name)."""
    match = _TYPE_NAME.match(type_name)
    if match is None:
        raise BagError(f"not a ROS 2 message type name: {type_name!r} (expected pkg/msg/Name)")
    package, namespace, name = match.groups()
    return package, namespace or "msg", name


def _share_directories(package: str) -> list[Path]:
    """Where ``package``'s share folder may be: the ament index, then ``<sys.prefix>/share``."""
    found = []
    try:
        from ament_index_python import get_package_share_directory
        found.append(Path(get_package_share_directory(package)))
    except Exception:  # noqa: BLE001 - PackageNotFoundError, unset AMENT_PREFIX_PATH, no module
        pass
    fallback = Path(sys.prefix) / "share" / package
    if fallback not in found:
        found.append(fallback)
    return found


def _interface_file(package: str, namespace: str, name: str, extension: str) -> Path | None:
    for share in _share_directories(package):
        path = share / namespace / f"{name}{extension}"
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=None)
def _msg_text(type_name: str) -> tuple[str, tuple[str, ...]]:
    """The ``.msg`` text of ``type_name`` and its non-primitive field types (sorted, as rosbag2's
    ``std::set``), named as in the text, relative names qualified with the package."""
    package, namespace, name = _split_type_name(type_name)
    path = _interface_file(package, namespace, name, ".msg")
    if path is None:
        places = ", ".join(str(share / namespace / f"{name}.msg")
                           for share in _share_directories(package))
        raise BagError(f"no message definition for {type_name}: none of {places} exists")
    text = path.read_text(encoding="utf-8")
    dependencies = set()
    for match in _MSG_FIELD_TYPE.finditer(text):
        field_type = match.group(1)
        if field_type in _PRIMITIVE_TYPES:
            continue
        dependencies.add(field_type if "/" in field_type else f"{package}/{field_type}")
    return text, tuple(sorted(dependencies))


@lru_cache(maxsize=None)
def message_definition(type_name: str) -> str:
    """The complete ROS 2 message definition of ``type_name`` (``pkg/msg/Name``), as rosbag2's
    MCAP storage writes it in a schema of encoding ``ros2msg``.

    The type's own ``.msg`` text comes first; then, depth first, every nested type once
    (dependencies of each type in sorted order): a newline, a line of 80 ``=``, a line
    ``MSG: pkg/Name`` and that type's ``.msg`` text (exactly rosbag2_cpp's
    ``LocalMessageDefinitionSource::get_full_text``). The ``.msg`` files are looked up through
    the ament index, else in ``<sys.prefix>/share/<pkg>/msg/``. Raises :class:`BagError` when a
    definition is missing.
    """
    seen: set[str] = set()

    def append(current: str, depth: int) -> str:
        if depth <= 0:
            raise BagError(f"message definition of {type_name} nests too deeply")
        text, dependencies = _msg_text(current)
        parts = [text]
        for dependency in dependencies:
            if dependency not in seen:
                seen.add(dependency)
                parts.append(f"\n{DELIMITER}\nMSG: {dependency}\n")
                parts.append(append(dependency, depth - 1))
        return "".join(parts)

    return append(type_name, 50)


def type_name_of(message: Any) -> str:
    """``pkg/msg/Name`` of an rclpy message instance (or class), e.g. ``sensor_msgs/msg/Image``."""
    cls = message if isinstance(message, type) else type(message)
    module = getattr(cls, "__module__", "").split(".")
    if (len(module) < 3 or not hasattr(cls, "get_fields_and_field_types")
            or not hasattr(type(cls), "_TYPE_SUPPORT")):
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} is not a ROS 2 message type")
    return f"{module[0]}/{module[1]}/{cls.__name__}"


@lru_cache(maxsize=None)
def message_class(type_name: str) -> type:
    """The rclpy message class of ``pkg/msg/Name`` (or ``pkg/Name``); BagError when it is not
    a message type name or not importable here."""
    package, namespace, name = _split_type_name(type_name)
    try:
        module = importlib.import_module(f"{package}.{namespace}")
        return getattr(module, name)
    except (ImportError, AttributeError) as error:
        raise BagError(f"message type {type_name} is not importable in this Python "
                       f"({error}); install its interface package") from error


@lru_cache(maxsize=None)
def _type_hash(type_name: str) -> str:
    """``RIHS01_...`` type hash from the interface's installed ``.json``; '' when unavailable."""
    try:
        package, namespace, name = _split_type_name(type_name)
        path = _interface_file(package, namespace, name, ".json")
        if path is None:
            return ""
        full_name = f"{package}/{namespace}/{name}"
        for entry in json.loads(path.read_text(encoding="utf-8")).get("type_hashes", []):
            if entry.get("type_name") == full_name:
                return str(entry.get("hash_string", ""))
    except (OSError, ValueError, BagError):
        pass
    return ""


def _qos_yaml(topic: str) -> str:
    """``offered_qos_profiles`` of a topic: one profile, rosbag2 metadata version 9 YAML."""
    latched = topic in LATCHED_TOPICS
    profile = {
        "history": "keep_last",
        "depth": 1 if latched else 10,
        "reliability": "reliable",
        "durability": "transient_local" if latched else "volatile",
        "deadline": {"sec": 0, "nsec": 0},  # unspecified: the RMW default (infinite)
        "lifespan": {"sec": 0, "nsec": 0},
        "liveliness": "automatic",
        "liveliness_lease_duration": {"sec": 0, "nsec": 0},
        "avoid_ros_namespace_conventions": False,
    }
    return yaml.safe_dump([profile], sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def _library() -> str:
    try:
        from importlib.metadata import version
        ours = version("bevfusion_ros")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        ours = "unknown"
    return f"bevfusion_ros {ours}; mcap-python {getattr(mcap, '__version__', '?')}"


@dataclass
class _Topic:
    type_name: str
    channel_id: int
    count: int = 0
    sequence: int = 0


class BagWriter:
    """Writes ROS 2 messages to a new ``.mcap`` file (replacing an existing one).

    ``with BagWriter("out.mcap") as bag: bag.write("/topic", msg, log_time_ns)``. A topic's
    schema and channel are registered on its first message; a topic keeps its first type
    (another type raises :class:`BagError`). :meth:`write_serialized` writes CDR bytes already
    made (e.g. :func:`bevfusion_ros.ros.convert.serialize_detections`). ``custom_data`` (str ->
    str) goes into rosbag2's metadata (``custom_data`` of ``metadata.yaml``);
    :meth:`add_metadata` adds an MCAP metadata record (read back with :func:`read_metadata`).
    ``close()`` (or leaving the ``with`` block) finishes the file: until then it is not a valid
    MCAP file.
    """

    def __init__(self, path: str | Path, *, compression: str = "zstd",
                 chunk_size: int = 4 * 1024 * 1024) -> None:
        _require_mcap()
        self.path = Path(path)
        kinds = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4,
                 "none": CompressionType.NONE}
        if compression not in kinds:
            raise ValueError(f"compression must be one of {list(kinds)}, got {compression!r}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        except OSError as error:
            raise BagError(f"cannot create bag {self.path}: {error}") from error
        self._writer = Writer(self._stream, chunk_size=chunk_size, compression=kinds[compression])
        self._writer.start(profile=PROFILE, library=_library())
        self._schemas: dict[str, int] = {}
        self._topics: dict[str, _Topic] = {}
        self.start_time_ns: int | None = None
        self.end_time_ns: int | None = None
        self.custom_data: dict[str, str] = {}
        self.closed = False

    def __enter__(self) -> "BagWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def message_counts(self) -> dict[str, tuple[str, int]]:
        """``{topic: (type_name, messages written)}`` so far."""
        return {topic: (info.type_name, info.count) for topic, info in self._topics.items()}

    def _topic(self, topic: str, type_name: str) -> _Topic:
        info = self._topics.get(topic)
        if info is not None:
            if info.type_name != type_name:
                raise BagError(f"topic {topic} already holds {info.type_name} messages; "
                               f"cannot also write a {type_name} to it")
            return info
        schema_id = self._schemas.get(type_name)
        if schema_id is None:
            schema_id = self._writer.register_schema(
                name=type_name, encoding=SCHEMA_ENCODING,
                data=message_definition(type_name).encode("utf-8"))
            self._schemas[type_name] = schema_id
        channel_id = self._writer.register_channel(
            topic=topic, message_encoding=MESSAGE_ENCODING, schema_id=schema_id,
            metadata={"offered_qos_profiles": _qos_yaml(topic),
                      "topic_type_hash": _type_hash(type_name)})
        info = self._topics[topic] = _Topic(type_name, channel_id)
        return info

    def write(self, topic: str, message: Any, log_time_ns: int,
              publish_time_ns: int | None = None) -> None:
        """Serialise ``message`` (CDR) onto ``topic`` at ``log_time_ns`` (ns since the epoch)."""
        self.write_serialized(topic, type_name_of(message), serialize_message(message), log_time_ns,
                              publish_time_ns)

    def write_serialized(self, topic: str, type_name: str, data: bytes, log_time_ns: int,
                         publish_time_ns: int | None = None) -> None:
        """CDR bytes ``data`` of a ``type_name`` (``pkg/msg/Name``) message onto ``topic`` at
        ``log_time_ns``, written as they are."""
        if self.closed:
            raise BagError(f"bag {self.path} is closed")
        if not topic.startswith("/"):
            raise BagError(f"topic names in a bag are absolute: got {topic!r}")
        log_time_ns = int(log_time_ns)
        publish_time_ns = log_time_ns if publish_time_ns is None else int(publish_time_ns)
        if log_time_ns < 0 or publish_time_ns < 0:
            raise BagError(f"negative time for {topic}: log {log_time_ns}, publish {publish_time_ns}")
        info = self._topic(topic, "/".join(_split_type_name(type_name)))
        self._writer.add_message(channel_id=info.channel_id, log_time=log_time_ns, data=bytes(data),
                                 publish_time=publish_time_ns, sequence=info.sequence)
        info.sequence = (info.sequence + 1) & 0xFFFFFFFF
        info.count += 1
        self.start_time_ns = log_time_ns if self.start_time_ns is None else min(self.start_time_ns, log_time_ns)
        self.end_time_ns = log_time_ns if self.end_time_ns is None else max(self.end_time_ns, log_time_ns)

    def add_metadata(self, name: str, values: Mapping[str, str]) -> None:
        """An MCAP metadata record ``name`` holding ``values`` (str -> str)."""
        if self.closed:
            raise BagError(f"bag {self.path} is closed")
        if name == ROSBAG2_METADATA_RECORD:
            raise BagError(f"metadata record {name!r} is rosbag2's own (written at close)")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
            raise BagError(f"metadata record {name!r}: keys and values must be strings")
        self._writer.add_metadata(name, dict(values))

    def _serialized_metadata(self) -> str:
        """rosbag2's ``metadata.yaml`` content (``rosbag2_bagfile_information``'s value)."""
        start = self.start_time_ns or 0
        duration = (self.end_time_ns or 0) - start
        total = sum(info.count for info in self._topics.values())
        topics = [{"topic_metadata": {"name": topic, "type": info.type_name,
                                      "serialization_format": MESSAGE_ENCODING,
                                      "offered_qos_profiles": _qos_yaml(topic),
                                      "type_description_hash": _type_hash(info.type_name)},
                   "message_count": info.count}
                  for topic, info in self._topics.items()]
        metadata = {
            "version": ROSBAG2_METADATA_VERSION,
            "storage_identifier": "mcap",
            "duration": {"nanoseconds": duration},
            "starting_time": {"nanoseconds_since_epoch": start},
            "message_count": total,
            "topics_with_message_count": topics,
            "compression_format": "",
            "compression_mode": "",
            "relative_file_paths": [self.path.name],
            "files": [{"path": self.path.name,
                       "starting_time": {"nanoseconds_since_epoch": start},
                       "duration": {"nanoseconds": duration},
                       "message_count": total}],
            "custom_data": dict(self.custom_data),
            "ros_distro": os.environ.get("ROS_DISTRO", "kilted"),
        }
        return yaml.safe_dump(metadata, sort_keys=False)

    def close(self) -> None:
        """Writes the rosbag2 metadata record and the summary; closes the file. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self._writer.add_metadata(ROSBAG2_METADATA_RECORD,
                                      {"serialized_metadata": self._serialized_metadata()})
            self._writer.finish()
        finally:
            self._stream.close()


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BagMessage:
    """One message of a bag, deserialised into its rclpy class."""

    topic: str
    type_name: str
    log_time_ns: int
    message: Any


def _check_file(path: str | Path) -> Path:
    _require_mcap()
    path = Path(path)
    if not path.is_file():
        raise BagError(f"bag {path} does not exist" if not path.exists()
                       else f"bag {path} is not a file")
    return path


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as error:
        raise BagError(f"cannot open bag {path}: {error}") from error


def _corrupt(path: str | Path, error: BaseException) -> BagError:
    return BagError(f"bag {path} is not a readable MCAP file ({type(error).__name__}: {error})")


# What the mcap reader raises on damaged files (bad magic, truncation, bad records/compression).
_READ_ERRORS: tuple[type[BaseException], ...] = (ValueError, EOFError, KeyError, IndexError,
                                                 OSError, UnicodeDecodeError, struct.error)
if _MCAP_MISSING is None:
    _READ_ERRORS = (McapError, *_READ_ERRORS)
try:
    import zstandard as _zstd
    _READ_ERRORS = (*_READ_ERRORS, _zstd.ZstdError)
except ImportError:  # pragma: no cover - mcap reads zstd chunks with it
    pass


def read_bag(path: str | Path,
             topics: Iterable[str] | None = None) -> Generator[BagMessage, None, None]:
    """Messages of the bag at ``path`` (only ``topics`` when given), in log-time order,
    deserialised into their rclpy classes.

    An absent file raises :class:`BagError` at once; a corrupt file, a non-CDR channel or a type
    that cannot be imported raise it while iterating. The returned generator holds the file
    open until it is exhausted or closed (``.close()``).
    """
    path = _check_file(path)
    selected = None if topics is None else [topics] if isinstance(topics, str) else list(topics)
    return _iter_bag(path, selected)


def _iter_bag(path: Path, topics: list[str] | None) -> Generator[BagMessage, None, None]:
    with _open(path) as stream:
        try:
            reader = make_reader(stream)
            records = reader.iter_messages(topics=topics, log_time_order=True)
            for schema, channel, record in records:
                if channel.message_encoding != MESSAGE_ENCODING or schema is None:
                    raise BagError(f"bag {path}: topic {channel.topic} has message encoding "
                                   f"{channel.message_encoding!r}, not a ROS 2 CDR channel")
                cls = message_class(schema.name)
                try:
                    message: Any = deserialize_message(record.data, cls)
                except Exception as error:  # noqa: BLE001 - rclpy raises plain exceptions
                    raise BagError(f"bag {path}: cannot deserialise a {schema.name} on "
                                   f"{channel.topic} at {record.log_time} ns: {error}") from error
                yield BagMessage(channel.topic, schema.name, int(record.log_time), message)
        except BagError:
            raise
        except _READ_ERRORS as error:
            raise _corrupt(path, error) from error


def bag_summary(path: str | Path) -> dict[str, tuple[str, int]]:
    """``{topic: (type_name, message count)}`` of the bag at ``path``, from its summary
    section (a scan of the whole file when it has none)."""
    path = _check_file(path)
    with _open(path) as stream:
        try:
            reader = make_reader(stream)
            summary = reader.get_summary()
            if summary is not None and summary.statistics is not None:
                counts = summary.statistics.channel_message_counts
                return {channel.topic: (summary.schemas[channel.schema_id].name
                                        if channel.schema_id in summary.schemas else "",
                                        int(counts.get(channel_id, 0)))
                        for channel_id, channel in sorted(summary.channels.items())}
            out: dict[str, tuple[str, int]] = {}
            for schema, channel, _ in reader.iter_messages(log_time_order=False):
                name, count = out.get(channel.topic, (schema.name if schema else "", 0))
                out[channel.topic] = (name, count + 1)
            return out
        except _READ_ERRORS as error:
            raise _corrupt(path, error) from error


def read_metadata(path: str | Path, name: str) -> dict[str, str] | None:
    """The values of the MCAP metadata record ``name`` of the bag at ``path`` (the first such
    record), None when it has none; :class:`BagError` when the file is unreadable."""
    path = _check_file(path)
    with _open(path) as stream:
        try:
            for record in make_reader(stream).iter_metadata():
                if record.name == name:
                    return dict(record.metadata)
        except _READ_ERRORS as error:
            raise _corrupt(path, error) from error
    return None


def bag_custom_data(path: str | Path) -> dict[str, str]:
    """rosbag2's ``custom_data`` of the bag at ``path`` (from its ``rosbag2`` metadata record;
    empty when it has none)."""
    record = read_metadata(path, ROSBAG2_METADATA_RECORD)
    if not record or "serialized_metadata" not in record:
        return {}
    try:
        metadata = yaml.safe_load(record["serialized_metadata"]) or {}
    except yaml.YAMLError as error:
        raise BagError(f"bag {path}: unreadable rosbag2 metadata: {error}") from error
    custom = metadata.get("custom_data") if isinstance(metadata, dict) else None
    return {str(k): str(v) for k, v in custom.items()} if isinstance(custom, dict) else {}
