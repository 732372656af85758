"""Long documents (#20): page ranges rendered by separate tasks, pages handed on in blocks within a byte
budget, and the same rows as the path that renders a document whole; small documents (#36) sharing their
render tasks."""

from pathlib import Path

import pyarrow as pa

from actors.families import inspect_checkpoint
from jobs.cli import main
from jobs.devtools.samples import invoice_pdf, report_pdf, write_job
from pipeline.config_loading import load_config
from pipeline.records import Status
from pipeline.tables import read_answers

REPORT_PAGES = 30
QUESTIONS = [
    {"id": "topic", "text": "What is this page about?", "max_new_tokens": 5},
    {"id": "total", "text": "What is the total?", "pages": "last", "max_new_tokens": 5},
]
# A range of 7 pages; tiny's A4 pages split into about 2.1 MB of sub-images, so 8 MB blocks hold 3 of them.
SPLIT = {"range_pages": 7, "block_mb": 8}
WHOLE = {"range_pages": 1000, "block_mb": 1000}
MiB = 1024 * 1024


def _inputs(directory: Path) -> Path:
    directory.mkdir()
    (directory / "report.pdf").write_bytes(report_pdf(REPORT_PAGES))
    (directory / "invoice.pdf").write_bytes(invoice_pdf(7, 2, (612, 792)))
    return directory


def _answers(output: Path) -> dict[tuple, tuple]:
    rows = read_answers(str(output)).to_pylist()
    return {
        (Path(row["document"]).name, row["page_number"], row["question_id"]): (row["status"], row["answer"])
        for row in rows
    }


def test_a_long_document_in_ranges_and_small_blocks_gives_the_rows_of_the_whole_path(
    ray_session, tiny_model: Path, tmp_path: Path
) -> None:
    inputs = _inputs(tmp_path / "in")
    outputs = {}
    for name, render in (("split", SPLIT), ("whole", WHOLE)):
        (tmp_path / name).mkdir()
        job = write_job(tmp_path / name, inputs, tiny_model, QUESTIONS, render=render, commit_rows=10)
        assert main(["run", "--config", str(job)]) == 0
        outputs[name] = _answers(tmp_path / name / "out")

    split, whole = outputs["split"], outputs["whole"]
    expected = {("report.pdf", page, "topic") for page in range(1, REPORT_PAGES + 1)}
    expected |= {("report.pdf", REPORT_PAGES, "total"), ("invoice.pdf", 1, "topic"), ("invoice.pdf", 2, "topic")}
    expected |= {("invoice.pdf", 2, "total")}
    assert set(split) == expected  # every page of every range, exactly once
    assert {status for status, _ in split.values()} == {Status.OK}
    assert split == whole  # the same answers, page by page


def test_the_cpu_stages_render_ranges_in_separate_tasks_and_emit_blocks_within_the_budget(
    ray_session, tiny_model: Path, tmp_path: Path
) -> None:
    from jobs.plan import build_page_dataset

    inputs = _inputs(tmp_path / "in")
    config = load_config(write_job(tmp_path, inputs, tiny_model, QUESTIONS, render=SPLIT))
    geometry = inspect_checkpoint(config.model, config.render).geometry
    blocks = []
    for bundle in build_page_dataset(config, geometry).iter_internal_ref_bundles():
        for entry in bundle.blocks:
            block = ray_session.get(entry.ref)
            assert isinstance(block, pa.Table)
            documents = {Path(uri).name for uri in block.column("document").to_pylist()}
            size = max(block.nbytes, entry.metadata.size_bytes)
            blocks.append((documents, block.num_rows, size, entry.metadata.exec_stats.task_idx))

    report = [block for block in blocks if block[0] == {"report.pdf"}]
    assert sum(rows for _, rows, _, _ in report) == REPORT_PAGES
    assert max(size for _, _, size, _ in blocks) <= SPLIT["block_mb"] * MiB
    assert max(rows for _, rows, _, _ in report) > 1  # the budget holds several pages, not one a block
    # ceil(30 / 7) = 5 ranges, each rendered by its own task, each handing on several blocks.
    tasks = {task for *_, task in report}
    assert len(tasks) == 5
    assert len(report) > len(tasks)


