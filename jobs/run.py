"""The driver of one run: validate everything that can fail early, stream the Ray Data pipeline, commit."""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from actors.checkpoint import resolve_image_geometry
from jobs import console
from jobs.progress import ProgressReporter, ProgressSnapshot
from jobs.watchdog import RENDER_TASK_CPUS, RunInterrupted, StallWatchdog, check_cpus
from pipeline.budget import start_ledger
from pipeline.config import ConfigError, JobConfig
from pipeline.document_pages import DocumentUnits, UnitPages, block_threshold
from pipeline.documents import DocumentListing, KnownVersions
from pipeline.images import ImageGeometry
from pipeline.rows import RETRYABLE, Status
from pipeline.sink import RunWriter
from pipeline.storage import StorageError, check_input, check_writable_output, is_s3
from pipeline.tables import CURRENT, RUNS, OutputTables, TableError, committed_runs

log = logging.getLogger("docqa")

EXIT_DEGRADED = 3  # committed, but too many pages failed with a retryable status
VERSIONED_PACKAGES = ("docqa", "ray", "torch", "transformers", "pymupdf", "pdf2image", "pyarrow")


def new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass
class RunStats:
    """Counts kept as result batches arrive: drives the progress line and the final summary. ``add`` takes
    rows of complete documents (each (page, question) once, as the writer commits them), so the counts are
    exact and their memory is one entry per document, never per page or row."""

    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)  # the same instant, comparable across processes
    first_row_s: float | None = None  # seconds from the start to the first result batch
    document_status: dict[str, str] = field(default_factory=dict)  # worst status seen per document
    page_status: Counter[str] = field(default_factory=Counter)
    answers: int = 0
    rows: int = 0
    unit_status: Counter[str] = field(default_factory=Counter)  # per page, or per document without pages
    pages_arrived: int = 0  # pages in result batches so far, complete documents or not: the progress line's

    def arrived(self, table: pa.Table) -> None:
        """A result batch as it arrives (its documents may not be complete yet)."""
        pages = table.filter(pc.is_valid(table.column("page_number")))
        self.pages_arrived += len(pages.group_by(["document", "page_number"]).aggregate([]))

    def add(self, table: pa.Table) -> None:
        """Rows of complete documents."""
        self.rows += table.num_rows
        self.answers += pc.sum(
            pc.and_(pc.equal(table.column("status"), Status.OK.value), pc.is_valid(table.column("question_id")))
        ).as_py() or 0
        units = table.group_by(["document", "page_number"], use_threads=False).aggregate([("status", "first")])
        for page, status in zip(
            units.column("page_number").to_pylist(), units.column("status_first").to_pylist(), strict=True
        ):
            self.unit_status[status] += 1
            if page is not None:
                self.page_status[status] += 1
        failed = table.filter(pc.not_equal(table.column("status"), Status.OK.value))
        for document in pc.unique(table.column("document")).to_pylist():
            self.document_status.setdefault(document, Status.OK.value)
        for document, status in zip(
            failed.column("document").to_pylist(), failed.column("status").to_pylist(), strict=True
        ):
            if self.document_status[document] == Status.OK:
                self.document_status[document] = status

    @property
    def pages(self) -> int:
        return sum(self.page_status.values())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def degraded(self, limit: float) -> dict[str, Any] | None:
        """The retryable failures' share of the pages that were not bad input (a document that could not be
        read counts as one page), when it is over ``limit``; None for a healthy run."""
        retryable = sum(n for status, n in self.unit_status.items() if status in RETRYABLE)
        considered = retryable + self.unit_status.get(Status.OK.value, 0)
        if not considered or retryable / considered <= limit:
            return None
        return {
            "retryable_pages": retryable,
            "pages": considered,
            "share": round(retryable / considered, 4),
            "limit": limit,
        }

    def counts(self) -> dict[str, Any]:
        return {
            "documents": dict(sorted(Counter(self.document_status.values()).items())),
            "pages": dict(sorted(self.page_status.items())),
            "answers": self.answers,
            "rows": self.rows,
        }


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    output: str
    counts: dict[str, Any]
    wall_s: float
    first_row_s: float | None
    ledger: dict[str, int]
    stage_stats: str = ""  # Ray Data's per-operator statistics of the run
    degraded: dict[str, Any] | None = None  # see RunStats.degraded
    first_render_s: float | None = None  # seconds from the start until a render task took its first unit

    @property
    def exit_code(self) -> int:
        return EXIT_DEGRADED if self.degraded else 0

    def text(self) -> str:
        documents = self.counts["documents"]
        ok = documents.get(Status.OK.value, 0)
        failed = {status: n for status, n in documents.items() if status != Status.OK}
        failed_text = ", ".join(f"{n} {status}" for status, n in failed.items()) or "none"
        pages = sum(self.counts["pages"].values())
        health = ""
        if self.degraded:
            health = (
                f" DEGRADED: {self.degraded['retryable_pages']} of {self.degraded['pages']} pages failed with a "
                f"retryable status (model_error, read_error), over limits.max_failed_page_share="
                f"{self.degraded['limit']:g}; the next run takes them again"
            )
        resumed = self.ledger.get("resumed_documents", 0)
        resumed = f"  of which committed by an earlier attempt of this run: {resumed} documents\n" if resumed else ""
        return (
            f"run {self.run_id} committed{health}\n"
            f"  documents: {ok + sum(failed.values())} ({ok} ok; failed: {failed_text})\n"
            f"  pages: {pages} ({self.counts['pages'].get(Status.OK.value, 0)} ok) · answers: {self.counts['answers']}"
            f" · rows: {self.counts['rows']}\n"
            f"{resumed}"
            f"  skipped (unchanged since a committed run): {self.ledger['unchanged_documents']} · left for the next"
            f" run: {self.ledger['left_documents'] + self.ledger['deferred_documents']}\n"
            f"  wall time: {self.wall_s:.1f}s (this attempt, start to commit; `docqa runs` duration_s)"
            f" · {pages / max(self.wall_s, 1e-9):.2f} pages/s\n"
            f"  output: {self.output} (tables answers, current, runs)"
        )


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def check_gpus(config: JobConfig) -> None:
    """Fail before any work when the actors need GPUs that this machine's Ray instance lacks. A cluster
    joined through RAY_ADDRESS may start GPU workers on demand (autoscaling), so there it is a warning."""
    import ray

    wanted = config.actors.num_gpus_per_actor
    available = ray.cluster_resources().get("GPU", 0)
    if wanted == 0 or available >= wanted:
        return
    message = f"actors.num_gpus_per_actor={wanted:g} but the Ray cluster has {available:g} GPUs"
    if os.environ.get("RAY_ADDRESS"):
        log.warning("%s; waiting for the autoscaler to start GPU workers", message)
        return
    quantized = f" and model.quantization=none ({config.model.quantization} needs a GPU)"
    raise ConfigError(
        f"{message} (this machine has none): submit the job to a GPU cluster (docqa submit, RAY_ADDRESS) or set "
        f"actors.num_gpus_per_actor=0{quantized if config.model.quantization != 'none' else ''}"
    )


