"""The whole pipeline through real Ray and real Parquet, driven by the `docqa` CLI as a user runs it."""

from pathlib import Path

import pyarrow.parquet as pq
import pymupdf
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from actors.families import inspect_checkpoint
from bench.naive import chat_prompt, reference_answer
from jobs.cli import main
from jobs.devtools.samples import write_samples
from pipeline.config import ModelConfig, RenderConfig
from pipeline.config_loading import load_config
from pipeline.pdf import open_pdf
from pipeline.records import Status
from pipeline.render_helper import SECCOMP_CLOSED
from pipeline.tables import ANSWER_SCHEMA, committed_runs, read_answers

JOB = """
input: unused
output: unused
questions:
  - {id: number, text: "What is the invoice number?", pages: first, max_new_tokens: 8}
  - {id: total, text: "What is the total on page {page_number} of {num_pages}?", pages: last, max_new_tokens: 10}
  - {id: every, text: "Transcribe {file_name}.", pages: all, max_new_tokens: 6}
actors: {batch_size: 3}
"""
BAD_FILES = {"truncated.pdf", "not-a-pdf.pdf", "empty.pdf"}


@pytest.fixture(scope="module")
def job_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("job") / "job.yaml"
    path.write_text(JOB)
    return path


def _run(job_file: Path, inputs: Path, output: Path, model: Path, *extra: str) -> int:
    return main(
        [
            "run",
            "--config",
            str(job_file),
            "--input",
            str(inputs),
            "--output",
            str(output),
            "--model",
            str(model),
            *extra,
        ]
    )


def _expected_rows(job_file: Path, inputs: Path) -> dict[str, int]:
    """Rows per document computed independently: pages x applicable questions, or 1 for a document that fails."""
    config = load_config(job_file)
    expected = {}
    for path in sorted(inputs.iterdir()):
        data = path.read_bytes()
        pages = pymupdf.open(stream=data, filetype="pdf").page_count if data.startswith(b"%PDF-") else 0
        expected[str(path.resolve())] = (
            sum(len(config.questions_for_page(page, pages)) for page in range(1, pages + 1)) or 1
        )
    return expected


# MuPDF repairs the truncated sample (its first page survives); poppler refuses it.
BACKEND_DOCUMENTS = {
    "pymupdf": {"empty": 1, "unsupported_format": 1, "ok": 5},
    "pdf2image": {"corrupt": 1, "empty": 1, "unsupported_format": 1, "ok": 4},
}


@pytest.mark.parametrize("backend", ["pymupdf", "pdf2image"])
def test_run_writes_one_row_per_page_question_and_one_per_failed_document(
    ray_session, tiny_model: Path, sample_pdfs: Path, job_file: Path, tmp_path: Path, capsys, backend: str
) -> None:
    output = tmp_path / "out"
    assert _run(job_file, sample_pdfs, output, tiny_model, "--run-id", "r1", "--set", f"render.backend={backend}") == 0
    summary = capsys.readouterr().out
    documents = BACKEND_DOCUMENTS[backend]
    failed = ", ".join(f"{n} {status}" for status, n in documents.items() if status != "ok")
    assert "run r1 committed" in summary and f"documents: 7 ({documents['ok']} ok; failed: {failed})" in summary
    assert str(output) in summary

    table = read_answers(str(output))
    assert table.schema == ANSWER_SCHEMA
    rows_per_document = {
        doc: n
        for doc, n in zip(
            *table.group_by("document").aggregate([("document", "count")]).to_pydict().values(), strict=True
        )
    }
    expected = _expected_rows(job_file, sample_pdfs)
    if backend == "pdf2image":
        expected[str((sample_pdfs / "truncated.pdf").resolve())] = 1
    assert rows_per_document == expected
    rows = table.to_pylist()
    status_of = {Path(row["document"]).name: row["status"] for row in rows}
    assert status_of["empty.pdf"] == Status.EMPTY and status_of["not-a-pdf.pdf"] == Status.UNSUPPORTED_FORMAT
    for row in rows:
        assert row["run_id"] == "r1" and row["model_id"] == str(tiny_model)
        if row["status"] == Status.OK:
            assert row["answer"] is not None and 0 < row["confidence"] <= 1 and row["generated_tokens"] >= 1
            assert row["page_number"] >= 1 and row["num_pages"] >= row["page_number"] and len(row["sha256"]) == 64
            assert row["render_ms"] > 0 and row["model_ms"] > 0
        else:
            assert row["error"] and row["answer"] is None and row["question_id"] is None

    [record] = committed_runs(str(output))
    assert record["run_id"] == "r1" and record["counts"]["rows"] == len(rows)
    assert record["counts"]["documents"] == documents
    assert record["config"]["render"]["backend"] == backend and record["versions"]["transformers"].startswith("5.")
    [isolation] = record["render_isolation"]  # every render helper of the run was confined the same way:
    namespaces, network, seccomp = isolation.split(" | ")
    assert namespaces.startswith("bubblewrap: own user, pid, network") and network == SECCOMP_CLOSED
    assert seccomp.startswith("refuses sockets but AF_UNIX")  # and, where the backend runs no program, exec:
    assert seccomp.endswith("signals to other processes") == (backend == "pymupdf")
    assert record["commits"] == 1 and record["attempt"] == 1 and record["run_date"] == record["started_at"][:10]
    assert (output / "answers" / f"run_date={record['run_date']}").is_dir()  # partitioned by run date


