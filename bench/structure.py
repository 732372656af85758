"""The code's structure, measured: the modules a page's record passes through, the record shapes at the stage
boundaries, the places each decision is taken, and the long files.

A page is followed by running the stages in this process, in the order Ray runs them, on one sample
invoice with the tiny model (listing → planning → rendering → answering → writing; Ray only moves their
records between processes), under a profiler hook that notes every function of this project called with,
or returning, one of the stage records (pipeline/records.py) or a table of one of their schemas.

    python -m bench.structure
"""

from __future__ import annotations

import ast
import re
import sys
import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("pipeline", "actors", "jobs")
LONG_FILE_LINES = 400
# Each decision, and the calls that take it: taken once means one place in the product code calls it.
DECISIONS = {
    "which questions apply to a page": r"\.questions_for_page\(",
    "whether the model answers a question": r"\.answered_by_model\(",
    "the checkpoint directory checked": r"\bcheck_model_directory\(",
    "the checkpoint's config.json read": r"\bcheckpoint_config\(",
    # The scope is a field (pipeline/records.py) set where a record is made; reading "no page number" as "the
    # whole document" would be deciding it again.
    '"no page number" read as "the whole document"': (
        r"page_number\"?\]? is None|is_null\(\w+\.column\(\"page_number\"\)\)"
    ),
}


def _record_types() -> dict[type, str]:
    from pipeline.records import AnswerRow, Document, DocumentRef, Page, RenderBatch, WorkUnit

    return {record: record.__name__ for record in (DocumentRef, Document, WorkUnit, RenderBatch, Page, AnswerRow)}


def _shape_of(value, records: dict[type, str], schemas: dict[pa.Schema, str]) -> str | None:
    """The record shape ``value`` is (a record, a list of them, a table of a record's schema), or None."""
    if type(value) in records:
        return records[type(value)]
    if isinstance(value, list) and value and type(value[0]) in records:
        return records[type(value[0])]
    if isinstance(value, pa.Table | pa.RecordBatch):
        for schema, name in schemas.items():
            if value.schema.names[: len(schema.names)] == schema.names:
                return f"{name} table"
    return None


def follow_a_page() -> tuple[Counter, set[str]]:
    """(modules a page's record passed through, with how many calls; the record shapes seen)."""
    from actors.answering import AnswerPages
    from actors.checkpoint import CheckpointInfo
    from jobs.devtools.samples import invoice_pdf, write_job
    from jobs.devtools.tiny_models import build_tiny_idefics2
    from jobs.stats import RunStats
    from pipeline.config_loading import load_config
    from pipeline.locations import iter_documents
    from pipeline.planning import PlanDocuments
    from pipeline.records import (
        BATCH_SCHEMA,
        OUTPUT_SCHEMA,
        PAGE_SCHEMA,
        REF_SCHEMA,
        UNIT_SCHEMA,
        DocumentRef,
        to_table,
    )
    from pipeline.rendering import RenderPages
    from pipeline.writing import RunWriter

    records = _record_types()
    schemas = {OUTPUT_SCHEMA: "AnswerRow", PAGE_SCHEMA: "Page", UNIT_SCHEMA: "WorkUnit", REF_SCHEMA: "DocumentRef"}
    schemas[BATCH_SCHEMA] = "RenderBatch"
    modules: Counter = Counter()
    shapes: set[str] = set()

    def profile(frame, event, argument):
        path = frame.f_code.co_filename
        if not path.startswith(str(ROOT)) or any(part in path for part in ("/tests/", "/bench/", "/.venv")):
            return
        values = list(frame.f_locals.values()) if event == "call" else [argument] if event == "return" else []
        for value in values:
            shape = _shape_of(value, records, schemas)
            if shape is not None:
                modules[str(Path(path).relative_to(ROOT))] += 1
                shapes.add(shape)
                return

    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        (folder / "in").mkdir()
        (folder / "in" / "invoice.pdf").write_bytes(invoice_pdf(1, 2, (612, 792)))
        model = build_tiny_idefics2(folder / "model")
        questions = [{"id": "total", "text": "What is the total?", "type": "money", "max_new_tokens": 4}]
        config = load_config(write_job(folder, folder / "in", model, questions, render={"image_splitting": False}))
        from actors.families import inspect_checkpoint

        checkpoint: CheckpointInfo = inspect_checkpoint(config.model, config.render)
        answer = AnswerPages(config, checkpoint, "structure")
        start = {"run_id": "structure", "started_at": datetime.now(UTC).isoformat()}
        writer = RunWriter(config.output, "structure", "2026-12-06", config.storage, start)
        stats = RunStats()
        sys.setprofile(profile)
        try:
            plan, render = PlanDocuments(config), RenderPages(config, checkpoint.geometry)
            for ref in iter_documents(config.input, config.storage):
                batches = plan(to_table([ref], DocumentRef))
                for batch in range(batches.num_rows):
                    for pages in render(batches.slice(batch, 1)):
                        rows = answer(pages)
                        stats.arrived(rows)
                        stats.add(writer.write(rows))
            writer.commit({**start, "finished_at": datetime.now(UTC).isoformat(), "counts": stats.counts()})
        finally:
            sys.setprofile(None)
    return modules, shapes


def decisions() -> dict[str, list[str]]:
    """For each decision, the places in the product code that take it (file:line)."""
    found: dict[str, list[str]] = {}
    for name, pattern in DECISIONS.items():
        places = []
        for package in PRODUCT:
            for path in sorted((ROOT / package).rglob("*.py")):
                for number, line in enumerate(path.read_text().splitlines(), start=1):
                    code = line.split("#", 1)[0]
                    if re.search(pattern, code) and not code.lstrip().startswith("def "):
                        places.append(f"{path.relative_to(ROOT)}:{number}")
        found[name] = places
    return found


def long_files() -> dict[str, int]:
    """Product files over LONG_FILE_LINES lines, with their longest definition (what makes them long)."""
    long = {}
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > LONG_FILE_LINES:
                tree = ast.parse(path.read_text())
                longest = max(
                    (node for node in tree.body if isinstance(node, ast.ClassDef | ast.FunctionDef)),
                    key=lambda node: node.end_lineno - node.lineno,
                )
                long[
                    f"{path.relative_to(ROOT)} (longest: {longest.name}, {longest.end_lineno - longest.lineno} lines)"
                ] = lines
    return long


def main() -> None:
    modules, shapes = follow_a_page()
    print(f"# bench.structure  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"modules a page's record passes through: {len(modules)}")
    for module, calls in sorted(modules.items()):
        print(f"  {module}  ({calls} calls)")
    records = sorted({shape.removesuffix(" table") for shape in shapes})
    print(f"record shapes at the boundaries: {len(records)} ({', '.join(records)}), each also as its Arrow table")
    print("decisions and where they are taken:")
    for name, places in decisions().items():
        print(f"  {name}: {len(places)} place(s) {places}")
    long = long_files()
    print(f"product files over {LONG_FILE_LINES} lines: {len(long)}")
    for name, lines in long.items():
        print(f"  {name}: {lines}")


if __name__ == "__main__":
    main()