def completed_documents(config: JobConfig, tables: OutputTables) -> KnownVersions:
    """(URI, version) of the documents not to process again: those whose rows in ``current`` are complete
    and final for this config's fingerprint. Not final: a retryable status; a status that a setting decides
    when that setting changed since the run that gave it (``JobConfig.setting_digests``); with
    ``reprocess: failed`` any status but ok; with ``reprocess: all`` everything. Reads only the columns the
    decision needs, and decides in Arrow, not row by row."""
    if config.reprocess == "all":
        return KnownVersions()
    rows = tables.read(
        CURRENT,
        columns=["document", "source_version", "document_rows", "status", "run_id"],
        filter=(ds.field("config_fingerprint") == config.fingerprint()) & ds.field("source_version").is_valid(),
    )
    status = rows.column("status")
    if config.reprocess == "failed":
        retake = pc.not_equal(status, Status.OK.value)
    else:
        retake = pc.is_in(status, value_set=pa.array(sorted(RETRYABLE), pa.string()))
    for decided, run_ids in runs_with_changed_settings(config, tables).items():
        by_run = pc.is_in(rows.column("run_id"), pa.array(run_ids, pa.string()))
        retake = pc.or_(retake, pc.and_(pc.equal(status, decided), by_run))
    groups = (
        rows.append_column("retake", pc.cast(retake, pa.int8()))
        .group_by(["document", "source_version"])
        .aggregate([("status", "count"), ("document_rows", "max"), ("retake", "max")])
    )
    final = groups.filter(
        pc.and_(
            pc.greater_equal(groups.column("status_count"), groups.column("document_rows_max")),
            pc.equal(groups.column("retake_max"), 0),
        )
    )
    return KnownVersions(final.column("document").to_pylist(), final.column("source_version").to_pylist())