def test_pipeline_answers_equal_the_naive_reference(
    ray_session, tiny_model: Path, sample_pdfs: Path, job_file: Path, tmp_path: Path
) -> None:
    """§5(a) end to end: every answer in the Parquet equals processor + generate on the same rendered page."""
    output = tmp_path / "out"
    assert _run(job_file, sample_pdfs, output, tiny_model) == 0
    processor = AutoProcessor.from_pretrained(tiny_model)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32).eval()
    geometry = inspect_checkpoint(ModelConfig(id=str(tiny_model)), RenderConfig()).geometry
    config = load_config(job_file)
    checked = 0
    for row in read_answers(str(output)).to_pylist():
        if row["status"] != Status.OK:
            continue
        page = open_pdf(Path(row["document"]).read_bytes(), "pymupdf").render(
            row["page_number"], geometry.render_longest_edge
        )
        template = next(q for q in config.questions if q.id == row["question_id"])
        assert (row["answer"], row["generated_tokens"]) == reference_answer(
            processor, model, page, chat_prompt(processor, row["question"]), template.max_new_tokens
        )
        checked += 1
    assert checked >= 20


def test_committed_runs_are_never_overwritten_and_files_outside_the_log_are_invisible(
    ray_session, tiny_model: Path, sample_pdfs: Path, job_file: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "out"
    assert _run(job_file, sample_pdfs, output, tiny_model, "--run-id", "keep") == 0
    before = read_answers(str(output))
    assert _run(job_file, sample_pdfs, output, tiny_model, "--run-id", "keep") == 1
    assert "run 'keep' is already committed" in capsys.readouterr().err
    assert read_answers(str(output)).equals(before)

    # What a writer that died before its commit leaves behind: data files the Delta log does not name.
    for table in ("answers", "current"):
        pq.write_table(before, output / table / "part-99999-uncommitted.parquet")
    assert [r["run_id"] for r in committed_runs(str(output))] == ["keep"]
    assert read_answers(str(output)).num_rows == before.num_rows
    assert main(["query", "--output", str(output), "--format", "json", "SELECT count(*) AS n FROM answers"]) == 0
    assert capsys.readouterr().out.strip() == f'{{"n": {before.num_rows}}}'


def test_a_tree_of_folders_and_links_is_listed_in_shards_with_each_document_once(
    ray_session, tiny_model: Path, job_file: Path, tmp_path: Path
) -> None:
    """The listing's tasks (one per subfolder, one for the files beside them) meet links: to a folder and a
    file inside the input (each listed where it is), from two subfolders to one folder outside it, from a
    third to a folder below that one (with a loop in it), and to the folder above the input: whatever lies
    outside is listed by the first task to reach it (the run's ledger keeps the claims)."""
    root, outside = tmp_path / "tree" / "in", tmp_path / "tree" / "outside"
    documents = [
        *write_samples(root / "a", count=2, with_bad_files=False),
        *write_samples(root / "a" / "deeper", count=1, with_bad_files=False),
        *write_samples(root / "b", count=1, with_bad_files=False),
        *write_samples(outside, count=2, with_bad_files=False),
    ]
    (root / "top.pdf").write_bytes(documents[0].read_bytes())
    (root / "c").mkdir()
    (root / "to-a").symlink_to(root / "a")
    (root / "c" / "to-top.pdf").symlink_to(root / "top.pdf")
    (root / "b" / "to-outside").symlink_to(outside)
    (root / "c" / "to-outside").symlink_to(outside)
    documents += write_samples(outside / "sub", count=1, with_bad_files=False)
    (root / "a" / "to-sub").symlink_to(outside / "sub")  # a folder below the other link's target
    (outside / "sub" / "loop").symlink_to(outside / "sub")
    (root / "c" / "up").symlink_to(tmp_path / "tree")  # the folder above the input: not listed again
    expected = {str(path) for path in [*documents, root / "top.pdf"]}
    output = tmp_path / "out"
    assert _run(job_file, root, output, tiny_model, "--run-id", "tree", "--set", "input_follow_links=true") == 0
    rows = read_answers(str(output)).to_pylist()
    assert {row["document"] for row in rows} == expected and {row["status"] for row in rows} == {"ok"}
    keys = [(row["document"], row["page_number"], row["question_id"]) for row in rows]
    assert len(keys) == len(set(keys))  # no document listed twice
    [record] = committed_runs(str(output))
    assert record["incremental"]["listed_documents"] == len(expected)


def test_bad_config_and_unloadable_model_fail_before_any_work(
    ray_session, tiny_model: Path, sample_pdfs: Path, job_file: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "out"
    assert _run(job_file, sample_pdfs, output, tiny_model, "--set", "actors.batch_size=0") == 2
    assert "actors.batch_size: Input should be greater than or equal to 1" in capsys.readouterr().err
    code = main(["run", "--config", str(job_file), "--input", str(sample_pdfs), "--output", str(output)])
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot load model 'HuggingFaceM4/idefics2-8b'" in err and "docqa model tiny PATH" in err
    assert _run(job_file, tmp_path / "missing", output, tiny_model) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not output.exists()


def test_a_run_that_only_reads_text_layers_needs_no_checkpoint(
    ray_session, sample_pdfs: Path, tmp_path: Path, capsys
) -> None:
    """Every question `source: text_layer`: the model named (the default Hub id, which this machine cannot
    reach) is never looked at, and the run answers every page from its text; the run record says the
    checkpoint was not inspected. The same run with a question the model may answer fails before any work,
    as it must."""
    job = tmp_path / "job.yaml"
    job.write_text('questions:\n  - {id: text, text: "Transcribe this page.", source: text_layer}\n')
    output = tmp_path / "out"
    arguments = ["run", "--config", str(job), "--input", str(sample_pdfs), "--output", str(output)]
    assert main(arguments) == 0, capsys.readouterr().err
    rows = read_answers(str(output)).to_pylist()
    ok = [row for row in rows if row["status"] == Status.OK]
    sources = {Path(row["document"]).name: row["answer_source"] for row in ok}
    assert sources.pop("truncated.pdf") == "ocr"  # its repaired pages lost their text: OCR'd, with no model
    assert len(sources) == 4 and set(sources.values()) == {"text_layer"}
    for row in ok:
        if row["answer_source"] == "text_layer":
            page = pymupdf.open(row["document"])[row["page_number"] - 1]
            assert row["answer"] == page.get_text(sort=True)
    [record] = committed_runs(str(output))
    assert record["model"]["inspected"] is False and record["model"]["family"] is None
    assert record["image_geometry"] is None

    auto = tmp_path / "auto.yaml"
    auto.write_text('questions:\n  - {id: text, text: "Transcribe this page.", source: auto}\n')
    assert main(["run", "--config", str(auto), "--input", str(sample_pdfs), "--output", str(tmp_path / "o2")]) == 1
    assert "cannot load model 'HuggingFaceM4/idefics2-8b'" in capsys.readouterr().err
