"""The skip decision in the listing tasks (#36): a batch of listed documents reads only the files of `current`
whose statistics on `document` overlap it, and finds there the documents complete and final for the config."""

from datetime import date
from pathlib import Path

import pyarrow as pa
from deltalake import write_deltalake

from pipeline.config import StorageConfig
from pipeline.records import rows_to_table
from pipeline.skipping import SkipDecision
from pipeline.tables import ANSWER_SCHEMA, CURRENT, OutputTables

FINGERPRINT = "f" * 16


def _commit(tables: OutputTables, folder: str, statuses: dict[str, list[str]]) -> None:
    """One commit of `current`: for each document of ``folder``, a row per status given (3 rows expected)."""
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
    write_deltalake(tables.uri(CURRENT), table.cast(ANSWER_SCHEMA), mode="append")


def test_a_batch_reads_only_the_files_it_overlaps_and_finds_the_complete_final_documents(tmp_path: Path) -> None:
    tables = OutputTables(str(tmp_path / "out"), StorageConfig())
    tables.create()
    _commit(tables, "a", {"done": ["ok"] * 3, "short": ["ok"] * 2, "retry": ["ok", "model_error", "ok"]})
    _commit(tables, "b", {"done": ["ok"] * 3})
    table = tables.open(CURRENT)
    decision = SkipDecision(tables.output, tables.storage, table.version(), FINGERPRINT)

    listed = [f"/in/a/{name}.pdf" for name in ("done", "short", "retry", "new")]
    assert len(decision.completed(["/in/b/done.pdf"])) == 1
    [folder_b_file] = tables.files_of(table, CURRENT, [("document", ">=", "/in/b/")]).files
    (tmp_path / "out" / CURRENT / folder_b_file).unlink()  # were it opened for folder a, the read would fail

    completed = decision.completed(listed)
    assert ("/in/a/done.pdf", "v1") in completed
    assert len(completed) == 1  # short: a row missing; retry: a retryable status; new: no rows
    assert ("/in/a/done.pdf", "v2") not in completed  # a new version is taken
    other = SkipDecision(tables.output, tables.storage, table.version(), "another config")
    assert len(other.completed(listed)) == 0
    before = SkipDecision(tables.output, tables.storage, 0, FINGERPRINT)  # the table as it was created
    assert len(before.completed(listed)) == 0