def test_a_range_that_fails_as_a_whole_fails_its_document_once_and_completely(
    ray_session, tiny_model: Path, tmp_path: Path
) -> None:
    """Ranges 1-3, 4-6, 7-9 of a 9-page document whose last page takes seconds to render: the last range
    times out, and the document is one `timeout` row naming that range, none of the other ranges' answers."""
    import pymupdf

    from tests.hostile import slow_pdf

    inputs = tmp_path / "in"
    inputs.mkdir()
    document = pymupdf.open(stream=report_pdf(8), filetype="pdf")
    document.insert_pdf(pymupdf.open(stream=slow_pdf(6_000_000), filetype="pdf"))  # 3 s to render
    (inputs / "slow-end.pdf").write_bytes(document.tobytes())
    (inputs / "report.pdf").write_bytes(report_pdf(9))
    render = {"range_pages": 3, "block_mb": 8}
    job = write_job(tmp_path, inputs, tiny_model, QUESTIONS[:1], render=render, limits={"document_timeout_s": 1})
    assert main(["run", "--config", str(job)]) == 0

    rows = read_answers(str(tmp_path / "out")).to_pylist()
    slow = [row for row in rows if row["document"].endswith("slow-end.pdf")]
    assert [(row["page_number"], row["status"]) for row in slow] == [(None, Status.TIMEOUT)]
    assert slow[0]["error"].startswith("pages 7-9: ")
    report = [row for row in rows if row["document"].endswith("report.pdf")]
    assert sorted(row["page_number"] for row in report) == list(range(1, 10))
    assert {row["status"] for row in report} == {Status.OK}


