"""First contact: the README's first job, tables that fit a terminal, what `docqa runs` and `docqa answers`
show, Ray's noise kept off the console, clear words for vacuumed versions (issue 38)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from deltalake import DeltaTable
from rich.cells import cell_len

from jobs.cli import main
from jobs.devtools.samples import invoice_pdf, write_samples
from jobs.query import query
from pipeline.config import StorageConfig
from pipeline.locations import iter_documents

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CJK_NAME = "請求書-0001.pdf"


def _invoice_questions() -> list[dict]:
    questions = yaml.safe_load((ROOT / "examples" / "invoice.yaml").read_text())["questions"]
    for question in questions:
        question["max_new_tokens"] = min(question.get("max_new_tokens", 8), 8)
    return [*questions, {"id": "text", "text": "Page text", "source": "text_layer", "pages": "first"}]


@pytest.fixture(scope="module")
def invoices(ray_session, tiny_model: Path, tmp_path_factory) -> tuple[Path, Path]:
    """The invoice example's questions (and one answered from the text layer) over two sample invoices and
    one with a Japanese name; returns (input folder, output)."""
    directory = tmp_path_factory.mktemp("first-contact")
    inputs = directory / "in"
    write_samples(inputs, count=2, with_bad_files=False)
    (inputs / CJK_NAME).write_bytes(invoice_pdf(7, 1, (612, 792)))
    job = directory / "job.yaml"
    job.write_text(yaml.safe_dump({"questions": _invoice_questions(), "render": {"image_splitting": False}}))
    output = directory / "out"
    command = ["run", "--config", str(job), "--input", str(inputs), "--output", str(output), "--model", str(tiny_model)]
    assert main(command) == 0
    return inputs, output


def _printed(capsys, *command: str) -> str:
    assert main(list(command)) == 0
    return capsys.readouterr().out


def test_the_readme_first_job_runs_as_written(ray_session, tiny_model: Path, tmp_path: Path, capsys) -> None:
    block = re.search(r"```yaml\n(# first\.yaml.*?)```", README, re.DOTALL).group(1)
    config = tmp_path / "first.yaml"
    config.write_text(block)
    (tmp_path / "invoice.pdf").write_bytes(invoice_pdf(1, 1, (612, 792)))
    command = re.search(r"docqa run --config first\.yaml (.*)\n", README).group(1).split()
    paths = {"invoice.pdf": tmp_path / "invoice.pdf", "out": tmp_path / "out", "tiny-model": tiny_model}
    arguments = [str(paths.get(argument, argument)) for argument in command]
    assert main(["run", "--config", str(config), *arguments]) == 0
    capsys.readouterr()
    shown = _printed(capsys, "table", "--output", str(tmp_path / "out")).splitlines()
    documented = re.search(r"```\n(document +num_pages +status +total.*?)\n```", README, re.DOTALL).group(1)
    # All of it: header, rule, the row (the tiny model's money answer is noise, unparsed: its columns empty)
    # and the row count.
    assert [line.split() for line in shown] == [line.split() for line in documented.splitlines()]


def test_tables_fit_the_terminal_and_stay_aligned(invoices, capsys, monkeypatch) -> None:
    inputs, output = invoices
    monkeypatch.setenv("COLUMNS", "100")
    narrow = _printed(capsys, "table", "--output", str(output), "--questions", "total,paid").splitlines()
    assert max(cell_len(line) for line in narrow) <= 100
    rows = [line for line in narrow[2:-1]]
    assert len({cell_len(line) for line in [narrow[0], *rows]}) == 1  # aligned by display width, CJK included
    assert any(line.startswith(CJK_NAME) for line in rows)  # relative to the run's input, whole
    assert str(inputs) not in "\n".join(narrow)

    every_question = _printed(capsys, "table", "--output", str(output))
    assert max(cell_len(line) for line in every_question.splitlines()) <= 100
    assert "-[ row 1 ]" in every_question  # too many columns to fit: one block per document
    wide = _printed(capsys, "table", "--output", str(output), "--wide")
    assert str(inputs / CJK_NAME) in wide and max(cell_len(line) for line in wide.splitlines()) > 100


def test_answers_show_typed_values_and_evidence_boxes(invoices, capsys) -> None:
    _, output = invoices
    lines = _printed(capsys, "answers", "--output", str(output), "--document", CJK_NAME, "--format", "json")
    rows = [json.loads(line) for line in lines.splitlines()]
    for column in ("value_number", "value_status", "answer_source", "evidence", "evidence_text", "evidence_bbox"):
        assert all(column in row for row in rows), column
    [text] = [row for row in rows if row["question_id"] == "text"]
    assert text["answer_source"] == "text_layer" and text["evidence"] == "text_layer"
    box = text["evidence_bbox"]
    shown = _printed(capsys, "answers", "--output", str(output), "--document", CJK_NAME, "--wide")
    expected = ",".join(f"{box[corner]:.3f}" for corner in ("x0", "y0", "x1", "y1"))
    assert expected in shown and "{'x0'" not in shown


def test_runs_show_the_promised_columns(invoices, capsys) -> None:
    _, output = invoices
    summary = _printed(capsys, "runs", "--output", str(output), "--format", "json")
    assert list(json.loads(summary.splitlines()[0])) == [
        "run_id",
        "state",
        "run_date",
        "documents",
        "pages",
        "failed_documents",
        "duration_s",
    ]
    every = json.loads(_printed(capsys, "runs", "--output", str(output), "--all", "--format", "json").splitlines()[0])
    assert {"attempt", "started_at", "finished_at", "input", "commits", "error", "lease_expires_at"} <= set(every)


def test_a_vacuumed_version_is_named_as_such(invoices, tmp_path: Path, capsys) -> None:
    _, output = invoices
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    assert main(["optimize", "--output", str(copy), "--retain-hours", "0", "--force"]) == 0
    capsys.readouterr()
    assert main(["query", "--output", str(copy), "--version", "1", "SELECT count(*) FROM answers"]) == 2
    err = capsys.readouterr().err
    assert "version 1 of `current` was removed by `docqa optimize` on " in err, err
    assert re.search(r"The oldest readable version of `current` is \d+ \(", err), err
    moment = "2099-01-01T00:00:00"  # after every commit: the latest version, readable
    assert main(["runs", "--output", str(copy), "--as-of", moment]) == 0
    capsys.readouterr()
    [first_part] = [entry for entry in DeltaTable(str(copy / "current")).history() if entry["version"] == 1]
    moment = datetime.fromtimestamp(first_part["timestamp"] / 1000, UTC).isoformat()
    assert main(["runs", "--output", str(copy), "--as-of", moment]) == 2
    err = capsys.readouterr().err
    assert "was removed by `docqa optimize`" in err and "Binder Error" not in err and "IO Error" not in err, err


def test_a_list_file_takes_comments_after_a_path(tmp_path: Path) -> None:
    kept = tmp_path / "inv#1.pdf"
    other = tmp_path / "b.pdf"
    for path in (kept, other):
        path.write_bytes(b"%PDF-")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# the invoices\n{kept}   # first, with a '#' in its name\n\n{other}\t# second\n")
    assert [ref.document for ref in iter_documents(str(listing), StorageConfig())] == [str(kept), str(other)]


RUN_AND_REPORT = """
import sys
from datetime import UTC, datetime
from jobs.cli import main
code = main(sys.argv[1:])
import ray
print("ray initialized after the command:", ray.is_initialized())
sys.exit(code)
"""


RAY_NOISE_SEEN = (
    "constructor arguments in the object store",
    "Progress bars disabled",
    "core_worker.cc",
    "Full logs are in",  # Ray Data's INFO lines on every run
    "Execution plan of Dataset",
    "execution finished in",
)


@pytest.mark.slow  # a command line run in a subprocess: make test-slow
def test_a_run_prints_no_ray_noise_and_shuts_ray_down_itself(
    ray_session, invoices, tiny_model: Path, tmp_path: Path
) -> None:
    """Also: a .txt list whose paths carry `# comments` is read as those paths, through a real run (not
    DEGRADED, no read_error)."""
    inputs, _ = invoices
    first, second = sorted(inputs.glob("invoice-*.pdf"))[:2]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two invoices\n{first}   # the first one\n\n{second}\t# the second, after a tab\n")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"questions": [{"id": "q", "text": "Total?", "max_new_tokens": 2}]}))
    output = tmp_path / "out"
    command = ["run", "--config", str(job), "--input", str(listing), "--output", str(output)]
    command += ["--set", "render.image_splitting=false", "--model", str(tiny_model)]
    done = _on_the_test_cluster(ray_session, RUN_AND_REPORT, command)
    assert done.returncode == 0, done.stderr[-3000:]  # 3 would be DEGRADED
    for noise in RAY_NOISE_SEEN:
        assert noise not in done.stderr, noise
    assert "ray initialized after the command: False" in done.stdout  # not left to Ray's atexit handler
    assert "committed" in done.stdout and "documents: 2 (2 ok; failed: none)" in done.stdout, done.stdout
    statuses = query(str(output), "SELECT DISTINCT document, status FROM answers ORDER BY 1").to_pylist()
    assert statuses == [{"document": str(first), "status": "ok"}, {"document": str(second), "status": "ok"}]


def _on_the_test_cluster(ray_session, script: str, command: list[str]) -> subprocess.CompletedProcess:
    """``script`` (which runs the docqa command line on ``command``) in a fresh interpreter that joins the
    test session's Ray instance."""
    environment = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    return subprocess.run(
        [sys.executable, "-c", script, *command], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )


