"""Crash and resume, config changes and budgets of nightly runs, on the session's Ray instance."""

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pymupdf

from jobs.cli import main
from jobs.samples import write_samples
from pipeline.config import load_config
from pipeline.sink import committed_runs, read_committed
from tests.conftest import write_job

QUESTIONS = [
    {"id": "number", "text": "Invoice number?", "pages": "first", "max_new_tokens": 3},
    {"id": "every", "text": "Page {page_number}?", "pages": "all", "max_new_tokens": 2},
]


def _job(tmp_path: Path, inputs: Path, model: Path, **extra) -> Path:
    sections = {"render": {"image_splitting": False}, "actors": {"batch_size": 2}, **extra}
    return write_job(tmp_path, inputs, model, QUESTIONS, **sections)


def _expected_keys(job: Path, inputs: Path) -> Counter:
    """(document, page, question) keys a complete run must hold, computed without the pipeline."""
    config = load_config(job)
    keys: Counter = Counter()
    for path in sorted(inputs.iterdir()):
        data = path.read_bytes()
        pages = pymupdf.open(stream=data, filetype="pdf").page_count if data.startswith(b"%PDF-") else 0
        for page in range(1, pages + 1):
            for question in config.questions_for_page(page, pages):
                keys[(str(path), page, question.id)] += 1
        if not pages:
            keys[(str(path), None, None)] += 1
    return keys


def _keys(table) -> Counter:
    return Counter(zip(*table.select(["document", "page_number", "question_id"]).to_pydict().values(), strict=True))


def test_kill_9_midway_then_rerun_gives_every_answer_exactly_once(
    ray_session, tiny_model: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "pdfs"
    write_samples(inputs, count=12)
    job = _job(tmp_path, inputs, tiny_model, output_rows_per_file=4)
    nightly = ["nightly", "--config", str(job), "--date", "2026-11-22"]
    run_dir = tmp_path / "out" / "runs" / "2026-11-22" / "nightly-2026-11-22"

    environment = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *nightly],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None and len(list(run_dir.glob("part-*.parquet"))) < 2:
        time.sleep(0.1)
    assert driver.poll() is None, "the run finished before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not (run_dir / "_run.json").exists()
    survivors = {path.name: path.read_bytes() for path in run_dir.glob("part-*.parquet")}
    rows_before = sum(pq.read_metadata(run_dir / name).num_rows for name in survivors)

    assert main(nightly) == 0
    after = read_committed(str(tmp_path / "out"))
    keys = _keys(after)
    expected = _expected_keys(job, inputs)
    duplicates = sum(count - 1 for count in keys.values() if count > 1)
    missing = sum(1 for key in expected if key not in keys)
    print(
        f"kill-and-rerun: rows before {rows_before}, after {after.num_rows}, duplicates {duplicates}, missing {missing}"
    )
    assert (duplicates, missing, after.num_rows) == (0, 0, sum(expected.values()))
    [record] = committed_runs(str(tmp_path / "out"))
    for name, data in survivors.items():  # the killed attempt's finished work was kept, not redone
        assert name in record["files"] and (run_dir / name).read_bytes() == data
    assert 0 < rows_before < after.num_rows

    assert main(nightly) == 0  # fired again: already committed, nothing to do
    assert read_committed(str(tmp_path / "out")).num_rows == after.num_rows


def test_config_change_reprocesses_and_budgets_carry_over(ray_session, tiny_model: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "pdfs"
    write_samples(inputs, count=6, with_bad_files=False)
    documents = sorted(str(path) for path in inputs.iterdir())
    job = _job(tmp_path, inputs, tiny_model, budget={"max_documents": 4})
    out = str(tmp_path / "out")

    def run_of(date: str) -> set[str]:
        assert main(["nightly", "--config", str(job), "--date", date]) == 0
        return set(read_committed(out, f"nightly-{date}").column("document").to_pylist())

    first = run_of("2026-11-01")
    assert len(first) == 4
    [record] = committed_runs(out)
    assert record["incremental"]["left_documents"] == 2
    assert run_of("2026-11-02") == set(documents) - first  # the two left over, nothing else

    shutil.copy(job, tmp_path / "before.yaml")
    job.write_text(job.read_text().replace("Invoice number?", "What is the invoice number?"))
    assert len(run_of("2026-11-03")) == 4  # new questions: everything again, 4 a night
    assert (
        main(
            [
                "nightly",
                "--config",
                str(job),
                "--date",
                "2026-11-04",
                "--set",
                "budget.max_documents=null",
                "--set",
                "budget.max_pages=3",
            ]
        )
        == 0
    )
    fourth = read_committed(out, "nightly-2026-11-04")
    taken = Counter(fourth.column("document").to_pylist())
    pages = {doc: len(set(pages)) for doc, pages in _pages_by_document(fourth).items()}
    assert sum(pages.values()) <= 3 and set(taken) <= set(documents) - run_of_documents(out, "nightly-2026-11-03")
    assert committed_runs(out)[-1]["incremental"]["deferred_documents"] >= 1


def _pages_by_document(table) -> dict[str, list[int]]:
    pages: dict[str, list[int]] = {}
    for document, page in zip(
        table.column("document").to_pylist(), table.column("page_number").to_pylist(), strict=True
    ):
        pages.setdefault(document, []).append(page)
    return pages


def run_of_documents(out: str, run_id: str) -> set[str]:
    return set(read_committed(out, run_id).column("document").to_pylist())
