"""A run finishes or fails clearly: the CPU check, the stall watchdog, and no false success, through the
real CLI on the session's Ray instance."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import query
from jobs.cli import main
from jobs.devtools.samples import write_job
from pipeline.records import Status
from pipeline.tables import committed_runs, read_answers
from tests.conftest import assert_sample_statuses

QUESTIONS = [{"id": "total", "text": "Total?", "pages": "all", "max_new_tokens": 2}]


def _job(tmp_path: Path, inputs: Path, model: Path, **sections) -> Path:
    return write_job(tmp_path, inputs, model, QUESTIONS, render={"image_splitting": False}, **sections)


def test_an_actor_pool_that_would_take_every_cpu_is_refused_before_any_work(
    ray_session, tiny_model: Path, sample_pdfs: Path, tmp_path: Path, capsys
) -> None:
    job = _job(tmp_path, sample_pdfs, tiny_model, actors={"min_actors": 1, "max_actors": 2})
    assert main(["run", "--config", str(job)]) == 2
    error = capsys.readouterr().err
    assert "actors.max_actors=2 x actors.num_cpus_per_actor=1 = 2 CPUs, but the Ray cluster has 2" in error
    assert "set actors.max_actors=1" in error
    assert not (tmp_path / "out").exists()  # nothing started


def test_a_run_that_gets_no_rows_stops_with_what_is_pending_and_resumes_later(
    ray_session, tiny_model: Path, sample_pdfs: Path, tmp_path: Path, capsys
) -> None:
    """Another tenant holds every CPU of the cluster: no task of the run can start. The watchdog stops the
    run after limits.stall_timeout_s with Ray's pending demands; once the CPUs are free, the same run id
    runs to the end."""
    ray = ray_session
    tenant = ray.remote(num_cpus=2)(_Tenant).remote()
    ray.get(tenant.ready.remote())
    job = _job(tmp_path, sample_pdfs, tiny_model, limits={"stall_timeout_s": 8})
    environment = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    try:
        done = subprocess.run(  # a hang would end here, at the timeout, as a failure
            [sys.executable, "-m", "jobs.cli", "run", "--config", str(job), "--run-id", "stalled"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        ray.kill(tenant)
    error = done.stderr
    assert done.returncode == 1, error[-3000:]
    message = error[error.index("docqa: no result row") :]
    stalled_for = float(re.match(r"docqa: no result row for ([0-9.]+) s \(limits\.stall_timeout_s=8\)", message)[1])
    assert stalled_for >= 8 and "cluster resources free/total: CPU 0/2" in message  # ended by the watchdog
    [pending] = [line for line in message.splitlines() if "pending demands:" in line]
    assert "{'CPU': 1.0}" in pending, message  # a task waits for a CPU (the repartition before rendering)
    assert "AnswerPages)) PENDING_CREATION" in message, message  # and the model actor
    assert "running it again with the same run id" in message
    assert "Traceback" not in error, error[-3000:]  # the user sees the reason, not a stack
    [run] = query.runs(str(tmp_path / "out")).to_pylist()
    assert (run["run_id"], run["state"]) == ("stalled", "failed") and "no result row" in run["error"]

    # The same run id resumes; with the default stall limit, since the actor's start alone may take 8 s here.
    assert main(["run", "--config", str(job), "--run-id", "stalled", "--set", "limits.stall_timeout_s=900"]) == 0
    assert_sample_statuses(read_answers(str(tmp_path / "out"), "stalled").to_pylist(), sample_pdfs)
    assert [record["attempt"] for record in committed_runs(str(tmp_path / "out"))] == [2]


class _Tenant:
    def ready(self) -> bool:
        return True


@pytest.fixture(scope="module")
def broken_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a processor that puts one image token too many in every prompt: it loads,
    and the model refuses every page (features and image tokens do not match)."""
    path = tmp_path_factory.mktemp("broken") / "tiny-broken"
    shutil.copytree(tiny_model, path)
    processor = json.loads((path / "processor_config.json").read_text())
    processor["image_seq_len"] += 1
    (path / "processor_config.json").write_text(json.dumps(processor))
    return path


@pytest.mark.slow
def test_a_run_whose_model_fails_on_every_page_is_degraded_and_exits_3(
    ray_session, broken_model: Path, tiny_model: Path, sample_pdfs: Path, tmp_path: Path, capsys
) -> None:
    # The input lists the samples and a path that cannot be read (a folder: listed with a version, and
    # read_error when it is read), so that only its status can make the next run take it again.
    later = tmp_path / "unreadable.pdf"
    later.mkdir()
    listing = tmp_path / "documents.txt"
    listing.write_text("\n".join([*map(str, sorted(sample_pdfs.iterdir())), str(later)]) + "\n")
    job = _job(tmp_path, listing, broken_model)
    assert main(["run", "--config", str(job), "--run-id", "broken"]) == 3
    out = capsys.readouterr().out
    rows = read_answers(str(tmp_path / "out")).to_pylist()
    pages = {(row["document"], row["page_number"]) for row in rows if row["page_number"] is not None}
    assert {row["status"] for row in rows if row["page_number"] is not None} == {Status.MODEL_ERROR}
    whole = {Path(row["document"]).name: row["status"] for row in rows if row["page_number"] is None}
    # empty.pdf and not-a-pdf.pdf are bad input, counted neither for nor against the run; the unreadable
    # file counts as one failed page.
    assert whole == {
        "empty.pdf": Status.EMPTY,
        "not-a-pdf.pdf": Status.UNSUPPORTED_FORMAT,
        later.name: Status.READ_ERROR,
    }
    failed = len(pages) + 1
    assert f"run broken committed DEGRADED: {failed} of {failed} pages failed" in out
    [record] = committed_runs(str(tmp_path / "out"))
    assert record["degraded"] == {"retryable_pages": failed, "pages": failed, "share": 1.0, "limit": 0.1}
    [run] = query.runs(str(tmp_path / "out")).to_pylist()
    assert (run["state"], run["degraded"]) == ("committed", True)

    # Retryable statuses (model_error, read_error) are taken again by the next run (here still failing),
    # final ones are not.
    assert main(["run", "--config", str(job), "--run-id", "broken-again"]) == 3
    again = {row["document"] for row in read_answers(str(tmp_path / "out"), "broken-again").to_pylist()}
    assert again == {document for document, _ in pages} | {str(later)}  # not empty.pdf, not not-a-pdf.pdf
    assert "skipped (unchanged since a committed run): 2" in capsys.readouterr().out

    # The model fixed and the file readable: both are taken again, a healthy run, exit 0.
    later.rmdir()
    shutil.copy(sample_pdfs / "invoice-001.pdf", later)
    assert main(["run", "--config", str(job), "--model", str(tiny_model), "--run-id", "fixed"]) == 0
    assert "DEGRADED" not in capsys.readouterr().out
    fixed = [row for row in read_answers(str(tmp_path / "out"), "fixed").to_pylist() if row["document"] in again]
    assert {row["document"] for row in fixed} == again  # (another model: the bad input is read again too)
    assert {row["status"] for row in fixed} == {Status.OK}
    assert {row["page_number"] for row in fixed if row["document"] == str(later)} == {1, 2}
    assert {run["run_id"]: run["degraded"] for run in query.runs(str(tmp_path / "out")).to_pylist()} == {
        "broken": True,
        "broken-again": True,
        "fixed": False,
    }