INTERRUPT_RAY_SHUTDOWN = """
import os, signal, sys
import ray
from jobs.cli import main
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal, whatever the caller ignores
shutdown = ray.shutdown
def shutdown_under_ctrl_c(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT, as a Ctrl-C lands while Ray shuts down
    return shutdown(*args, **kwargs)
ray.shutdown = shutdown_under_ctrl_c
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a command line run in a subprocess: make test-slow
def test_ctrl_c_while_ray_shuts_down_after_a_failed_run_prints_no_traceback(
    ray_session, invoices, tiny_model: Path, tmp_path: Path
) -> None:
    """A run that fails (exit 1: its run id is already committed) after joining Ray: the command shuts Ray
    down itself, whatever its exit code, so a Ctrl-C then is caught; Ray's atexit handler, where it printed
    a traceback, has nothing left to do."""
    inputs, output = invoices
    [committed] = query(str(output), "SELECT run_id FROM runs").column(0).to_pylist()
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"questions": [{"id": "q", "text": "Total?"}]}))
    command = ["run", "--config", str(job), "--input", str(inputs), "--output", str(output)]
    command += ["--model", str(tiny_model), "--run-id", committed]
    done = _on_the_test_cluster(ray_session, INTERRUPT_RAY_SHUTDOWN, command)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"run {committed!r} is already committed" in done.stderr, done.stderr[-3000:]
    assert "docqa: interrupted while Ray shut down" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "atexit" not in done.stderr, done.stderr[-3000:]


@pytest.mark.slow  # a command line run in a subprocess: make test-slow
def test_a_run_killed_from_outside_shows_as_lost(ray_session, invoices, tiny_model: Path, tmp_path: Path, capsys):
    """`kill -9` of a real `docqa run`: before any other run takes the output over, `docqa runs` says the
    run is lost, since when, and what to do (its row in the table still says `running`)."""
    inputs, _ = invoices
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"questions": [{"id": "q", "text": "Total?"}], "lease_s": 2}))
    output = tmp_path / "out"
    command = ["run", "--config", str(job), "--input", str(inputs), "--output", str(output)]
    command += ["--model", str(tiny_model), "--run-id", "killed"]
    environment = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    run = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *command], cwd=ROOT, env=environment, stderr=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(300, run.kill)  # a run that never logs its attempt ends the wait below
    watchdog.start()
    try:
        seen = []
        for line in run.stderr:  # the run has claimed its row (and its lease) once it logs its attempt
            seen.append(line)
            if "run killed (attempt 1)" in line:
                break
        else:
            raise AssertionError("".join(seen[-30:]))
    finally:
        watchdog.cancel()
        run.kill()  # SIGKILL: no handler runs, the row is left as it was
        run.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while "lost (no heartbeat since " not in (shown := _printed(capsys, "runs", "--output", str(output))):
        assert time.monotonic() < deadline, shown
        time.sleep(0.5)
    [row] = [line for line in shown.splitlines() if line.startswith("killed ")]
    assert re.search(r"killed +lost \(no heartbeat since \d\d:\d\d UTC\) +\d{4}-\d\d-\d\d", row), row
    assert main(["runs", "--output", str(output)]) == 0
    err = capsys.readouterr().err
    assert "run killed is lost: its driver stopped renewing its lease (last heartbeat " in err, err
    assert "the next run on this output marks it `abandoned`" in err and "--run-id killed" in err, err
    assert query(str(output), "SELECT state FROM runs").column(0).to_pylist() == ["running"]  # the table: as left


@pytest.mark.slow  # a command line run in a subprocess: make test-slow
def test_no_network_model_errors_print_each_retry_line_once(refused_address: str, tmp_path: Path) -> None:
    """A hub model id with the hub unreachable (a refused port): huggingface_hub's retry lines print once
    each (its logger has a handler of its own and propagated to the root logger too), then the error,
    exit 1."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"questions": [{"id": "q", "text": "Total?"}]}))
    (tmp_path / "a.pdf").write_bytes(invoice_pdf(1, 1, (612, 792)))
    command = ["run", "--config", str(job), "--input", str(tmp_path / "a.pdf"), "--output", str(tmp_path / "out")]
    command += ["--model", "docqa-tests/no-such-model"]
    environment = {**os.environ, "HF_ENDPOINT": refused_address, "HF_HOME": str(tmp_path / "hf")}
    environment.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *command],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "docqa: cannot load model 'docqa-tests/no-such-model'" in done.stderr, done.stderr[-3000:]
    # Each message once, whatever a handler puts before it (a doubled line came with a timestamp prefix).
    retries = Counter(re.findall(r"Retrying in \S+ \[Retry \d+/\d+\]", done.stderr))
    assert retries and max(retries.values()) == 1, done.stderr[-3000:]
    refused = re.findall(f"thrown while requesting HEAD {re.escape(refused_address)}/", done.stderr)
    assert len(refused) == len(retries) + 1, done.stderr[-3000:]  # one per try: each printed once
