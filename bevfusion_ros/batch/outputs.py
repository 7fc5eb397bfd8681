"""The bags of a batch run and where their outputs go; outputs written atomically; resuming.

A bag is one ``.mcap`` file, or a rosbag2 bag folder: ``metadata.yaml`` and the MCAP files it
lists (``relative_file_paths``, in recording order: a recording split by size or duration), read
one after the other as one recording. Each bag is one :class:`BagJob` with its own folder
``OUT/bags/<name>``:

* ``detections.mcap``: the node's output topics and types, one message each per frame;
* ``detections.json``: per frame the boxes (REP-103, :meth:`Detections.to_dict`), cameras missing
  and warnings, and what the node would have reported about the bag (``problems``);
* ``metrics.json`` with ``--eval``: the bag's nuScenes-style metrics;
* ``done.json``, written last: the :class:`BagReport`, the run's fingerprint and the bag's files'
  names, sizes and times. A bag whose ``done.json`` has the same fingerprint and bag identity and
  whose outputs are all there is complete and is skipped on resume. Every file is written to a
  temporary name and renamed (:func:`atomic_path`), so an interrupted run leaves no half-written
  output under a final name.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import yaml

DETECTIONS_BAG = "detections.mcap"
DETECTIONS_JSON = "detections.json"
METRICS_JSON = "metrics.json"
DONE_FILE = "done.json"
BAGS_FOLDER = "bags"
BAG_SUFFIX = ".mcap"
ROSBAG2_METADATA = "metadata.yaml"


class BatchError(ValueError):
    """The bags or the output folder cannot be used as given."""


class FoundBag(NamedTuple):
    """A bag of :func:`find_bags`: the ``.mcap`` file or rosbag2 folder, its output name and its
    MCAP files in recording order (absolute paths)."""

    path: Path
    name: str
    files: tuple[Path, ...]


@dataclass(frozen=True)
class BagJob:
    """One bag to run: its file or folder, its MCAP files and its output folder."""

    bag: Path                          # absolute: an .mcap file or a rosbag2 bag folder
    name: str                          # unique in the run: the output folder's name
    out_dir: Path                      # OUT/bags/<name>
    files: tuple[Path, ...]            # its MCAP files, in recording order

    def path(self, file_name: str) -> Path:
        return self.out_dir / file_name

    def outputs(self, evaluation: bool) -> tuple[str, ...]:
        """The files of a complete bag (besides ``done.json``)."""
        return (DETECTIONS_BAG, DETECTIONS_JSON) + ((METRICS_JSON,) if evaluation else ())


@dataclass
class BagReport:
    """What happened to one bag; ``status`` is ``done``, ``skipped`` (complete from an earlier
    run) or ``failed`` (``error`` says why, after ``attempts`` tries)."""

    name: str
    bag: str
    status: str = "done"
    frames: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    error: str = ""
    attempts: int = 1
    backend: str = ""
    worker: str = ""                   # host:pid of the worker that ran it
    ground_truth: bool | None = None   # --eval: whether the bag carries ground truth
    mean_ap: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_bags(paths: Sequence[Path]) -> list[FoundBag]:
    """The bags given: each ``.mcap`` file, each rosbag2 bag folder (one with ``metadata.yaml``)
    and, under any other folder, recursively, its bag folders and the ``.mcap`` files outside them.
    A file is named by its stem, a bag folder by its name; what a folder holds is named by its path
    below that folder, ``/`` becoming ``__``. Raises :class:`BatchError` for a path that does not
    exist, a folder without bags, a bag folder whose files are not all MCAP files that exist, or
    two bags with one name."""
    found: list[FoundBag] = []
    for given in map(Path, paths):
        if given.is_file():
            found.append(FoundBag(given.resolve(), given.stem, (given.resolve(),)))
        elif (given / ROSBAG2_METADATA).is_file():
            found.append(FoundBag(given.resolve(), given.resolve().name, rosbag2_files(given)))
        elif given.is_dir():
            found += _bags_below(given)
        else:
            raise BatchError(f"bag {given} does not exist")
    by_name: dict[str, list[Path]] = {}
    for bag in found:
        by_name.setdefault(bag.name, []).append(bag.path)
    clashes = {name: bags for name, bags in by_name.items() if len(set(bags)) > 1}
    if clashes:
        raise BatchError("bags with the same output name: " + "; ".join(
            f"{name}: {', '.join(map(str, bags))}" for name, bags in clashes.items()) + " (rename one, or pass "
            "their common folder so they are named by their paths below it)")
    return list({bag.name: bag for bag in found}.values())


def _bags_below(folder: Path) -> list[FoundBag]:
    """The bag folders and the loose ``.mcap`` files under ``folder``, sorted by path."""
    bag_folders = sorted({metadata.parent for metadata in folder.rglob(ROSBAG2_METADATA) if metadata.is_file()})
    loose = [path for path in folder.rglob(f"*{BAG_SUFFIX}")
             if path.is_file() and not any(bag_folder in path.parents for bag_folder in bag_folders)]
    if not bag_folders and not loose:
        raise BatchError(f"folder {folder} holds no {BAG_SUFFIX} bags")

    def name(path: Path) -> str:
        return "__".join(path.relative_to(folder).with_suffix("").parts)
    bags = [FoundBag(path.resolve(), name(path), rosbag2_files(path)) for path in bag_folders]
    bags += [FoundBag(path.resolve(), name(path), (path.resolve(),)) for path in loose]
    return sorted(bags, key=lambda bag: bag.path)


def rosbag2_files(folder: Path) -> tuple[Path, ...]:
    """The MCAP files of the rosbag2 bag ``folder``, in the order of its ``metadata.yaml``'s
    ``relative_file_paths`` (:class:`BatchError` when that cannot be read, or names a file that is
    missing or not MCAP, e.g. a SQLite ``.db3`` bag)."""
    metadata_path = folder / ROSBAG2_METADATA
    try:
        metadata = yaml.safe_load(metadata_path.read_text())
        relative = metadata["rosbag2_bagfile_information"]["relative_file_paths"]
        files = tuple((folder / str(name)).resolve() for name in relative)
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise BatchError(f"bag folder {folder}: cannot read the file list of its {ROSBAG2_METADATA} "
                         f"(rosbag2_bagfile_information.relative_file_paths): {error!r}") from error
    problems = [f"{path.name} is not an {BAG_SUFFIX} file" for path in files if path.suffix != BAG_SUFFIX]
    problems += [f"{path.name} is missing" for path in files if path.suffix == BAG_SUFFIX and not path.is_file()]
    if problems or not files:
        raise BatchError(f"bag folder {folder}: " + ("; ".join(problems) or "its metadata lists no files"))
    return files


def plan_jobs(paths: Sequence[Path], out: Path) -> list[BagJob]:
    """One :class:`BagJob` per bag of :func:`find_bags`, its outputs under ``out/bags``."""
    out = Path(out).resolve()
    return [BagJob(bag.path, bag.name, out / BAGS_FOLDER / bag.name, bag.files) for bag in find_bags(paths)]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed to ``path`` when the block ends normally and
    removed when it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: Path, document: Any) -> None:
    """``document`` as indented JSON at ``path``, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(document, indent=1))


