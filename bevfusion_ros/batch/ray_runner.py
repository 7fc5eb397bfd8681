"""The bags of a batch run on Ray: one actor per worker, each holding one pipeline (one GPU or
CPU share, requested as Ray resources), fed one bag at a time.

``ray`` is imported inside the functions: the package imports without it (the ``batch`` extra).

* Where: :func:`ray_connection` joins the cluster at ``address`` (``auto``, ``ray://head:10001``,
  ``head:6379``), uses an instance this process already started, or starts an embedded local one
  (:func:`embedded_ray`) that reaches nothing beyond this machine (docstring there).
* Workers: ``BagWorker`` actors with ``num_cpus=cpus_per_worker``, ``num_gpus=gpus_per_worker``
  (Ray sets ``CUDA_VISIBLE_DEVICES`` of each to its GPU); as many as asked, or as the
  cluster's resources hold.
* Scheduling: an idle worker gets the next bag; a bag that fails (its error, or its worker
  died: a new worker replaces it) is tried once more, then reported as failed; the others go on.
* Progress: workers count frames on a ``ProgressBoard`` actor; the driver shows the fleet's
  :class:`~bevfusion_ros.batch.progress.FleetProgress`.
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import bevfusion_ros
from bevfusion_ros.batch.outputs import BagJob, BagReport, BatchError
from bevfusion_ros.batch.progress import FleetProgress
from bevfusion_ros.batch.settings import BatchSettings

MAX_ATTEMPTS = 2            # a failed bag is tried once more
POLL_S = 0.25               # driver loop: longest wait for a finished bag before progress is read
LOOPBACK = "127.0.0.1"
#: Environment of an embedded instance (set before ``import ray``, inherited by its processes):
#: Ray's servers listen on the loopback interface only when the node's address is 127.0.0.1,
#: and on Linux Ray replaces 127.0.0.1 by the routable address unless its "no cluster" switch
#: is off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, its default on Windows and macOS). Token
#: authentication with a fresh token held in the environment only (no ~/.ray/auth_token file);
#: no usage statistics.
EMBEDDED_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                        "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run. ``workers`` None: as many as the resources hold."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    temp_root: Path | None = None      # where the embedded instance's session folder goes
    progress_every_s: float = 5.0


class ProgressBoard:
    """Frames done per bag (a Ray actor: workers add, the driver reads)."""

    def __init__(self) -> None:
        self.frames: dict[str, int] = {}

    def add(self, name: str, frames: int = 1) -> None:
        self.frames[name] = self.frames.get(name, 0) + frames

    def reset(self, name: str) -> None:
        self.frames[name] = 0

    def snapshot(self) -> dict[str, int]:
        return dict(self.frames)


class BagWorker:
    """One pipeline (a Ray actor): :meth:`run` runs one bag through it."""

    def __init__(self, settings: BatchSettings) -> None:
        from bevfusion_ros.ros.bag_inference import BagInference
        from bevfusion_ros.runtime.memory import keep_large_buffers
        keep_large_buffers()                    # frames reuse heap blocks, as in the node's process
        self.inference = BagInference(settings)

    def describe(self) -> str:
        return f"{self.inference.worker} ({self.inference.pipeline.backend})"

    def run(self, job: BagJob, board: Any) -> BagReport:
        return self.inference.run(job, lambda: board.add.remote(job.name))


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise BatchError(f"bevfusion-batch needs Ray ({error}): pip install 'bevfusion_ros[batch]' "
                         "(ray==2.60.0)") from error
    return ray


@contextlib.contextmanager
def embedded_ray(num_cpus: int | None, temp_root: Path | None = None) -> Iterator[Any]:
    """A new local Ray instance for this process (``ray.init(address="local")``, whatever
    ``RAY_ADDRESS`` says): ``num_cpus`` (None: all), the GPUs Ray detects, no dashboard, servers
    on 127.0.0.1 only with token authentication (:data:`EMBEDDED_ENVIRONMENT`), its session
    folder in a fresh folder under ``temp_root`` (default the system's), removed with the
    instance. Workers import this process's ``bevfusion_ros`` (its folder first on their
    PYTHONPATH)."""
    saved = {name: os.environ.get(name) for name in (*EMBEDDED_ENVIRONMENT, "RAY_AUTH_TOKEN", "PYTHONPATH")}
    package_root = str(Path(bevfusion_ros.__file__).resolve().parents[1])
    os.environ.update(EMBEDDED_ENVIRONMENT, RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONPATH=os.pathsep.join(
        part for part in (package_root, saved["PYTHONPATH"]) if part))
    folder = tempfile.mkdtemp(prefix="bevfusion-ray-", dir=temp_root)
    ray = _import_ray()
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK,
                 _temp_dir=folder, configure_logging=False)
        try:
            _check_loopback(ray)
            yield ray
        finally:
            ray.shutdown()
    finally:
        _restore_environment(saved)
        shutil.rmtree(folder, ignore_errors=True)


def _restore_environment(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _check_loopback(ray: Any) -> None:
    """Refuse to go on when the embedded instance's node is not on 127.0.0.1 (``ray`` was
    imported before :data:`EMBEDDED_ENVIRONMENT` could apply)."""
    addresses = {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}
    if addresses != {LOOPBACK}:
        raise BatchError(f"the embedded Ray instance listens on {sorted(addresses)}, not only {LOOPBACK}: "
                         "ray was imported before bevfusion-batch could configure it (set "
                         "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray)")


@contextlib.contextmanager
def ray_connection(options: RayOptions) -> Iterator[Any]:
    """Ray for a run: the instance this process already holds (left running), the cluster at
    ``options.address`` (disconnected afterwards) or an embedded one (:func:`embedded_ray`,
    ``workers * cpus_per_worker`` CPUs when ``workers`` is given)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        yield ray
    elif options.address:
        ray = _import_ray()
        try:
            ray.init(address=options.address, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise BatchError(f"cannot join the Ray cluster at {options.address}: {error}") from error
        try:
            yield ray
        finally:
            ray.shutdown()
    else:
        cpus = None if options.workers is None else math.ceil(options.workers * options.cpus_per_worker)
        with embedded_ray(cpus, options.temp_root) as embedded:
            yield embedded


def worker_count(options: RayOptions, resources: dict[str, float], jobs: int) -> int:
    """Workers to start: ``options.workers``, else as many as ``resources`` (Ray's
    ``cluster_resources()``) hold; never more than ``jobs``. BatchError when none fits."""
    if options.workers is not None:
        wanted = options.workers
    else:
        fits = [resources.get("CPU", 0.0) / options.cpus_per_worker] if options.cpus_per_worker > 0 else []
        fits += [resources.get("GPU", 0.0) / options.gpus_per_worker] if options.gpus_per_worker > 0 else []
        wanted = int(min(fits)) if fits else 1
    if wanted < 1:
        raise BatchError(f"the Ray cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} "
                         f"GPUs: no worker of {options.cpus_per_worker:g} CPUs and "
                         f"{options.gpus_per_worker:g} GPUs fits")
    return max(1, min(wanted, jobs))


def _error_text(error: BaseException) -> str:
    """One line for a failed bag: the worker's own exception when Ray wraps one."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return " ".join(f"{type(error).__name__}: {error}".split())[:2000]


class _Fleet:
    """The workers of one run and the bags they are running."""

    def __init__(self, ray: Any, settings: BatchSettings, options: RayOptions, count: int) -> None:
        self.ray, self.settings = ray, settings
        self.worker_class = ray.remote(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker)(BagWorker)
        self.board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        self.idle = [self.worker_class.remote(settings) for _ in range(count)]
        self.running: dict[Any, tuple[Any, BagJob]] = {}

    def ready(self) -> list[str]:
        """Each worker's host:pid and backend once its pipeline is loaded; BatchError when one
        could not load it (e.g. a bad model folder or backend)."""
        try:
            return self.ray.get([worker.describe.remote() for worker in self.idle])
        except self.ray.exceptions.RayError as error:
            raise BatchError(f"a worker could not load the pipeline: {_error_text(error)}") from error

    def submit(self, job: BagJob) -> None:
        worker = self.idle.pop()
        self.running[worker.run.remote(job, self.board)] = (worker, job)

    def finished(self, timeout_s: float) -> list[tuple[BagJob, BagReport | str]]:
        """Bags finished within ``timeout_s``: (job, report or error text); a dead worker is
        replaced."""
        refs, _ = self.ray.wait(list(self.running), num_returns=1, timeout=timeout_s)
        results = []
        for ref in refs:
            worker, job = self.running.pop(ref)
            try:
                results.append((job, self.ray.get(ref)))
            except self.ray.exceptions.RayActorError as error:
                worker = self.worker_class.remote(self.settings)
                results.append((job, f"worker died: {_error_text(error)}"))
            except self.ray.exceptions.RayError as error:          # the bag's error, or Ray's
                results.append((job, _error_text(error)))
            self.idle.append(worker)
        return results

    def frames(self) -> dict[str, int]:
        return self.ray.get(self.board.snapshot.remote())

    def close(self) -> None:
        for worker in [*self.idle, *(worker for worker, _ in self.running.values())]:
            self.ray.kill(worker)
        self.ray.kill(self.board)


def run_jobs(jobs: list[BagJob], settings: BatchSettings, options: RayOptions, progress: FleetProgress,
             log: Callable[[str], None] = print) -> list[BagReport]:
    """Run ``jobs`` on Ray (module docstring); one report per job, in ``jobs`` order."""
    if not jobs:
        return []
    with ray_connection(options) as ray:
        count = worker_count(options, ray.cluster_resources(), len(jobs))
        fleet = _Fleet(ray, settings, options, count)
        try:
            for description in fleet.ready():
                log(f"worker ready: {description}")
            progress.restart()
            reports = _schedule(fleet, jobs, progress, options.progress_every_s, log)
        finally:
            fleet.close()
    order = {job.name: index for index, job in enumerate(jobs)}
    return sorted(reports, key=lambda report: order[report.name])


def _schedule(fleet: _Fleet, jobs: list[BagJob], progress: FleetProgress, every_s: float,
              log: Callable[[str], None]) -> list[BagReport]:
    """Give idle workers bags until every bag is done or failed twice."""
    queue = collections.deque(jobs)
    attempts: collections.Counter[str] = collections.Counter()
    reports: list[BagReport] = []
    last_line = time.monotonic()
    while queue or fleet.running:
        while queue and fleet.idle:
            job = queue.popleft()
            attempts[job.name] += 1
            fleet.submit(job)
        finished = fleet.finished(POLL_S)
        for job, outcome in finished:
            report = _settle(job, outcome, attempts[job.name], fleet, queue, log)
            if report is not None:
                reports.append(report)
                progress.bag_finished(report.status == "done")
        progress.update(fleet.frames())
        if finished or time.monotonic() - last_line >= every_s:
            log(progress.line())
            last_line = time.monotonic()
    return reports


def _settle(job: BagJob, outcome: BagReport | str, attempt: int, fleet: _Fleet,
            queue: collections.deque[BagJob], log: Callable[[str], None]) -> BagReport | None:
    """A finished attempt: its report, or a retry queued (None), or the failure's report."""
    if isinstance(outcome, BagReport):
        outcome.attempts = attempt
        log(f"bag {job.name}: {outcome.frames} frames in {outcome.seconds:.1f} s on {outcome.worker}"
            + (f", {len(outcome.problems)} problems" if outcome.problems else ""))
        return outcome
    fleet.board.reset.remote(job.name)
    if attempt < MAX_ATTEMPTS:
        log(f"bag {job.name} failed ({outcome}); trying it once more")
        queue.appendleft(job)
        return None
    log(f"bag {job.name} FAILED after {attempt} attempts: {outcome}")
    return BagReport(job.name, str(job.bag), status="failed", error=outcome, attempts=attempt)
