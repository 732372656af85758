"""The command line as README describes it, end to end through `main([...])` or a `docqa` subprocess:
reprocessing after a fix, Ray addresses, Ctrl-C and broken pipes, progress, summaries, flags."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.devtools.samples import invoice_pdf, write_job
from pipeline.config import StorageConfig
from pipeline.tables import RUNS, OutputTables, read_answers
from tests.hostile import encrypted_pdf

QUESTIONS = [{"id": "total", "text": "Total?", "pages": "last", "max_new_tokens": 2}]
DOCQA = [sys.executable, "-m", "jobs.cli"]


def _summary(out: str) -> dict[str, str]:
    """The summary's lines by label (`documents`, `skipped (unchanged since a committed run)`, ...)."""
    return dict(line.strip().split(": ", 1) for line in out.splitlines() if line.startswith("  ") and ": " in line)


def _runs(output: Path) -> dict[str, dict]:
    return {row["run_id"]: row for row in OutputTables(str(output), StorageConfig()).read(RUNS).to_pylist()}


def _statuses(output: Path, run_id: str) -> dict[str, str]:
    rows = read_answers(str(output), run_id).select(["document", "status"]).to_pylist()
    return {Path(row["document"]).name: row["status"] for row in rows}


@pytest.mark.slow
def test_a_fixed_setting_takes_again_what_it_fixes_and_reprocess_forces_the_rest(
    ray_session, tiny_model: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    inputs = tmp_path / "pdfs"
    inputs.mkdir()
    (inputs / "invoice.pdf").write_bytes(invoice_pdf(1, 1, (612, 792)))
    (inputs / "locked.pdf").write_bytes(encrypted_pdf("s3cret"))
    (inputs / "long.pdf").write_bytes(invoice_pdf(2, 3, (612, 792)))
    (inputs / "notes.pdf").write_bytes(b"not a pdf at all\n")
    monkeypatch.chdir(tmp_path)
    job = write_job(tmp_path, "pdfs", tiny_model, QUESTIONS, limits={"max_pages_per_document": 2})
    output = tmp_path / "out"

    def run(run_id: str, *arguments: str) -> dict[str, str]:
        assert main(["run", "--config", str(job), "--run-id", run_id, *arguments]) == 0
        summary = _summary(capsys.readouterr().out)
        return {"processed": _statuses(output, run_id), **summary}

    first = run("first")
    assert first["processed"] == {
        "invoice.pdf": "ok",
        "locked.pdf": "encrypted",
        "long.pdf": "too_many_pages",
        "notes.pdf": "unsupported_format",
    }
    # The run record says where the input was (made absolute), and the summary's wall time is the runs row's.
    row = _runs(output)["first"]
    assert row["input"] == str(inputs) and json.loads(row["record"])["input"] == str(inputs)
    assert first["wall time"].startswith(f"{row['duration_s']:.1f}s ")

    # A password added: the encrypted document is taken again, nothing else (the limit did not change).
    second = run("second", "--set", "render.passwords=[s3cret]")
    assert second["processed"] == {"locked.pdf": "ok"}
    assert second["skipped (unchanged since a committed run)"].startswith("3 ·")
    # The limit raised: the document over it is taken again; the password is still set, so no change there.
    third = run("third", "--set", "render.passwords=[s3cret]", "--set", "limits.max_pages_per_document=5")
    assert third["processed"] == {"long.pdf": "ok"}
    # A plain rerun with the same settings takes nothing.
    same = ["--set", "render.passwords=[s3cret]", "--set", "limits.max_pages_per_document=5"]
    assert run("fourth", *same)["processed"] == {}
    # Forced: `failed` takes the final failures again (unsupported_format); `all` takes every document.
    assert run("fifth", *same, "--reprocess", "failed")["processed"] == {"notes.pdf": "unsupported_format"}
    assert set(run("sixth", *same, "--reprocess", "all")["processed"]) == {p.name for p in inputs.iterdir()}


def test_progress_shows_done_of_listed_rates_and_an_eta_on_a_timer(
    ray_session, tiny_model: Path, tmp_path: Path, caplog
) -> None:
    from jobs.run import run_job
    from pipeline.config_loading import load_config

    inputs = tmp_path / "pdfs"
    inputs.mkdir()
    for number in (2, 3):  # listed first: done while the long one is under way, so the ETA shows
        (inputs / f"a-short-{number}.pdf").write_bytes(invoice_pdf(number, 1, (612, 792)))
    (inputs / "z-long.pdf").write_bytes(invoice_pdf(1, 23, (612, 792)))
    questions = [{"id": "total", "text": "Total?", "pages": "all", "max_new_tokens": 2}]
    job = write_job(tmp_path, inputs, tiny_model, questions, actors={"batch_size": 2})
    with caplog.at_level(logging.INFO, logger="docqa"):
        summary = run_job(load_config(job), progress_interval_s=0.3)
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("documents ")]
    assert summary.counts["pages"] == {"ok": 25}
    # Lines on the timer while the 23-page document renders: more lines than result batches could print.
    assert len(lines) >= 5
    line_format = r"documents \d/\d\+? · pages \d+ · answers \d+ · [\d.]+ pages/s · [\d.]+ answers/s"
    assert all(re.match(line_format, line) for line in lines)
    assert lines[-1].startswith("documents 3/3 · pages 25 · answers 25 · ")
    assert any(
        line.startswith("documents 0/3 · pages 0 · answers 0 · ") for line in lines
    )  # the total is known before any document is done


