"""First contact: the README's first job, tables that fit a terminal, what `docqa runs` and `docqa answers`
show, Ray's noise kept off the console, clear words for vacuumed versions (issue 38)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from deltalake import DeltaTable
from rich.cells import cell_len

from jobs.cli import main
from jobs.devtools.samples import invoice_pdf, write_samples
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
    documented = re.search(r"\n(document +num_pages +status +total[^\n]*)\n", README).group(1)
    assert shown[0].split() == documented.split()
    assert shown[2].split()[:3] == ["invoice.pdf", "1", "ok"]


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


def test_a_run_prints_no_ray_noise_and_shuts_ray_down_itself(
    ray_session, invoices, tiny_model: Path, tmp_path: Path
) -> None:
    inputs, _ = invoices
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"questions": [{"id": "q", "text": "Total?", "max_new_tokens": 2}]}))
    command = ["run", "--config", str(job), "--input", str(inputs), "--output", str(tmp_path / "out")]
    command += ["--set", "render.image_splitting=false", "--model", str(tiny_model)]
    environment = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_REPORT, *command],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for noise in ("constructor arguments in the object store", "Progress bars disabled", "core_worker.cc"):
        assert noise not in done.stderr, noise
    assert "ray initialized after the command: False" in done.stdout  # not left to Ray's atexit handler
    assert "committed" in done.stdout


def test_library_log_lines_print_once() -> None:
    """huggingface_hub's logger has a handler of its own and propagated to the root logger as well: its
    retry lines (no network) printed twice."""
    script = (
        "from jobs.console import configure_logging; configure_logging(); import logging, transformers;"
        "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stderr.count("Retrying in 1s [Retry 1/5].") == 1, done.stderr
