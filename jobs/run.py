"""The driver of one run: validate everything that can fail early, stream the Ray Data pipeline, commit."""

from __future__ import annotations

import logging
import os
import platform
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from actors.checkpoint import resolve_image_geometry
from pipeline.budget import start_ledger
from pipeline.config import ConfigError, JobConfig
from pipeline.document_pages import DocumentPages
from pipeline.documents import DocumentListing
from pipeline.images import ImageGeometry
from pipeline.rows import RETRYABLE, Status
from pipeline.sink import RunWriter, committed_runs, read_committed
from pipeline.storage import StorageError, check_bucket, check_input, is_s3

log = logging.getLogger("docqa")

VERSIONED_PACKAGES = ("docqa", "ray", "torch", "transformers", "pymupdf", "pdf2image", "pyarrow")


def new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass
class RunStats:
    """Counts kept as result batches arrive: drives the progress line and the final summary."""

    started: float = field(default_factory=time.monotonic)
    document_status: dict[str, str] = field(default_factory=dict)  # worst status seen per document
    page_status: Counter[str] = field(default_factory=Counter)
    answers: int = 0
    rows: int = 0
    _pages_seen: set[tuple[str, int]] = field(default_factory=set)

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        columns = table.select(["document", "page_number", "question_id", "status"]).to_pydict()
        for document, page, question, status in zip(*columns.values(), strict=True):
            if status == Status.OK and question is not None:
                self.answers += 1
            if page is not None and (document, page) not in self._pages_seen:
                self._pages_seen.add((document, page))
                self.page_status[status] += 1
            previous = self.document_status.get(document, Status.OK.value)
            self.document_status[document] = status if previous == Status.OK else previous

    @property
    def pages(self) -> int:
        return sum(self.page_status.values())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def progress_line(self) -> str:
        rate = self.pages / self.elapsed if self.elapsed > 0 else 0.0
        return (
            f"documents {len(self.document_status)} · pages {self.pages} · "
            f"answers {self.answers} · {rate:.2f} pages/s · {self.elapsed:.0f}s"
        )

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
    record_path: str
    counts: dict[str, Any]
    wall_s: float
    ledger: dict[str, int]
    stage_stats: str = ""  # Ray Data's per-operator statistics of the run

    def text(self) -> str:
        documents = self.counts["documents"]
        ok = documents.get(Status.OK.value, 0)
        failed = {status: n for status, n in documents.items() if status != Status.OK}
        failed_text = ", ".join(f"{n} {status}" for status, n in failed.items()) or "none"
        pages = sum(self.counts["pages"].values())
        return (
            f"run {self.run_id} committed\n"
            f"  documents: {ok + sum(failed.values())} ({ok} ok; failed: {failed_text})\n"
            f"  pages: {pages} ({self.counts['pages'].get(Status.OK.value, 0)} ok) · answers: {self.counts['answers']}"
            f" · rows: {self.counts['rows']}\n"
            f"  skipped (unchanged since a committed run): {self.ledger['unchanged_documents']} · left for the next"
            f" run: {self.ledger['left_documents'] + self.ledger['deferred_documents']}\n"
            f"  wall time: {self.wall_s:.1f}s ({pages / max(self.wall_s, 1e-9):.2f} pages/s)\n"
            f"  output: {self.record_path.rsplit('/', 1)[0]}"
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


def completed_documents(
    config: JobConfig, committed: list[dict[str, Any]], recovered: pa.Table
) -> frozenset[tuple[str, str]]:
    """(URI, version) of documents that already have a complete, final set of rows for this config's
    fingerprint in a committed run (``committed``: their records) or in the recovered parts of this run:
    these are not processed again."""
    columns = ["run_id", "document", "source_version", "config_fingerprint", "document_rows", "status"]
    earlier = read_committed(config.output, storage=config.storage, columns=columns, records=committed)
    rows = pa.concat_tables([earlier, recovered.select(columns)])
    rows = rows.filter(pc.equal(rows.column("config_fingerprint"), config.fingerprint()))
    groups: dict[tuple[str, str, str], list[int]] = {}
    for run_id, document, version, _, expected, status in zip(*rows.to_pydict().values(), strict=True):
        if version is None:
            continue
        group = groups.setdefault((run_id, document, version), [0, expected, 0])
        group[0] += 1
        group[2] += status in RETRYABLE
    return frozenset(
        (document, version)
        for (_, document, version), (count, expected, retry) in groups.items()
        if count >= expected and not retry
    )


def build_page_dataset(
    config: JobConfig, geometry: ImageGeometry, completed: frozenset[tuple[str, str]] = frozenset(), ledger=None
):
    """The CPU part of the plan: list, then read → rasterize → split each document in one Ray task; rows are
    split pages."""
    import ray.data

    listing = DocumentListing(config.input, config.storage, completed, config.budget.max_documents, ledger)
    return ray.data.read_datasource(listing).map_batches(
        DocumentPages(config, geometry, ledger),
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=1,
        # Bounds the concurrent renders per node, and keeps Ray from fusing this task into the actor,
        # where it would hold up the GPU.
        memory=config.render.task_memory_mb * 1024 * 1024,
    )


def build_dataset(
    config: JobConfig, geometry: ImageGeometry, run_id: str, completed: frozenset[tuple[str, str]], ledger
):
    """The Ray Data plan: the CPU stages, then the model actor pool, streamed."""
    from ray.data import ActorPoolStrategy

    from actors.predictor import PagePredictor

    pool = config.actors
    return build_page_dataset(config, geometry, completed, ledger).map_batches(
        PagePredictor,
        fn_constructor_kwargs={"config": config, "geometry": geometry, "run_id": run_id},
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_gpus=pool.num_gpus_per_actor,
        num_cpus=pool.num_cpus_per_actor,
        batch_size=pool.batch_size,
        batch_format="pyarrow",
    )


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS when set, else start (or reuse) a local Ray instance."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=True)


def run_job(
    config: JobConfig, progress_interval_s: float = 5.0, run_date: str | None = None, resume: bool = False
) -> RunSummary:
    """One run: fail fast on config, model and storage problems, stream the pipeline, commit.

    Documents with committed results for this config are skipped. With ``resume``, complete documents an
    earlier attempt of the same run id wrote before it died are kept, not processed again."""
    started_at = datetime.now(UTC)
    run_id = config.run_id or new_run_id(started_at)
    from actors.families import check_checkpoint

    checkpoint = check_checkpoint(config.model)
    geometry = resolve_image_geometry(config.model, config.render)
    check_input(config.input, config.storage)
    if is_s3(config.output):
        check_bucket(config.output, config.storage)
    ensure_ray()
    check_gpus(config)
    try:
        writer = RunWriter(
            config.output,
            run_id,
            run_date or f"{started_at:%Y-%m-%d}",
            config.storage,
            config.output_rows_per_file,
            resume,
        )
    except OSError as error:
        raise StorageError(f"cannot write to output {config.output}: {error}") from None
    log.info("run %s: %s → %s", run_id, config.input, writer.directory)

    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    stats = RunStats()
    if writer.recovered.num_rows:
        log.info("resuming run %s: %d rows of an earlier attempt kept", run_id, writer.recovered.num_rows)
        stats.add(writer.recovered)
    completed = completed_documents(config, writer.committed, writer.recovered)
    ledger = start_ledger(config.budget.max_pages)
    last_report = time.monotonic()
    dataset = build_dataset(config, geometry, run_id, completed, ledger)
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        writer.write(batch)
        stats.add(batch)
        if time.monotonic() - last_report >= progress_interval_s:
            log.info("%s", stats.progress_line())
            last_report = time.monotonic()
    log.info("%s", stats.progress_line())
    ledger_report = ray.get(ledger.report.remote())
    render_isolation = ledger_report.pop("render_isolation")
    ray.kill(ledger)

    finished_at = datetime.now(UTC)
    record = {
        "run_id": run_id,
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "duration_s": round((finished_at - started_at).total_seconds(), 3),
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
        "counts": stats.counts(),
        "incremental": {"config_fingerprint": config.fingerprint(), **ledger_report},
        "render_isolation": render_isolation,
    }
    record_path = writer.commit(record)
    return RunSummary(run_id, record_path, stats.counts(), stats.elapsed, ledger_report, dataset.stats())


def nightly_run_id(date: str) -> str:
    return f"nightly-{date}"


def run_nightly(config: JobConfig, date: str, progress_interval_s: float = 5.0) -> RunSummary | None:
    """The incremental run a scheduler calls once a night: a run id fixed by the date, so that firing twice
    does nothing the second time and a rerun after a crash resumes. None when it is already committed."""
    run_id = nightly_run_id(date)
    if any(record["run_id"] == run_id for record in committed_runs(config.output, config.storage)):
        return None
    return run_job(config.model_copy(update={"run_id": run_id}), progress_interval_s, run_date=date, resume=True)
