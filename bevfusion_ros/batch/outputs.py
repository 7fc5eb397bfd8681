"""The bags of a batch run and where their outputs go; outputs written atomically; resuming.

Each bag (one ``.mcap`` file) is one :class:`BagJob` with its own folder ``OUT/bags/<name>``:

* ``detections.mcap``: the node's output topics and types, one message each per frame;
* ``detections.json``: per frame the boxes (REP-103, :meth:`Detections.to_dict`), cameras missing
  and warnings, and what the node would have reported about the bag (``problems``);
* ``metrics.json`` with ``--eval``: the bag's nuScenes-style metrics;
* ``done.json``, written last: the :class:`BagReport`, the run's fingerprint and the bag file's
  size and time. A bag whose ``done.json`` has the same fingerprint and bag identity and whose
  files are all there is complete and is skipped on resume. Every file is written to a temporary
  name and renamed (:func:`atomic_path`), so an interrupted run leaves no half-written output
  under a final name.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

DETECTIONS_BAG = "detections.mcap"
DETECTIONS_JSON = "detections.json"
METRICS_JSON = "metrics.json"
DONE_FILE = "done.json"
BAGS_FOLDER = "bags"
BAG_SUFFIX = ".mcap"


class BatchError(ValueError):
    """The bags or the output folder cannot be used as given."""


@dataclass(frozen=True)
class BagJob:
    """One bag to run: its file and its output folder."""

    bag: Path                          # absolute
    name: str                          # unique in the run: the output folder's name
    out_dir: Path                      # OUT/bags/<name>

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


def find_bags(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """(bag file, output name) of each ``.mcap`` file given, or found under a given folder
    (recursively, sorted). A file's name is its stem; a folder's bags are named by their path
    below it, ``/`` becoming ``__``. Raises :class:`BatchError` for a path that does not exist,
    a folder without bags, or two bags with one name."""
    found: list[tuple[Path, str]] = []
    for given in map(Path, paths):
        if given.is_file():
            found.append((given.resolve(), given.stem))
        elif given.is_dir():
            bags = sorted(path for path in given.rglob(f"*{BAG_SUFFIX}") if path.is_file())
            if not bags:
                raise BatchError(f"folder {given} holds no {BAG_SUFFIX} bags")
            found += [(bag.resolve(), "__".join(bag.relative_to(given).with_suffix("").parts)) for bag in bags]
        else:
            raise BatchError(f"bag {given} does not exist")
    by_name: dict[str, list[Path]] = {}
    for bag, name in found:
        by_name.setdefault(name, []).append(bag)
    clashes = {name: bags for name, bags in by_name.items() if len(set(bags)) > 1}
    if clashes:
        raise BatchError("bags with the same output name: " + "; ".join(
            f"{name}: {', '.join(map(str, bags))}" for name, bags in clashes.items()) + " (rename one, or pass "
            "their common folder so they are named by their paths below it)")
    return list({name: (bag, name) for bag, name in found}.values())


def plan_jobs(paths: Sequence[Path], out: Path) -> list[BagJob]:
    """One :class:`BagJob` per bag of :func:`find_bags`, its outputs under ``out/bags``."""
    out = Path(out).resolve()
    return [BagJob(bag, name, out / BAGS_FOLDER / name) for bag, name in find_bags(paths)]


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


def bag_identity(bag: Path) -> dict[str, int]:
    """Size and modification time of a bag file: a bag that changed is run again."""
    status = bag.stat()
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns}


def completed(job: BagJob, fingerprint: str, evaluation: bool) -> BagReport | None:
    """The report of ``job`` when an earlier run completed it with this ``fingerprint``, from
    the same bag file (size and time), with all its files present; else None."""
    try:
        document = json.loads(job.path(DONE_FILE).read_text())
        same_bag = document.get("bag") == bag_identity(job.bag)
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
    write_json(job.path(DONE_FILE), {"fingerprint": fingerprint, "bag": bag_identity(job.bag),
                                     "report": report.to_dict()})