def test_the_writer_keeps_a_whole_document_row_alone_whatever_arrives_before_or_after_it(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from pipeline.config import StorageConfig
    from pipeline.records import rows_to_table
    from pipeline.writing import RunWriter

    def page(document: str, number: int) -> dict:
        return {"run_id": "r", "document": document, "document_rows": 4, "page_number": number, "status": "ok"}

    verdict = {"run_id": "r", "document": "a.pdf", "document_rows": 1, "status": "timeout", "error": "pages 3-4: late"}
    verdict["scope"] = "document"  # the row speaks for its whole document
    start = {"run_id": "r", "started_at": datetime.now(UTC).isoformat()}
    writer = RunWriter(str(tmp_path / "out"), "r", "2026-11-25", StorageConfig(), start, commit_rows=1)
    writer.write(rows_to_table([page("a.pdf", 1), page("a.pdf", 2), *(page("b.pdf", n) for n in range(1, 5))]))
    writer.write(rows_to_table([verdict, page("a.pdf", 5)]))  # a's verdict, and a page of another range
    writer.write(rows_to_table([page("a.pdf", 6), {**verdict, "error": "pages 5-6: late"}]))  # after it
    assert writer.documents_complete == 2
    writer.commit({**start, "finished_at": datetime.now(UTC).isoformat(), "counts": {}})

    rows = read_answers(str(tmp_path / "out")).to_pylist()
    assert [(row["page_number"], row["error"]) for row in rows if row["document"] == "a.pdf"] == [
        (None, "pages 3-4: late")
    ]
    assert sorted(row["page_number"] for row in rows if row["document"] == "b.pdf") == [1, 2, 3, 4]


def test_render_batches_give_each_range_a_task_and_share_tasks_among_small_documents() -> None:
    from pipeline.planning import failed_unit, render_batches, unit_of
    from pipeline.records import Document

    def units(name: str, ranges: list[int]) -> list:
        document = Document(name, 1)
        return [unit_of(document, pages=list(range(1, pages + 1)), ranges=len(ranges)) for pages in ranges]

    failed = [failed_unit(Document("broken.pdf", 1), Status.CORRUPT, "cannot open")]
    documents = [units("a.pdf", [2]), units("long.pdf", [4, 4, 1]), units("b.pdf", [3]), failed, units("c.pdf", [1])]
    batches = render_batches(documents, range_pages=4)
    shapes = [[(Path(unit.document).stem, len(unit.pages)) for unit in batch.units] for batch in batches]
    assert shapes == [
        [("long", 4)],
        [("long", 4)],
        [("long", 1)],
        [("a", 2)],  # b's 3 pages would take the batch past 4
        [("b", 3), ("broken", 0)],  # a failed unit renders nothing, and weighs one
        [("c", 1)],
    ]


def test_small_documents_share_render_tasks(ray_session, tiny_model: Path, tmp_path: Path) -> None:
    from jobs.plan import build_page_dataset

    inputs = tmp_path / "in"
    inputs.mkdir()
    for number in range(12):
        (inputs / f"invoice-{number:02d}.pdf").write_bytes(invoice_pdf(number, 1, (612, 792)))
    config = load_config(write_job(tmp_path, inputs, tiny_model, QUESTIONS[:1], render=SPLIT))
    geometry = inspect_checkpoint(config.model, config.render).geometry
    pages_of_task: dict[int, int] = {}
    for bundle in build_page_dataset(config, geometry).iter_internal_ref_bundles():
        for entry in bundle.blocks:
            task = entry.metadata.exec_stats.task_idx
            pages_of_task[task] = pages_of_task.get(task, 0) + entry.metadata.num_rows
    assert sum(pages_of_task.values()) == 12
    assert max(pages_of_task.values()) <= SPLIT["range_pages"]
    assert len(pages_of_task) < 12 / 2  # not a task per document: at least ceil(12 / 7) = 2


def _dense_pdf(pages: int) -> bytes:
    """Pages of ~4,000 words each: their text layers take hundreds of KiB in a table."""
    import pymupdf

    document = pymupdf.open()
    for page_number in range(pages):
        page = document.new_page(width=1200, height=1600)
        lines = [" ".join(f"w{page_number}x{line}y{word}" for word in range(40)) for line in range(100)]
        page.insert_text((20, 20), "\n".join(lines), fontsize=5, fontname="helv")
    return document.tobytes()


def test_a_render_task_hands_text_pages_on_together_within_the_allowance_and_a_page_with_images_alone() -> None:
    """Small documents' text pages go on in tables of at most PAGE_ROW_ALLOWANCE, not a table a page (a
    table cost more than reading a small page's text); a page the model reads goes on alone, as soon as it
    is rendered."""
    from jobs.devtools.samples import PAGE_SIZES
    from pipeline.config import JobConfig
    from pipeline.images import ImageGeometry
    from pipeline.planning import Planner, document_of_bytes, render_batches
    from pipeline.record_schema import to_table
    from pipeline.records import RenderBatch
    from pipeline.rendering import PAGE_ROW_ALLOWANCE, RenderPages

    documents = [document_of_bytes(f"i{n}.pdf", invoice_pdf(n, 1, PAGE_SIZES["letter"])) for n in range(12)]
    documents.append(document_of_bytes("dense.pdf", _dense_pdf(6)))

    def tables(config: JobConfig, geometry: ImageGeometry | None) -> list[pa.Table]:
        planned = [Planner(config).plan(document) for document in documents]
        batches = to_table(render_batches(planned, config.render.range_pages), RenderBatch)
        return list(RenderPages(config, geometry)(batches))

    from_text = tables(JobConfig(questions=[{"id": "t", "text": "Transcribe.", "source": "text_layer"}]), None)
    assert sum(table.num_rows for table in from_text) == 18
    assert from_text[0].num_rows >= 12  # the invoices together
    assert all(table.nbytes <= PAGE_ROW_ALLOWANCE for table in from_text)
    assert 1 < len(from_text) < 6  # the dense pages a few a table, within the allowance

    geometry = ImageGeometry(980, 378, False, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    by_model = tables(JobConfig(questions=[{"id": "q", "text": "Total?"}]), geometry)
    assert [table.num_rows for table in by_model] == [1] * 18