def resumed_documents(recovered: pa.Table) -> KnownVersions:
    """(URI, version) of the documents an earlier attempt of this run committed: done by this run."""
    resumed = recovered.filter(pc.is_valid(recovered.column("source_version")))
    return KnownVersions(resumed.column("document").to_pylist(), resumed.column("source_version").to_pylist())


def runs_with_changed_settings(config: JobConfig, tables: OutputTables) -> dict[str, list[str]]:
    """Per status that a setting decides, the runs whose recorded setting differs from this config's; runs
    recorded before digests were kept count as unchanged."""
    now = config.setting_digests()
    changed: dict[str, list[str]] = {status: [] for status in now}
    runs = tables.read(RUNS, columns=["run_id", "record"])
    for run_id, text in zip(runs.column("run_id").to_pylist(), runs.column("record").to_pylist(), strict=True):
        recorded = json.loads(text or "{}").get("incremental", {}).get("setting_digests", {})
        for status, digest in recorded.items():
            if status in now and digest != now[status]:
                changed[status].append(run_id)
    return {status: run_ids for status, run_ids in changed.items() if run_ids}


def build_page_dataset(
    config: JobConfig,
    geometry: ImageGeometry,
    completed: KnownVersions | None = None,
    ledger=None,
    resumed: KnownVersions | None = None,
):
    """The CPU part of the plan: list (one task per listing shard, or per group of them); read and plan the
    documents of each listing block (one task per block); render and split each work unit (one task per
    unit, its pages handed on in blocks within ``render.block_mb``)."""
    import ray.data

    ray.data.DataContext.get_current().target_max_block_size = block_threshold(config, geometry)
    memory = config.render.task_memory_mb * 1024 * 1024
    # Bounds the concurrent renders per node, and keeps Ray from fusing these tasks into the actor, where they
    # would hold up the GPU.
    render = {"num_cpus": RENDER_TASK_CPUS, "memory": memory}
    # Planning a document (open it, count its pages) takes milliseconds: holding a CPU, it took the one left
    # beside the model actor on a 2-CPU node and, ranked before rendering by Ray Data (the stage holding less
    # of the object store goes first), planned every listed document before the first page was rendered
    # (bench/incremental.py). Without one, a few at a time per CPU, it runs beside the render tasks.
    planners = ray.data.TaskPoolStrategy(size=max(1, int(ray.cluster_resources().get("CPU", 1))))
    # A limit on planning tasks, not a wish for as many blocks: Ray Data's warning that a run of fewer listing
    # blocks cannot use it all would only puzzle the user.
    warnings.filterwarnings("ignore", message=r"The maximum number of concurrent tasks for 'MapBatches\(DocumentUnits")
    plan = {"num_cpus": 0, "memory": memory, "compute": planners}
    listing = DocumentListing(config.input, config.storage, completed, config.budget.max_documents, ledger, resumed)
    return (
        # The listing waits on directory and object-store pages, not on a CPU: holding one (Ray's default for a
        # read task) beside the model actor took the only CPU left on a 2-CPU node, so no document was opened
        # before the whole listing was done (bench/incremental.py: first row 47 s -> 31 s over 200,000 files).
        ray.data.read_datasource(listing, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=listing.tasks_at_once))
        # One planning task per listing block (a shard's documents taken: a few in a nightly run).
        .map_batches(DocumentUnits(config, geometry, ledger), batch_format="pyarrow", batch_size=1, **plan)
        .repartition(target_num_rows_per_block=1)  # each unit its own render task, a long document's in parallel
        .map_batches(UnitPages(config, geometry, ledger), batch_format="pyarrow", batch_size=None, **render)
    )


