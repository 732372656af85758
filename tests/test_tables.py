"""The output as Delta tables: `current` as an outside engine reads it, time travel, optimize and vacuum,
retried commits, and writers running at once on a local disk and on the loopback S3 server."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from jobs import query
from jobs.cli import main
from jobs.devtools.samples import write_job, write_samples
from pipeline.commits import RunExistsError, split_version
from pipeline.config import StorageConfig
from pipeline.records import Status, rows_to_table
from pipeline.tables import committed_runs, read_answers, read_current, storage_options
from pipeline.writing import RunWriter

QUESTIONS = [
    {"id": "number", "text": "What is the invoice number?", "pages": "first", "max_new_tokens": 4},
    {"id": "total", "text": "What is the total?", "pages": "all", "max_new_tokens": 4},
]
SORT = [("document", "ascending"), ("page_number", "ascending"), ("question_id", "ascending")]


def _outside_read(table: Path) -> pa.Table:
    """A Delta table read with deltalake and pyarrow alone, as README shows (pyarrow's own filesystem: the
    default one of deltalake 1.6 can abort the interpreter at exit)."""
    import pyarrow.fs as fs

    local = fs.SubTreeFileSystem(str(table), fs.LocalFileSystem())
    return DeltaTable(str(table)).to_pyarrow_dataset(filesystem=local).to_table()


def _sorted(table: pa.Table) -> list[dict]:
    """The rows in key order, compared as values (DuckDB's results carry no NOT NULL flags)."""
    return table.sort_by(SORT).to_pylist()


def _keys(table: pa.Table, columns: list[str]) -> Counter:
    return Counter(tuple(row.values()) for row in table.select(columns).to_pylist())


def _run(job: Path, *extra: str) -> int:
    return main(["run", "--config", str(job), *extra])


@pytest.fixture(scope="module")
def two_runs(ray_session, tiny_model: Path, sample_pdfs: Path, tmp_path_factory) -> tuple[Path, pa.Table]:
    """Run one with PyMuPDF (it repairs truncated.pdf and answers its page), then run two with pdf2image
    (poppler refuses truncated.pdf: corrupt). Returns the job and `current` as run one left it."""
    directory = tmp_path_factory.mktemp("tables")
    job = write_job(directory, sample_pdfs, tiny_model, QUESTIONS, render={"image_splitting": False})
    assert _run(job, "--run-id", "one") == 0
    after_one = read_current(str(directory / "out"))
    assert _run(job, "--run-id", "two", "--set", "render.backend=pdf2image") == 0
    return job, after_one


def test_a_document_that_later_fails_as_a_whole_has_only_its_failure_in_current(two_runs, capsys) -> None:
    job, after_one = two_runs
    output = str(job.parent / "out")
    truncated = next(row["document"] for row in after_one.to_pylist() if row["document"].endswith("truncated.pdf"))
    first = [row for row in after_one.to_pylist() if row["document"] == truncated]
    assert first and all(row["status"] == Status.OK for row in first)  # answered under PyMuPDF

    current = read_current(output).to_pylist()
    now = [row for row in current if row["document"] == truncated]
    assert [(row["status"], row["run_id"], row["page_number"]) for row in now] == [(Status.CORRUPT, "two", None)]
    assert {row["run_id"] for row in current} == {"two"}  # a later processing replaces all earlier rows
    history = read_answers(output)
    assert Counter(history.column("run_id").to_pylist()) == {"one": len(after_one), "two": len(current)}

    assert main(["table", "--output", output, "--format", "json"]) == 0
    shown = {row["document"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert shown[truncated] == {
        "document": truncated,
        "num_pages": None,
        "status": "corrupt",
        "number": None,
        "number_page": None,
        "total": None,
        "total_page": None,
    }


def test_an_outside_read_of_current_equals_docqa_query(two_runs) -> None:
    job, _ = two_runs
    output = job.parent / "out"
    outside = _outside_read(output / "current")  # deltalake alone, no docqa code
    ours = query.query(str(output), "SELECT * FROM answers")
    assert outside.num_rows == ours.num_rows > 0
    assert _sorted(outside) == _sorted(ours)
    history = _outside_read(output / "answers")
    assert _sorted(history) == _sorted(query.query(str(output), "SELECT * FROM all_rows"))


def test_time_travel_returns_the_tables_as_of_an_earlier_version(two_runs, capsys) -> None:
    job, after_one = two_runs
    output = str(job.parent / "out")
    versions = DeltaTable(f"{output}/current").history()
    one = next(entry for entry in versions if entry.get("docqa.run_id") == "one")
    as_of_version = query.query(output, "SELECT * FROM answers", version=one["version"])
    assert _sorted(as_of_version) == _sorted(after_one)
    moment = datetime.fromtimestamp((one["timestamp"] + 1) / 1000, UTC)
    assert _sorted(query.query(output, "SELECT * FROM answers", as_of=moment)) == _sorted(after_one)
    runs_then = query.runs(output, version=one["version"]).to_pylist()
    assert [(run["run_id"], run["state"]) for run in runs_then] == [("one", "running")]  # run one's record came later
    assert (
        main(["query", "--output", output, "--version", "0", "--format", "json", "SELECT count(*) n FROM answers"]) == 0
    )
    assert capsys.readouterr().out.strip() == '{"n": 0}'
    assert main(["runs", "--output", output, "--as-of", "2020-01-01"]) == 2
    assert "has no version as of 2020-01-01" in capsys.readouterr().err
    assert main(["runs", "--output", output, "--version", "999"]) == 2
    assert "has no version 999 of `current`: its versions are 0 to " in capsys.readouterr().err


def test_optimize_and_vacuum_leave_every_query_unchanged(two_runs, tmp_path: Path, capsys) -> None:
    job, _ = two_runs
    output = tmp_path / "out"
    subprocess.run(["cp", "-r", str(job.parent / "out"), str(output)], check=True)
    queries = [
        "SELECT * FROM answers",
        "SELECT * FROM all_rows",
        "SELECT * EXCLUDE (record) FROM runs",
    ]
    before = [_sorted_any(query.query(str(output), sql)) for sql in queries]
    table_before = query.table(str(output))
    failures_before = _sorted_any(query.failures(str(output)))
    document = before[0][0]["document"]
    answers_before = _sorted_any(query.answers(str(output), document))
    assert failures_before and answers_before  # both show something to compare
    files_before = len(DeltaTable(str(output / "answers")).file_uris())
    assert main(["optimize", "--output", str(output), "--retain-hours", "0", "--force"]) == 0
    report = capsys.readouterr().out
    assert "answers:" in report and "current:" in report and "runs:" in report
    assert len(DeltaTable(str(output / "answers")).file_uris()) < files_before
    assert [_sorted_any(query.query(str(output), sql)) for sql in queries] == before
    assert query.table(str(output)).equals(table_before)
    assert _sorted_any(query.failures(str(output))) == failures_before
    assert _sorted_any(query.answers(str(output), document)) == answers_before
    on_disk = {path.name for path in (output / "answers").rglob("*.parquet")}
    assert on_disk == {Path(name).name for name in DeltaTable(str(output / "answers")).file_uris()}  # vacuumed


def _sorted_any(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=repr)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "s3"])
def test_two_runs_at_once_into_one_output_both_commit_with_nothing_lost_or_duplicated(
    store: str, ray_session, tiny_model: Path, s3_endpoint: str, tmp_path: Path
) -> None:
    """Two `docqa run` drivers on the session's Ray, one output (a local folder, or a prefix on the loopback
    S3 server), small commits so that they interleave; one document is in both inputs."""
    inputs = {name: tmp_path / name for name in ("a", "b")}
    for directory in inputs.values():
        write_samples(directory, count=3, with_bad_files=False)
    shared = tmp_path / "shared.pdf"
    shared.write_bytes((inputs["a"] / "invoice-001.pdf").read_bytes())
    for directory in inputs.values():
        (directory / "shared.pdf").symlink_to(shared)  # listed as its target: one document in both runs
    if store == "s3":
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="two-runs")
        output, storage = "s3://two-runs/out", StorageConfig(endpoint_url=s3_endpoint)
    else:
        output, storage = str(tmp_path / "out"), StorageConfig()
    environment = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    drivers = {}
    for name, directory in inputs.items():
        (tmp_path / f"job-{name}").mkdir()
        job = write_job(
            tmp_path / f"job-{name}",
            directory,
            tiny_model,
            QUESTIONS,
            # A render task per page (small documents would share one), so that each run commits in parts.
            render={"image_splitting": False, "range_pages": 1},
            storage={"endpoint_url": storage.endpoint_url},
        )
        command = ["run", "--config", str(job), "--output", output, "--run-id", f"run-{name}"]
        command += [
            "--set",
            "commit_rows=2",
            "--set",
            "actors.num_cpus_per_actor=0.5",
            "--set",
            "input_follow_links=true",
        ]
        drivers[name] = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", *command],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    for driver in drivers.values():
        out, _ = driver.communicate(timeout=300)
        assert driver.returncode == 0, out.decode()[-3000:]

    history = read_answers(output, storage=storage)
    keys = _keys(history, ["run_id", "document", "page_number", "question_id"])
    assert max(keys.values()) == 1  # no row twice
    for name in inputs:
        rows = history.filter(pc.equal(history.column("run_id"), f"run-{name}"))
        assert set(rows.column("document").to_pylist()) == {str(p.resolve()) for p in inputs[name].iterdir()}
        assert set(rows.column("status").to_pylist()) == {Status.OK}
    current = read_current(output, storage)
    per_document = Counter(current.column("document").to_pylist())
    rows_expected = {row["document"]: row["document_rows"] for row in current.to_pylist()}
    assert per_document == rows_expected  # every document complete, once
    assert len(per_document) == 7
    assert len({row["run_id"] for row in current.to_pylist() if row["document"] == str(shared)}) == 1
    runs = committed_runs(output, storage)
    assert sorted(record["run_id"] for record in runs) == ["run-a", "run-b"]
    assert all(record["commits"] >= 2 for record in runs), runs  # each run committed in parts