def test_the_eta_comes_once_the_listing_is_complete_at_this_attempts_rate() -> None:
    from jobs.progress import ProgressSnapshot

    growing = ProgressSnapshot(4, 10, False, 40, 40, 20.0, 0)
    assert growing.eta_s() is None and growing.line().startswith("documents 4/10+ · pages 40 · answers 40 · 2.00")
    # 2 documents resumed from an earlier attempt, 2 more done in 20 s: 6 left at 10 s each.
    resumed = ProgressSnapshot(4, 10, True, 40, 80, 20.0, 2)
    assert resumed.eta_s() == 60.0
    assert resumed.line() == "documents 4/10 · pages 40 · answers 80 · 2.00 pages/s · 4.0 answers/s · ETA 60s · 20s"


def test_a_dashboard_url_where_a_gcs_address_is_needed_is_explained(tiny_model: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path, tmp_path, tiny_model, QUESTIONS)
    environment = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"}
    done = subprocess.run([*DOCQA, "run", "--config", str(job)], env=environment, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is a dashboard (job server) URL" in done.stderr and "--address HEAD:6379" in done.stderr
    assert "docqa submit --address http://127.0.0.1:8265" in done.stderr


@pytest.mark.slow
def test_ctrl_c_says_what_was_committed_in_a_local_instance_of_its_own(tiny_model: Path, tmp_path: Path) -> None:
    """Without RAY_ADDRESS `docqa run` starts its own Ray instance; Ctrl-C after a commit ends it with 130,
    no traceback, and a message saying what is kept; the run is `failed` in `runs`."""
    inputs = tmp_path / "pdfs"
    inputs.mkdir()
    for number in range(1, 41):
        (inputs / f"invoice-{number:03d}.pdf").write_bytes(invoice_pdf(number, 1, (612, 792)))
    job = write_job(tmp_path, inputs, tiny_model, QUESTIONS, commit_rows=2)
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [*DOCQA, "run", "--config", str(job), "--run-id", "stopped"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    current = tmp_path / "out" / "current" / "_delta_log"
    deadline = time.monotonic() + 300
    while not (current.exists() and len(list(current.glob("*.json"))) >= 3) and driver.poll() is None:
        assert time.monotonic() < deadline, "no commit within 300 s"
        time.sleep(0.2)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert "Started a local Ray instance" in err
    message = err[err.index("docqa: interrupted") :]
    committed = int(re.search(r"(\d+) complete documents are committed and kept", message).group(1))
    assert committed >= 2 and "--run-id stopped" in message
    row = _runs(tmp_path / "out")["stopped"]
    assert row["state"] == "failed"
    assert len(set(read_answers(str(tmp_path / "out"), "stopped").column("document").to_pylist())) == committed


def test_a_reader_that_goes_away_ends_the_output_quietly(ray_session, tiny_model: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "pdfs"
    inputs.mkdir()
    (inputs / "invoice.pdf").write_bytes(invoice_pdf(1, 1, (612, 792)))
    job = write_job(tmp_path, inputs, tiny_model, QUESTIONS)
    assert main(["run", "--config", str(job)]) == 0
    # Far more than a pipe holds, so the writer meets the closed pipe (as `| head -1` does).
    sql = "SELECT a.document, b.range FROM all_rows a, range(200000) b"
    reader = subprocess.Popen(
        [*DOCQA, "query", sql, "--output", str(tmp_path / "out"), "--format", "csv"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert reader.stdout.readline().startswith(b'"document"')
    reader.stdout.close()
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=60) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_flags_that_do_not_apply_are_refused_and_every_command_explains_itself(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    job = str(write_job(tmp_path, tmp_path, tiny_model, QUESTIONS))
    assert main(["submit", "--config", job, "--address", "http://127.0.0.1:1", "--date", "2026-11-20"]) == 2
    assert "--date applies to --nightly submissions only" in capsys.readouterr().err
    assert main(["submit", "--config", job, "--address", "http://127.0.0.1:1", "--nightly", "--run-id", "x"]) == 2
    assert "--run-id does not apply with --nightly" in capsys.readouterr().err
    # serve takes --set like the other config commands: an invalid value is reported by field.
    assert main(["serve", "--config", job, "--set", "serve.port=99999"]) == 2
    assert "serve.port" in capsys.readouterr().err
    for command in ("status", "logs", "stop"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "the submission id `docqa submit` printed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and re.fullmatch(r"docqa \d+\.\d+\.\d+\n", capsys.readouterr().out)