def build_dataset(
    config: JobConfig, geometry: ImageGeometry, run_id: str, completed: KnownVersions, ledger, resumed: KnownVersions
):
    """The Ray Data plan: the CPU stages, then the model actor pool, streamed."""
    from ray.data import ActorPoolStrategy

    from actors.predictor import PagePredictor

    pool = config.actors
    return build_page_dataset(config, geometry, completed, ledger, resumed).map_batches(
        PagePredictor,
        fn_constructor_kwargs={"config": config, "geometry": geometry, "run_id": run_id},
        # The floor is one actor, not min_actors: after a lost node Ray restarts the lost actors on the nodes
        # left, where they may hold every CPU; an idle actor above the floor is let go, so the read/render
        # tasks get a CPU back instead of waiting forever (bench/node_loss.py, the `starved` topology).
        compute=ActorPoolStrategy(min_size=1, initial_size=pool.min_actors, max_size=pool.max_actors),
        num_gpus=pool.num_gpus_per_actor,
        num_cpus=pool.num_cpus_per_actor,
        batch_size=pool.batch_size,
        batch_format="pyarrow",
    )


def ensure_ray(address: str | None = None) -> None:
    """Connect to Ray: ``address`` (``--address``), else RAY_ADDRESS, names a running cluster by its GCS
    address (HEAD:6379, ``auto`` for the one `ray start` began on this machine, or ``ray://HEAD:10001``);
    with neither, a new local instance is started, even if a cluster runs on this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address.startswith(("http://", "https://")):
        raise ConfigError(
            f"Ray address {address} is a dashboard (job server) URL: `docqa run` joins a cluster by its GCS address "
            "(--address HEAD:6379 or RAY_ADDRESS=HEAD:6379); to run on the cluster as a Ray Job, use "
            f"`docqa submit --address {address}`"
        )
    console.before_ray_init()
    ray.init(address=address, include_dashboard=False, log_to_driver=True)
    console.after_ray_init()


def run_job(
    config: JobConfig, progress_interval_s: float = 5.0, run_date: str | None = None, ray_address: str | None = None
) -> RunSummary:
    """One run: fail fast on config, model and storage problems, stream the pipeline, commit (``ray_address``:
    see ``ensure_ray``).

    Documents with complete, final rows for this config in ``current`` are skipped. A run id that an
    earlier attempt started (it died, or the nightly job is rerun) resumes: the documents that attempt
    committed are kept and not processed again."""
    started_at = datetime.now(UTC)
    stats = RunStats()
    run_id = config.run_id or new_run_id(started_at)
    from actors.families import check_checkpoint

    checkpoint = check_checkpoint(config.model)
    geometry = resolve_image_geometry(config.model, config.render)
    check_input(config.input, config.storage)
    if is_s3(config.output):
        check_writable_output(config.output, config.storage)
    ensure_ray(ray_address)
    check_gpus(config)
    import ray

    check_cpus(config, ray.cluster_resources().get("CPU", 0))
    record: dict[str, Any] = {
        "run_id": run_id,
        "started_at": started_at.isoformat(),
        "input": config.input,
        "output": config.output,
        "config": config.redacted(),
        "model": {
            "id": config.model.id,
            "revision": config.model.revision,
            "commit": checkpoint.commit,
            "family": checkpoint.family,
            "adapter": config.model.adapter,
        },
        "image_geometry": geometry.__dict__,
        "versions": package_versions(),
        "incremental": {"config_fingerprint": config.fingerprint(), "setting_digests": config.setting_digests()},
    }
    try:
        writer = RunWriter(
            config.output,
            run_id,
            run_date or f"{started_at:%Y-%m-%d}",
            config.storage,
            record,
            config.commit_rows,
            config.commit_interval_s,
            config.lease_s,
        )
    except (OSError, TableError) as error:
        raise StorageError(f"cannot write to output {config.output}: {error}") from None
    log.info("run %s (attempt %d): %s → %s", run_id, writer.attempt, config.input, config.output)
    try:
        return _stream(config, geometry, writer, record, stats, progress_interval_s)
    except BaseException as error:
        try:
            writer.fail(f"{type(error).__name__}: {error}")
        except Exception as failure:  # noqa: BLE001 - the run's own error is the one to report
            log.warning("could not mark run %s failed: %s", writer.run_id, failure)
        if isinstance(error, KeyboardInterrupt):
            raise RunInterrupted(
                f"interrupted: run {writer.run_id} is marked failed; {writer.documents_complete} complete "
                f"documents are committed and kept; the same command again with --run-id {writer.run_id} (a "
                "nightly run: the same date) resumes it"
            ) from None
        raise


def _stream(
    config: JobConfig,
    geometry: ImageGeometry,
    writer: RunWriter,
    record: dict[str, Any],
    stats: RunStats,
    progress_interval_s: float,
) -> RunSummary:
    """Run the plan into ``writer`` and commit the run; ``stats`` counts from the run's start."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    if writer.recovered.num_rows:
        log.info("resuming run %s: %d rows of an earlier attempt kept", writer.run_id, writer.recovered.num_rows)
        stats.add(writer.recovered)
    completed = completed_documents(config, writer.tables)
    ledger = start_ledger(config.budget.max_pages, config.budget.max_documents)
    done_at_start = writer.documents_complete  # committed by an earlier attempt of this run
    dataset = build_dataset(config, geometry, writer.run_id, completed, ledger, resumed_documents(writer.recovered))
    watchdog = StallWatchdog(config.limits.stall_timeout_s)
    counting = threading.Lock()

    def snapshot(listing: dict[str, int], complete: bool) -> ProgressSnapshot:
        with counting:
            return ProgressSnapshot(
                documents_done=writer.documents_complete,
                documents_listed=listing.get("taken", 0) + listing.get("resumed", 0),
                listing_complete=complete,
                pages=max(stats.pages, stats.pages_arrived),
                answers=stats.answers,
                elapsed_s=stats.elapsed,
                documents_done_at_start=done_at_start,
            )

    def listing(timeout_s: float) -> tuple[dict[str, int], bool]:
        return ray.get(ledger.listing_progress.remote(), timeout=timeout_s)

    try:
        with watchdog, ProgressReporter(snapshot, listing, progress_interval_s):
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                watchdog.beat()
                if stats.first_row_s is None:
                    stats.first_row_s = stats.elapsed
                with counting:
                    stats.arrived(batch)
                done = writer.write(batch)  # a commit can take seconds: the progress line does not wait for it
                with counting:
                    stats.add(done)
    except KeyboardInterrupt:
        if watchdog.diagnosis:  # the watchdog's interrupt, wherever it landed in the loop or on leaving it
            raise watchdog.stalled() from None
        raise
    ledger_report = ray.get(ledger.report.remote())
    render_isolation = ledger_report.pop("render_isolation")
    first_render_at = ledger_report.pop("first_render_at")
    ray.kill(ledger)

    finished_at = datetime.now(UTC)
    record = {
        **record,
        "finished_at": finished_at.isoformat(),
        "duration_s": round((finished_at - datetime.fromisoformat(record["started_at"])).total_seconds(), 3),
        "counts": stats.counts(),
        "incremental": {**record["incremental"], **ledger_report},
        "render_isolation": render_isolation,
        "degraded": stats.degraded(config.limits.max_failed_page_share),
    }
    output = writer.commit(record)
    return RunSummary(
        writer.run_id,
        output,
        stats.counts(),
        record["duration_s"],  # the one duration: `docqa runs` shows the same
        stats.first_row_s,
        ledger_report,
        dataset.stats(),
        record["degraded"],
        None if first_render_at is None else round(first_render_at - stats.started_wall, 3),
    )


def nightly_run_id(date: str) -> str:
    return f"nightly-{date}"


def run_nightly(
    config: JobConfig, date: str, progress_interval_s: float = 5.0, ray_address: str | None = None
) -> RunSummary | None:
    """The incremental run a scheduler calls once a night: a run id fixed by the date, so that firing twice
    does nothing the second time and a rerun after a crash resumes. None when it is already committed."""
    run_id = nightly_run_id(date)
    if any(record["run_id"] == run_id for record in committed_runs(config.output, config.storage)):
        return None
    return run_job(config.model_copy(update={"run_id": run_id}), progress_interval_s, date, ray_address)
