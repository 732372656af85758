"""What a run takes on, against what the output holds, as far as the driver decides it: the final statuses
a changed setting reopens (per run, from the `runs` table), and the documents an earlier attempt of this run
committed (resumed). Which documents a committed run finished for this config (skipped) the listing tasks
decide, a batch of listed documents at a time (pipeline/skipping.py)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig
from pipeline.fingerprints import LEGACY_SALT, OCR_SETTING, config_fingerprint, setting_digests
from pipeline.skipping import KnownVersions, SkipDecision
from pipeline.tables import CURRENT, RUNS, OutputTables


def skip_decision(config: JobConfig, tables: OutputTables) -> SkipDecision:
    """What the listing tasks need to skip the documents whose rows in ``current`` are complete and final for
    this config's fingerprint (pipeline/skipping.py): ``current``'s version now, and what is per run. Not
    final: a retryable status, or one of an earlier version (``not_pdf``); a status that a setting decides
    when that setting changed since the run that gave it (``pipeline.fingerprints.setting_digests``); a page
    read without a usable text layer when the OCR settings changed since; with ``reprocess: failed`` any
    status but ok; with ``reprocess: all`` everything (no version: nothing is read)."""
    table = None if config.reprocess == "all" else tables.open(CURRENT)
    return SkipDecision(
        config.output,
        config.storage,
        None if table is None else table.version(),
        config_fingerprint(config),
        retake_all_but_ok=config.reprocess == "failed",
        reopened=runs_with_changed_settings(config, tables) if table is not None else {},
        min_chars=config.text_layer.min_chars,
    )


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
