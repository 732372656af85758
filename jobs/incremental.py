"""What a run takes on, against what the output holds: the documents a committed run finished for this config
(skipped), those an earlier attempt of this run committed (resumed), and the final statuses a changed
setting reopens. Decided in Arrow over the columns it needs, on the driver; the listing tasks get the
result as ``KnownVersions`` (64-bit hashes of (URI, version))."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.config import JobConfig
from pipeline.fingerprints import LEGACY_SALT, OCR_SETTING, config_fingerprint, setting_digests
from pipeline.listing import KnownVersions
from pipeline.records import RETIRED_STATUSES, RETRYABLE, Status
from pipeline.tables import CURRENT, RUNS, OutputTables
from pipeline.text_layer import OCR


def completed_documents(config: JobConfig, tables: OutputTables) -> KnownVersions:
    """(URI, version) of the documents not to process again: those whose rows in ``current`` are complete
    and final for this config's fingerprint. Not final: a retryable status, or one of an earlier version
    (``not_pdf``); a status that a setting decides when that setting changed since the run that gave it
    (``pipeline.fingerprints.setting_digests``); a page read without a usable text layer when the OCR
    settings changed since; with ``reprocess: failed`` any status but ok; with ``reprocess: all``
    everything. Reads only the columns the decision needs, and decides in Arrow, not row by row."""
    if config.reprocess == "all":
        return KnownVersions()
    rows = tables.read(
        CURRENT,
        columns=["document", "source_version", "document_rows", "status", "run_id", "text_source", "text_layer_chars"],
        filter=(ds.field("config_fingerprint") == config_fingerprint(config)) & ds.field("source_version").is_valid(),
    )
    status = rows.column("status")
    if config.reprocess == "failed":
        retake = pc.not_equal(status, Status.OK.value)
    else:
        retake = pc.is_in(status, value_set=pa.array(sorted(RETRYABLE | RETIRED_STATUSES), pa.string()))
    for decided, run_ids in runs_with_changed_settings(config, tables).items():
        by_run = pc.is_in(rows.column("run_id"), pa.array(run_ids, pa.string()))
        if decided == OCR_SETTING:
            retake = pc.or_(retake, pc.and_(_read_without_text_layer(rows, config.text_layer.min_chars), by_run))
        else:
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


def _read_without_text_layer(rows: pa.Table, min_chars: int) -> pa.ChunkedArray:
    """Rows of pages whose words are not a PDF's own usable text layer: OCR'd, or without words (rows written
    before ``text_source`` existed: fewer than ``min_chars`` characters of text)."""
    source = rows.column("text_source")
    few_characters = pc.less(pc.fill_null(rows.column("text_layer_chars"), 0), min_chars)
    unknown = pc.and_(pc.is_null(source), few_characters)
    return pc.and_(pc.equal(rows.column("status"), Status.OK.value), pc.or_(pc.equal(source, OCR), unknown))


def resumed_documents(recovered: pa.Table) -> KnownVersions:
    """(URI, version) of the documents an earlier attempt of this run committed: done by this run."""
    resumed = recovered.filter(pc.is_valid(recovered.column("source_version")))
    return KnownVersions(resumed.column("document").to_pylist(), resumed.column("source_version").to_pylist())


def runs_with_changed_settings(config: JobConfig, tables: OutputTables) -> dict[str, list[str]]:
    """Per status that a setting decides, the runs whose recorded setting differs from this config's; runs
    recorded before digests were kept count as unchanged. A run's digests are compared with this config's
    under the salt they were made with: the output's own, or (records from before it had one) the old
    fixed salt."""
    now = {"output": setting_digests(config, tables.digest_salt())}
    changed: dict[str, list[str]] = {status: [] for status in now["output"]}
    without_ocr = setting_digests(
        config.model_copy(update={"ocr": config.ocr.model_copy(update={"engine": "none"})}), b""
    )
    runs = tables.read(RUNS, columns=["run_id", "record"])
    for run_id, text in zip(runs.column("run_id").to_pylist(), runs.column("record").to_pylist(), strict=True):
        incremental = json.loads(text or "{}").get("incremental", {})
        salt = incremental.get("digest_salt", "legacy")
        if salt not in now:
            now[salt] = setting_digests(config, LEGACY_SALT)
        recorded = incremental.get("setting_digests", {})
        if recorded and OCR_SETTING not in recorded:  # recorded before OCR existed: the pages had none
            recorded = {**recorded, OCR_SETTING: without_ocr[OCR_SETTING]}
        for status, digest in recorded.items():
            if status in now[salt] and digest != now[salt][status]:
                changed[status].append(run_id)
    return {status: run_ids for status, run_ids in changed.items() if run_ids}