def bag_identity(job: BagJob) -> list[dict[str, Any]]:
    """Name, size and modification time of each of the bag's files: a bag that changed is run
    again."""
    return [{"file": path.name, "size": status.st_size, "mtime_ns": status.st_mtime_ns}
            for path, status in ((path, path.stat()) for path in job.files)]


def completed(job: BagJob, fingerprint: str, evaluation: bool) -> BagReport | None:
    """The report of ``job`` when an earlier run completed it with this ``fingerprint``, from
    the same bag files (names, sizes and times), with all its outputs present; else None."""
    try:
        document = json.loads(job.path(DONE_FILE).read_text())
        same_bag = document.get("bag") == bag_identity(job)
    except (OSError, ValueError, AttributeError):
        return None
    if not same_bag or document.get("fingerprint") != fingerprint:
        return None
    if not all(job.path(name).is_file() for name in job.outputs(evaluation)):
        return None
    try:
        return BagReport(**document["report"])
    except (KeyError, TypeError):
        return None


def mark_done(job: BagJob, report: BagReport, fingerprint: str) -> None:
    """Write ``done.json`` (last, atomically): the bag is complete."""
    write_json(job.path(DONE_FILE), {"fingerprint": fingerprint, "bag": bag_identity(job),
                                     "report": report.to_dict()})
