"""The driver of one run (`docqa run`, `docqa nightly`): check everything that can fail early, stream the
Ray Data plan (jobs/plan.py) into the writer (pipeline/writing.py), commit, and say how it went."""

from __future__ import annotations

import logging
import platform
import secrets
import threading
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from actors.checkpoint import CheckpointInfo
from jobs.checkpoint_aside import CheckpointInspection
from jobs.cluster import check_cpus, check_gpus, check_render_helper, ensure_ray
from jobs.incremental import resumed_documents, skip_decision
from jobs.plan import build_dataset
from jobs.progress import ProgressReporter, ProgressSnapshot
from jobs.stats import RunStats, RunSummary
from jobs.watchdog import RunInterrupted, StallWatchdog
from pipeline.config import JobConfig
from pipeline.fingerprints import config_fingerprint, setting_digests
from pipeline.ledger import start_ledger
from pipeline.locations import check_input
from pipeline.storage import StorageError, check_writable_output, is_s3
from pipeline.tables import OutputTables, TableError, committed_runs
from pipeline.writing import RunWriter

log = logging.getLogger("docqa")

VERSIONED_PACKAGES = ("docqa", "ray", "torch", "transformers", "pymupdf", "pdf2image", "pyarrow")


def new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


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
    # No question the model may answer: no checkpoint to look at (it need not even exist), no model loaded.
    # Else it is looked at in a child process while the input is checked and Ray starts.
    inspection = CheckpointInspection(config) if config.model_answers else None
    try:
        check_input(config.input, config.storage)
        if is_s3(config.output):
            check_writable_output(config.output, config.storage)
        check_render_helper(config)  # this machine's: no Ray needed to refuse
        ensure_ray(ray_address)
        checkpoint = inspection.result() if inspection else None
    finally:
        if inspection:
            inspection.cancel()
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
            "commit": checkpoint.commit if checkpoint else None,
            "family": checkpoint.family if checkpoint else None,
            "adapter": config.model.adapter,
            "inspected": checkpoint is not None,
        },
        "image_geometry": checkpoint.geometry.__dict__ if checkpoint else None,
        "versions": package_versions(),
        "incremental": {
            "config_fingerprint": config_fingerprint(config),
            "setting_digests": setting_digests(config, OutputTables(config.output, config.storage).digest_salt()),
            "digest_salt": "output",  # the output's own random salt (pipeline/tables.py), not the old fixed one
        },
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
        return _stream(config, checkpoint, writer, record, stats, progress_interval_s)
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
    checkpoint: CheckpointInfo | None,
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
    skip = skip_decision(config, writer.tables)
    ledger = start_ledger(config.budget.max_pages, config.budget.max_documents)
    done_at_start = writer.documents_complete  # committed by an earlier attempt of this run
    dataset = build_dataset(config, checkpoint, writer.run_id, skip, ledger, resumed_documents(writer.recovered))
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