def _synthetic_rows(run_id: str, documents: range) -> pa.Table:
    return rows_to_table(
        [
            {
                "run_id": run_id,
                "document": f"s3://in/doc-{number:05d}.pdf",
                "source_version": "v1",
                "document_rows": 2,
                "page_number": 1,
                "num_pages": 1,
                "question_id": question,
                "answer": f"{run_id}-{number}",
                "status": "ok",
            }
            for number in documents
            for question in ("q1", "q2")
        ]
    )


def _writer_process(output: str, endpoint: str | None, run_id: str, documents: range, parts: int) -> None:
    """One writer in its own process: ``parts`` commits of complete documents."""
    storage = StorageConfig(endpoint_url=endpoint)
    start = {"run_id": run_id, "started_at": datetime.now(UTC).isoformat(), "input": "synthetic"}
    writer = RunWriter(output, run_id, "2026-11-24", storage, start, commit_rows=1)
    rows = _synthetic_rows(run_id, documents)
    for batch in rows.to_batches(max_chunksize=len(rows) // parts):
        writer.write(pa.Table.from_batches([batch]))
    writer.commit({**start, "finished_at": datetime.now(UTC).isoformat(), "counts": {}})


@pytest.mark.parametrize("store", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_concurrent_writers_and_a_retried_commit_lose_and_duplicate_nothing(
    store: str, s3_endpoint: str, tmp_path: Path
) -> None:
    """Three writer processes commit 8 parts each at the same time; two of them write the same documents
    (the later commit wins in `current`). Then a part committed again (a retry) is recognised and skipped."""
    if store == "s3":
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="writers")
        output, endpoint = "s3://writers/out", s3_endpoint
    else:
        output, endpoint = str(tmp_path / "out"), None
    plans = {"w1": range(0, 40), "w2": range(40, 80), "w3": range(0, 40)}
    context = multiprocessing.get_context("spawn")  # delta-rs's runtime does not survive a fork
    processes = [
        context.Process(target=_writer_process, args=(output, endpoint, run_id, documents, 8))
        for run_id, documents in plans.items()
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
        assert process.exitcode == 0
    storage = StorageConfig(endpoint_url=endpoint)
    history = read_answers(output, storage=storage)
    assert Counter(history.column("run_id").to_pylist()) == {"w1": 80, "w2": 80, "w3": 80}
    assert set(_keys(history, ["run_id", "document", "question_id"]).values()) == {1}
    current = read_current(output, storage).to_pylist()
    assert len(current) == 160 and len({(row["document"], row["question_id"]) for row in current}) == 160
    for number in range(40):  # written by w1 and w3: all rows of a document from one of them
        owners = {row["run_id"] for row in current if row["document"] == f"s3://in/doc-{number:05d}.pdf"}
        assert len(owners) == 1 and owners <= {"w1", "w3"}
    assert sorted(record["run_id"] for record in committed_runs(output, storage)) == ["w1", "w2", "w3"]
    assert {record["commits"] for record in committed_runs(output, storage)} == {8}
    answers_log = DeltaTable(f"{output}/answers", storage_options=storage_options(output, storage))
    assert split_version(answers_log.transaction_version("docqa-run:w2")) == (1, 8)  # attempt 1, part 8

    # A retry: the same part committed twice, as after a lost response: applied once.
    start = {"run_id": "retry", "started_at": datetime.now(UTC).isoformat()}
    writer = RunWriter(output, "retry", "2026-11-24", storage, start, commit_rows=10**6)
    rows = _synthetic_rows("retry", range(200, 203))
    writer.write(rows)
    pending = list(writer._pending)
    writer._commit_part()
    # The same part again (the writer drops rows of documents it completed, so the retry is put back as is).
    writer.part -= 1
    writer._pending, writer._pending_rows = pending, rows.num_rows
    writer._commit_part()
    assert read_answers(output, "retry", storage).num_rows == rows.num_rows
    writer.fail("RuntimeError: the driver gave up")  # a run that raised: its row says so
    [failed] = [run for run in query.runs(output, storage).to_pylist() if run["run_id"] == "retry"]
    assert (failed["state"], failed["error"], failed["commits"]) == ("failed", "RuntimeError: the driver gave up", 1)
    assert "retry" not in {record["run_id"] for record in committed_runs(output, storage)}


def test_an_attempt_taken_over_by_a_later_one_stops_and_loses_nothing(tmp_path: Path) -> None:
    """The same run id started again while its first attempt still runs (a scheduler firing twice): the
    second attempt adopts what the first committed, and the first one's next commit is refused."""
    output, storage = str(tmp_path / "out"), StorageConfig()
    start = {"run_id": "twice", "started_at": datetime.now(UTC).isoformat()}
    first = RunWriter(output, "twice", "2026-11-24", storage, start, commit_rows=1)
    first.write(_synthetic_rows("twice", range(0, 3)))  # part 1
    second = RunWriter(output, "twice", "2026-11-24", storage, start, commit_rows=1)
    assert (second.attempt, second.part, second.recovered.num_rows) == (2, 1, 6)
    second.write(_synthetic_rows("twice", range(3, 6)))  # part 2, by attempt 2
    with pytest.raises(RunExistsError, match="attempt 2 of run 'twice' took over from this one"):
        first.write(_synthetic_rows("twice", range(6, 9)))
    second.commit({**start, "finished_at": datetime.now(UTC).isoformat(), "counts": {}})
    rows = read_answers(output, "twice")
    assert sorted(set(rows.column("document").to_pylist())) == [f"s3://in/doc-{n:05d}.pdf" for n in range(6)]
    assert rows.num_rows == 12 and read_current(output).num_rows == 12
    assert [(r["run_id"], r["attempt"], r["commits"]) for r in committed_runs(output)] == [("twice", 2, 2)]


def test_outputs_written_before_typed_answers_gain_their_columns(tmp_path: Path) -> None:
    """An output folder written by a docqa without the typed-answer columns: the next run adds them (Delta
    schema evolution), its old rows read them as null, and the documents view works over both."""
    import datetime

    from deltalake import write_deltalake

    from pipeline.records import ITEM_SCHEMA
    from pipeline.tables import ANSWER_SCHEMA, ITEMS, OutputTables

    added = ANSWER_SCHEMA.names[ANSWER_SCHEMA.get_field_index("model_ms") + 1 : -1]
    assert "value_number" in added and "evidence_bbox" in added
    older = pa.schema([field for field in ANSWER_SCHEMA if field.name not in added])
    row = {"run_id": "old", "document": "a.pdf", "page_number": 1, "question_id": "q", "answer": "12 EUR"}
    old_rows = pa.Table.from_pylist([{**row, "status": "ok", "run_date": datetime.date(2026, 1, 1)}], schema=older)
    tables = OutputTables(str(tmp_path), StorageConfig())
    for name in ("answers", "current"):
        write_deltalake(tables.uri(name), old_rows, partition_by=["run_date"] if name == "answers" else None)

    tables.create()
    for name in ("answers", "current"):
        assert DeltaTable(tables.uri(name)).schema().to_arrow().names[: len(older)] == older.names
        assert set(DeltaTable(tables.uri(name)).schema().to_arrow().names) == set(ANSWER_SCHEMA.names)
    assert "items" in added  # and the table a newer docqa writes, too:
    assert tables.open(ITEMS).schema().to_arrow().names == ITEM_SCHEMA.names
    [current] = read_current(str(tmp_path)).to_pylist()
    assert current["answer"] == "12 EUR" and {current[name] for name in added} == {None}
    assert query.AnswerStore(str(tmp_path)).reader("SELECT q, q_page FROM documents").read_all().to_pylist() == [
        {"q": "12 EUR", "q_page": 1}
    ]


def test_a_document_that_never_arrived_whole_is_one_retryable_row_not_a_part(tmp_path: Path) -> None:
    """Rows of a document still missing some at the end of a run (which the pipeline should never do) are not
    committed as a partial document: one `model_error` row says how many arrived, and the next run retakes it."""
    output, storage = str(tmp_path / "out"), StorageConfig()
    start = {"run_id": "partial", "started_at": datetime.now(UTC).isoformat()}
    writer = RunWriter(output, "partial", "2026-11-25", storage, start, commit_rows=10**6)
    rows = _synthetic_rows("partial", range(0, 2))  # two documents of 2 rows; the second one's q2 never comes
    writer.write(rows.slice(0, 3))
    writer.commit({**start, "finished_at": datetime.now(UTC).isoformat(), "counts": {}})
    current = {(row["document"], row["question_id"]): row for row in read_current(output).to_pylist()}
    assert sorted(current) == [
        ("s3://in/doc-00000.pdf", "q1"),
        ("s3://in/doc-00000.pdf", "q2"),
        ("s3://in/doc-00001.pdf", None),
    ]
    partial = current[("s3://in/doc-00001.pdf", None)]
    assert (partial["status"], partial["page_number"], partial["answer"], partial["document_rows"]) == (
        Status.MODEL_ERROR,
        None,
        None,
        1,
    )
    assert partial["error"] == "incomplete: 1 of its 2 rows arrived; the next run takes it again"
    assert partial["source_version"] == "v1" and partial["run_id"] == "partial"
