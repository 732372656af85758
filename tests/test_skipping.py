"""The skip decision in the listing tasks (#36): a batch of listed documents reads only the files of `current`
whose statistics on `document` overlap it, and finds there the documents complete and final for the config."""

from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
from deltalake import write_deltalake

from pipeline.config import StorageConfig
from pipeline.records import rows_to_table
from pipeline.skipping import SkipDecision
from pipeline.tables import ANSWER_SCHEMA, CURRENT, OutputTables
from pipeline.writing import RunWriter

FINGERPRINT = "f" * 16


def _commit(tables: OutputTables, folder: str, statuses: dict[str, list[str]], replace: bool = False) -> None:
    """One commit of `current`: for each document of ``folder``, a row per status given (3 rows expected);
    with ``replace``, as a run's part replaces its documents (delta-rs writes the rest of their files anew,
    its strings as string_view)."""
    rows = [
        {
            "run_id": "seed",
            "document": f"/in/{folder}/{name}.pdf",
            "source_version": "v1",
            "config_fingerprint": FINGERPRINT,
            "document_rows": 3,
            "page_number": 1,
            "question_id": f"q{number}",
            "status": status,
        }
        for name, document_statuses in statuses.items()
        for number, status in enumerate(document_statuses)
    ]
    table = rows_to_table(rows)
    table = table.append_column("run_date", pa.array([date(2026, 1, 1)] * table.num_rows, pa.date32()))
    names = ", ".join(f"'/in/{folder}/{name}.pdf'" for name in statuses)
    options = {"mode": "overwrite", "predicate": f"document IN ({names})"} if replace else {"mode": "append"}
    write_deltalake(tables.uri(CURRENT), table.cast(ANSWER_SCHEMA), **options)


def test_a_batch_reads_only_the_files_it_overlaps_and_finds_the_complete_final_documents(tmp_path: Path) -> None:
    tables = OutputTables(str(tmp_path / "out"), StorageConfig())
    tables.create()
    _commit(tables, "a", {"done": ["ok"] * 3, "short": ["ok"] * 2, "retry": ["ok", "model_error", "ok"]})
    _commit(tables, "b", {"done": ["ok"] * 3})
    _commit(tables, "a", {"done": ["ok"] * 3}, replace=True)  # the rest of folder a's file is written anew
    table = tables.open(CURRENT)
    decision = SkipDecision(tables.output, tables.storage, table.version(), FINGERPRINT)

    listed = [f"/in/a/{name}.pdf" for name in ("done", "short", "retry", "new")]
    assert len(decision.completed(["/in/b/done.pdf"])) == 1
    [folder_b_file] = tables.pruned_files_of(table, CURRENT, [("document", ">=", "/in/b/")]).files
    (tmp_path / "out" / CURRENT / folder_b_file).unlink()  # were it opened for folder a, the read would fail

    completed = decision.completed(listed)
    assert ("/in/a/done.pdf", "v1") in completed
    assert len(completed) == 1  # short: a row missing; retry: a retryable status; new: no rows
    assert ("/in/a/done.pdf", "v2") not in completed  # a new version is taken
    other = SkipDecision(tables.output, tables.storage, table.version(), "another config")
    assert len(other.completed(listed)) == 0
    before = SkipDecision(tables.output, tables.storage, 0, FINGERPRINT)  # the table as it was created
    assert len(before.completed(listed)) == 0


def test_the_decision_reads_what_the_writer_rewrote(tmp_path: Path) -> None:
    """A run's part replaces its documents in `current`: delta-rs writes the rest of their files anew (their
    strings as string_view, which Arrow cannot compare with a string in a scan's filter)."""
    output = str(tmp_path / "out")
    for run_id, numbers in (("one", range(6)), ("two", range(2))):
        start = {"run_id": run_id, "started_at": datetime.now(UTC).isoformat(), "input": "synthetic"}
        writer = RunWriter(output, run_id, "2026-12-07", StorageConfig(), start, commit_rows=10**6)
        rows = [
            {
                "run_id": run_id,
                "document": f"/in/doc-{number}.pdf",
                "source_version": "v1",
                "config_fingerprint": FINGERPRINT,
                "document_rows": 1,
                "page_number": 1,
                "question_id": "q",
                "status": "ok",
            }
            for number in numbers
        ]
        writer.write(rows_to_table(rows))
        writer.commit({**start, "finished_at": datetime.now(UTC).isoformat(), "counts": {}})
    tables = OutputTables(output, StorageConfig())
    decision = SkipDecision(output, tables.storage, tables.open(CURRENT).version(), FINGERPRINT)
    listed = [f"/in/doc-{number}.pdf" for number in range(8)]
    assert len(decision.completed(listed)) == 6
