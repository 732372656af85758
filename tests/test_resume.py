"""Crash and resume, config changes and budgets of nightly runs, on the session's Ray instance."""

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pymupdf
import pytest

from jobs.cli import main
from jobs.devtools.samples import write_job, write_samples
from pipeline.config_loading import load_config
from pipeline.tables import committed_runs, read_answers, read_current

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


def _keys_list(table) -> list[tuple]:
    return list(zip(*table.select(["document", "page_number", "question_id"]).to_pydict().values(), strict=True))


def _keys(table) -> Counter:
    return Counter(_keys_list(table))


def _commits(log: Path) -> int:
    """Delta commits in a table's log (version 0 creates the table)."""
    return len(list(log.glob("*.json")))


def test_kill_9_midway_then_rerun_gives_every_answer_exactly_once(
    ray_session, tiny_model: Path, tmp_path: Path, capsys
) -> None:
    inputs = tmp_path / "pdfs"
    write_samples(inputs, count=12)
    # A render task per page (small documents would share one), so that parts commit while the run goes on.
    job = _job(tmp_path, inputs, tiny_model, commit_rows=4, render={"image_splitting": False, "range_pages": 1})
    nightly = ["nightly", "--config", str(job), "--date", "2026-11-22"]
    out = str(tmp_path / "out")

    environment = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *nightly],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "out" / "current" / "_delta_log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None and _commits(log) < 3:  # two parts committed
        time.sleep(0.05)
    assert driver.poll() is None, "the run finished before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert committed_runs(out) == []  # its runs row still says running
    before = read_answers(out)
    # Every part in `current` is in `answers`; `answers` may hold one part more (the kill can land between a
    # part's two commits), which the next attempt puts into `current` before it goes on.
    assert _keys(read_current(out)).keys() <= _keys(before).keys() and read_current(out).num_rows > 0

    capsys.readouterr()
    assert main(nightly) == 0
    summary = capsys.readouterr().out
    after = read_answers(out)
    keys = _keys(after)
    # The documents the killed attempt committed count as this run's, not as skipped.
    resumed = len({row["document"] for row in before.select(["document"]).to_pylist()})
    assert f"documents: {len(list(inputs.iterdir()))} (" in summary
    assert f"of which committed by an earlier attempt of this run: {resumed} documents" in summary
    assert "skipped (unchanged since a committed run): 0 ·" in summary
    expected = _expected_keys(job, inputs)
    duplicates = sum(count - 1 for count in keys.values() if count > 1)
    missing = sum(1 for key in expected if key not in keys)
    print(
        f"kill-and-rerun: rows before {before.num_rows}, after {after.num_rows}, duplicates {duplicates}, "
        f"missing {missing}"
    )
    assert (duplicates, missing, after.num_rows) == (0, 0, sum(expected.values()))
    bad = {"empty.pdf": "empty", "not-a-pdf.pdf": "unsupported_format"}  # MuPDF repairs truncated.pdf: answered
    assert {(Path(row["document"]).name, row["status"]) for row in after.to_pylist()} == {
        (path.name, bad.get(path.name, "ok")) for path in inputs.iterdir()
    }
    assert _keys(read_current(out)) == keys
    [record] = committed_runs(out)
    assert (record["run_id"], record["attempt"]) == ("nightly-2026-11-22", 2)
    # The killed attempt's committed rows were kept as they were, not redone.
    kept = {key: answer for key, answer in zip(_keys_list(after), after.column("answer").to_pylist(), strict=True)}
    assert all(
        kept[key] == answer for key, answer in zip(_keys_list(before), before.column("answer").to_pylist(), strict=True)
    )
    assert 0 < before.num_rows < after.num_rows

    assert main(nightly) == 0  # fired again: already committed, nothing to do
    assert read_answers(out).num_rows == after.num_rows


@pytest.mark.slow
def test_config_change_reprocesses_and_budgets_carry_over(ray_session, tiny_model: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "pdfs"
    # Two invoices a folder: the listing's shards, taken one after another in listing order under a budget.
    for number, path in enumerate(write_samples(inputs, count=6, with_bad_files=False)):
        (inputs / "abc"[number // 2]).mkdir(exist_ok=True)
        path.rename(inputs / "abc"[number // 2] / path.name)
    documents = sorted(str(path) for path in inputs.rglob("*.pdf"))
    job = _job(tmp_path, inputs, tiny_model, budget={"max_documents": 4})
    out = str(tmp_path / "out")

    def run_of(date: str) -> set[str]:
        assert main(["nightly", "--config", str(job), "--date", date]) == 0
        rows = read_answers(out, f"nightly-{date}")
        assert set(rows.column("status").to_pylist()) <= {"ok"}  # answers, not failures (or an empty night)
        return set(rows.column("document").to_pylist())

    first = run_of("2026-11-01")
    assert first == set(documents[:4])  # the first four listed: folders a and b
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
    fourth = read_answers(out, "nightly-2026-11-04")
    assert set(fourth.column("status").to_pylist()) == {"ok"}
    pages = {doc: len(set(pages)) for doc, pages in _pages_by_document(fourth).items()}
    # Left after the third night: invoice-005 (3 pages) and invoice-006 (1 page); 3 pages fit one of them,
    # whichever reserved its pages first, and the other waits.
    left = {str(inputs / "c" / "invoice-005.pdf"): 3, str(inputs / "c" / "invoice-006.pdf"): 1}
    assert set(run_of_documents(out, "nightly-2026-11-03")) == set(documents) - set(left)
    assert len(pages) == 1 and pages == {doc: left[doc] for doc in pages}  # exactly one of them, whole
    [record] = [r for r in committed_runs(out) if r["run_id"] == "nightly-2026-11-04"]
    assert (record["incremental"]["deferred_documents"], record["incremental"]["pages_taken"]) == (
        1,
        left[next(iter(pages))],
    )
    assert run_of("2026-11-05") == set(left) - set(pages)  # the next night takes the deferred one, nothing else


def _pages_by_document(table) -> dict[str, list[int]]:
    pages: dict[str, list[int]] = {}
    for document, page in zip(
        table.column("document").to_pylist(), table.column("page_number").to_pylist(), strict=True
    ):
        pages.setdefault(document, []).append(page)
    return pages


def run_of_documents(out: str, run_id: str) -> set[str]:
    return set(read_answers(out, run_id).column("document").to_pylist())
