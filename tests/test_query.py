"""Querying outputs of real pipeline runs: committed runs only, the latest answer wins, local and S3 alike."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import query
from jobs.devtools.samples import write_job
from jobs.formats import write_result
from jobs.run import run_job
from pipeline.config import StorageConfig
from pipeline.config_loading import load_config
from pipeline.storage import StorageError
from pipeline.tables import read_answers
from pipeline.writing import RunWriter

QUESTIONS = [
    {"id": "number", "text": "What is the invoice number?", "pages": "first", "max_new_tokens": 6},
    {"id": "total", "text": "What is the total?", "pages": "all", "max_new_tokens": 6},
]
CHANGED = [QUESTIONS[0], {**QUESTIONS[1], "text": "What is the total amount due?"}]


@pytest.fixture(scope="module")
def outputs(ray_session, tiny_model, sample_pdfs, tmp_path_factory):
    """Run A over every sample; run B over two invoices with a changed question; a run C that started,
    buffered rows and died before its first commit, and a data file its writer left outside the log."""
    directory = tmp_path_factory.mktemp("query")
    first = load_config(write_job(directory, sample_pdfs, tiny_model, QUESTIONS), {"run_id": "run-a"})
    run_job(first)
    second = load_config(
        write_job(directory, f"{sample_pdfs}/invoice-00[12].pdf", tiny_model, CHANGED), {"run_id": "run-b"}
    )
    run_job(second)
    output = str(directory / "out")
    started = {"run_id": "run-c", "started_at": "2026-11-23T06:00:00+00:00", "input": "dead"}
    dead = RunWriter(output, "run-c", "2026-11-23", StorageConfig(), started, commit_rows=10**6)
    rows = read_answers(output, "run-b").drop_columns(["run_date"])
    rows = rows.set_column(rows.schema.get_field_index("answer"), "answer", pa.array(["DEAD RUN"] * len(rows)))
    dead.write(rows.set_column(0, "run_id", pa.array(["run-c"] * len(rows))))  # buffered, never committed
    pq.write_table(rows, Path(output) / "current" / "part-00000-dead.parquet")  # a file outside the log
    return output


def _key(row: dict) -> tuple:
    return row["document"], row["page_number"], row["question_id"]


def test_latest_run_wins_and_uncommitted_rows_are_invisible(outputs):
    run_a = {_key(row): row for row in read_answers(outputs, "run-a").to_pylist()}
    run_b = {_key(row): row for row in read_answers(outputs, "run-b").to_pylist()}
    current = query.query(outputs, "SELECT * FROM answers").to_pylist()
    assert {_key(row) for row in current} == set(run_a)  # every document, page and question once
    assert len(current) == len(run_a)
    for row in current:
        expected = run_b.get(_key(row), run_a[_key(row)])
        assert (row["run_id"], row["answer"], row["question"]) == (
            expected["run_id"],
            expected["answer"],
            expected["question"],
        )
    assert {row["run_id"] for row in current} == {"run-a", "run-b"}
    changed = [row for row in current if row["question_id"] == "total" and row["run_id"] == "run-b"]
    assert changed and all(row["question"] == CHANGED[1]["text"] for row in changed)
    everything = query.query(outputs, "SELECT answer, run_id FROM all_rows").to_pylist()
    assert "DEAD RUN" not in {row["answer"] for row in everything}
    assert {row["run_id"] for row in everything} == {"run-a", "run-b"}
    one_run = query.query(outputs, "SELECT * FROM answers", run="run-a")
    assert {_key(row): row["answer"] for row in one_run.to_pylist()} == {k: r["answer"] for k, r in run_a.items()}


def test_runs_table_failures_and_answers_of_a_document(outputs):
    runs = query.runs(outputs).to_pylist()
    assert [(run["run_id"], run["state"]) for run in runs] == [
        ("run-c", "running"),  # its started_at is a day earlier
        ("run-a", "committed"),
        ("run-b", "committed"),
    ]
    assert (runs[1]["documents"], runs[1]["failed_documents"], runs[2]["documents"]) == (7, 2, 2)
    assert all(run["duration_s"] > 0 and run["run_date"] for run in runs[1:])

    current = query.query(outputs, "SELECT * FROM answers").to_pylist()
    table = {row["document"]: row for row in query.table(outputs).to_pylist()}
    assert set(table) == {row["document"] for row in current}
    first_answers: dict[tuple[str, str], str] = {}
    for row in sorted(current, key=lambda row: row["page_number"] or 0):
        if row["status"] == "ok":
            first_answers.setdefault((row["document"], row["question_id"]), row["answer"])
    assert len(first_answers) == 5 * 2  # 4 invoices and the repaired truncated one, 2 questions each
    for (document, question_id), answer in first_answers.items():
        assert table[document][question_id] == answer
    assert table[next(d for d in table if d.endswith("not-a-pdf.pdf"))]["status"] == "unsupported_format"
    joined = query.table(outputs, ["total"], all_pages=True).to_pylist()
    assert list(joined[0]) == ["document", "num_pages", "status", "total", "total_page"]
    three_pages = next(row for row in joined if row["num_pages"] == 3)
    assert three_pages["total"].startswith("p1: ") and " | p3: " in three_pages["total"]
    assert three_pages["total_page"] == "1, 2, 3"

    failures = query.failures(outputs).to_pylist()
    assert {(Path(row["document"]).name, row["status"]) for row in failures} == {
        ("not-a-pdf.pdf", "unsupported_format"),
        ("empty.pdf", "empty"),
    }
    assert all(row["error"] for row in failures)

    answers = query.answers(outputs, "invoice-002").to_pylist()
    expected = [row for row in current if row["document"].endswith("invoice-002.pdf")]
    assert sorted((r["page_number"], r["question_id"], r["answer"]) for r in answers) == sorted(
        (r["page_number"], r["question_id"], r["answer"]) for r in expected
    )
    with pytest.raises(query.QueryError, match="documents match 'invoice'"):
        query.answers(outputs, "invoice")
    with pytest.raises(query.QueryError, match=r"no run 'run-z' .*latest: run-b, run-a, run-c"):
        query.failures(outputs, run="run-z")
    assert query.failures(outputs, run="run-c").num_rows == 0  # started, nothing committed
    with pytest.raises(query.QueryError, match=r"unknown question id\(s\) \['date'\]"):
        query.table(outputs, ["date"])


def test_formats_stream_the_same_rows(outputs):
    store = query.AnswerStore(outputs)
    sql = "SELECT document, page_number, question_id, answer, confidence FROM answers ORDER BY 1, 2, 3"
    expected = store.reader(sql).read_all()
    text, binary = io.StringIO(), io.BytesIO()
    assert write_result(store.reader(sql), "csv", text, binary) == expected.num_rows
    parsed = list(csv.DictReader(io.StringIO(binary.getvalue().decode())))
    assert [row["answer"] or None for row in parsed] == expected.column("answer").to_pylist()
    text = io.StringIO()
    write_result(store.reader(sql), "json", text, io.BytesIO())
    assert [json.loads(line) for line in text.getvalue().splitlines()] == expected.to_pylist()
    binary = io.BytesIO()
    write_result(store.reader(sql), "parquet", io.StringIO(), binary)
    assert pq.read_table(io.BytesIO(binary.getvalue())).equals(expected)
    text = io.StringIO()
    write_result(store.reader(sql), "table", text, io.BytesIO())
    lines = text.getvalue().splitlines()
    assert lines[0].split() == expected.schema.names and lines[-1] == f"({expected.num_rows} rows)"
    rule = lines[1]  # dashes per column, two spaces between: every line keeps those gaps blank
    gaps = [i for i, char in enumerate(rule) if char == " "]
    assert set(rule) == {"-", " "} and len(gaps) == 2 * (len(expected.schema.names) - 1)
    for line in [lines[0], *lines[2:-1]]:
        assert len(line) <= len(rule) and all(line.ljust(len(rule))[i] == " " for i in gaps), line


def test_cli_prints_a_table_and_explains_bad_sql(outputs):
    docqa = [sys.executable, "-m", "jobs.cli"]
    shown = subprocess.run(
        [*docqa, "failures", "--output", outputs], capture_output=True, text=True, check=True, timeout=120
    )
    assert "unsupported_format" in shown.stdout and "detected text" in shown.stdout and "(2 rows)" in shown.stdout
    bad = subprocess.run(
        [*docqa, "query", "--output", outputs, "SELECT anwser FROM answers"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert 'column "anwser" not found' in bad.stderr and "answers: run_id, document" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = subprocess.run(
        [*docqa, "runs", "--output", f"{outputs}-typo"], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "no docqa output under" in missing.stderr


def test_s3_outputs_read_the_same(outputs, s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="query-outputs")
    for path in Path(outputs).rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "query-outputs", f"out/{path.relative_to(outputs)}")
    storage = StorageConfig(endpoint_url=s3_endpoint)
    sql = "SELECT document, page_number, question_id, answer, run_id FROM answers ORDER BY 1, 2, 3"
    from_s3 = query.query("s3://query-outputs/out", sql, storage=storage)
    assert from_s3.num_rows > 0
    assert from_s3.equals(query.query(outputs, sql))
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' .*: the bucket does not exist"):
        query.runs("s3://no-such-bucket/out", storage)  # the same fail-fast check and message as `docqa run`
    runs = query.runs("s3://query-outputs/out", storage).to_pylist()
    assert [run["run_id"] for run in runs] == ["run-c", "run-a", "run-b"]
