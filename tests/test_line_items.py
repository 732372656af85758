"""List and object questions: records of typed fields decoded as JSON under a schema (xgrammar), read back
field by field, typed and boxed, and kept in the `items` Delta table beside `current`, numbered across a
document's pages. The tiny random model answers: under the grammar it can only write JSON valid against the
schema, which is what these tests check."""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as fs
import pymupdf
import pytest
from deltalake import DeltaTable, write_deltalake

from actors.answering import PageAnswerer
from jobs.cli import main
from jobs.devtools.samples import INVOICE_HEADER, PAGE_SIZES, invoice_pdf, write_job
from jobs.query import query
from pipeline.config import JobConfig, StorageConfig, ValuesConfig
from pipeline.images import ImageGeometry
from pipeline.planning import document_of_bytes
from pipeline.questions import QuestionTemplate
from pipeline.records import ITEM_SCHEMA, OUTPUT_SCHEMA
from pipeline.rendering import document_pages
from pipeline.structured import (
    TRUNCATED,
    closed_list,
    document_items,
    is_header,
    read_records,
    record_prompt,
    record_schema,
)
from pipeline.tables import ANSWER_SCHEMA, ITEMS, OutputTables, read_answers, read_current
from pipeline.text_layer import find_evidence
from pipeline.values import ValueParser
from tests.conftest import run_over_invoices

LINE_ITEMS = {
    "id": "line_items",
    "text": "List every line item of this invoice.",
    "type": "list",
    "fields": [
        {"name": "description", "type": "text"},
        {"name": "quantity", "type": "number"},
        {"name": "unit_price", "type": "money"},
        {"name": "amount", "type": "money"},
    ],
    "pages": "all",
    "max_new_tokens": 160,
}
VENDOR = {
    "id": "vendor",
    "text": "Who issued this invoice?",
    "type": "object",
    "fields": [
        {"name": "name", "type": "text", "description": "the company"},
        {"name": "issued", "type": "date"},
        {"name": "paid", "type": "boolean"},
        {"name": "kind", "type": "choice", "choices": ["invoice", "receipt"]},
    ],
    "pages": "first",
    "max_new_tokens": 120,
}

# Cut by its token cap after two complete records: the tiny model (seed 2) answers this one with three
# all-null records of about 32 tokens each on the first page of both invoices, closed at 98 tokens.
CUT_ITEMS = {
    "id": "cut_items",
    "text": "Every row?",
    "type": "list",
    "fields": [{"name": "quantity", "type": "number"}, {"name": "amount", "type": "money"}],
    "pages": "first",
    "max_new_tokens": 80,
}


def _items(output: str) -> pa.Table:
    """The ``items`` table as docqa reads it (pyarrow over the files its log lists)."""
    return OutputTables(output, StorageConfig()).read(ITEMS)


ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    """The documentation's snippets name the output ``out``, relative to where they run."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _kept(records: list[dict], question: QuestionTemplate) -> list[dict]:
    return [record for record in records if not is_header(record, question.fields or [])]


def test_the_prompt_and_the_schema_come_from_the_fields() -> None:
    question = QuestionTemplate(**LINE_ITEMS)
    prompt = question.question("a.pdf", 1, 1)
    assert prompt == (
        "List every line item of this invoice.\nAnswer with a JSON list of objects with the keys description (text), "
        "quantity (number), unit_price (money), amount (money). Use null for a value the page does not show."
    )
    schema = record_schema(question)
    assert schema["type"] == "array" and schema["maxItems"] == 200
    assert schema["items"]["required"] == ["description", "quantity", "unit_price", "amount"]
    assert schema["items"]["additionalProperties"] is False
    jsonschema.validate([{"description": "Widget", "quantity": "2", "unit_price": "$3.50", "amount": None}], schema)
    for bad in ({"quantity": "two"}, {"quantity": "x1"}, {"quantity": "1 x"}, {"unit_price": "1 apples"}):
        with pytest.raises(jsonschema.ValidationError):  # patterns are anchored: "x1" holds a number, yet is none
            record = {"description": "Widget", "quantity": None, "unit_price": None, "amount": None}
            jsonschema.validate([record | bad], schema)
    vendor = QuestionTemplate(**VENDOR)
    assert record_prompt(vendor, "Who?").startswith("Who?\nAnswer with a JSON object with the keys name (text: the")
    assert record_schema(vendor)["properties"]["kind"]["anyOf"][0]["enum"] == ["invoice", "receipt"]
    with pytest.raises(ValueError, match="fields"):
        QuestionTemplate(id="x", text="List.", type="list")
    with pytest.raises(ValueError, match="source"):
        QuestionTemplate(**{**LINE_ITEMS, "source": "auto"})


def test_a_cut_list_keeps_its_complete_records() -> None:
    whole = '[{"a":"1"},{"a":"2"}]'
    assert read_records(whole, True) == ([{"a": "1"}, {"a": "2"}], None)
    assert read_records('[{"a":"1"},{"a":"2', True) == ([{"a": "1"}], TRUNCATED)
    assert read_records('[{"a":"1"},', True) == ([{"a": "1"}], TRUNCATED)
    assert read_records("[", True) == ([], TRUNCATED)
    assert read_records("[]", True) == ([], None)
    assert read_records('{"a":"1"}', False) == ([{"a": "1"}], None)
    records, problem = read_records('{"a":"1"', False)
    assert records == [] and problem.startswith(TRUNCATED)


def _row(page: int, records: list[dict], document: str = "d.pdf") -> dict:
    entries = [
        {"record": index, "field": name, "answer": value, "value_status": None}
        for index, record in enumerate(records)
        for name, value in record.items()
    ]
    return {
        "document": document,
        "page_number": page,
        "question_id": "line_items",
        "items": entries,
        "run_id": "r",
        "config_fingerprint": "f",
    }


def test_a_document_list_is_numbered_across_pages_and_a_repeated_header_is_not_an_item() -> None:
    fields = QuestionTemplate(**LINE_ITEMS).fields
    header = {"description": "Description", "quantity": None, "unit_price": "Unit price", "amount": "AMOUNT"}
    assert is_header(header, fields)
    assert not is_header({**header, "amount": "12.00"}, fields)
    assert not is_header(dict.fromkeys(header), fields)  # an empty record is no header
    rows = [
        _row(2, [{"description": "c", "quantity": "1", "unit_price": None, "amount": None}]),
        _row(1, [{"description": "a", "quantity": "1", "unit_price": None, "amount": None}, {"description": "b"}]),
        _row(3, []),
        _row(4, [{"description": "d", "quantity": None, "unit_price": None, "amount": None}]),
    ]
    schema = pa.schema(
        [
            OUTPUT_SCHEMA.field(name)
            for name in ("document", "page_number", "question_id", "items", "run_id", "config_fingerprint")
        ]
    )
    items = document_items(pa.Table.from_pylist(rows, schema=schema))
    assert items.schema == ITEM_SCHEMA
    described = [
        (row["page_number"], row["item"], row["answer"]) for row in items.to_pylist() if row["field"] == "description"
    ]
    assert described == [(1, 0, "a"), (1, 1, "b"), (2, 2, "c"), (4, 3, "d")]


# A table's columns, and two that are labels: a label printed on the page (the "widget" of "widget type C")
# is no evidence of it, so they get none.
LABELLED = {
    **LINE_ITEMS,
    "id": "labelled",
    "fields": [
        *LINE_ITEMS["fields"],
        {"name": "taxable", "type": "boolean"},
        {"name": "kind", "type": "choice", "choices": ["widget", "service"]},
    ],
}


def test_a_repeated_header_row_is_no_item_and_each_field_has_its_own_evidence() -> None:
    """Page 2 of an invoice whose table header is printed on every page, read by the render stage (its text
    layer, in the sandbox), and list answers whose first record is that header read as an item, as a model
    reading the page would write it (the tiny random model cannot be made to: these answers are written here,
    and read by the answering stage's own ``PageAnswerer``). The header is left out and the items numbered
    from 0; each text, number and money field is found on the page where it is printed; labels get no
    evidence; a cut answer keeps and counts its complete records, header aside, and is closed after them."""
    data = invoice_pdf(66, 2, PAGE_SIZES["letter"], header=True)
    config = JobConfig(
        input="in", output="out", questions=[{"id": "q", "text": "?", "source": "text_layer"}], ocr={"engine": "none"}
    )
    geometry = ImageGeometry(980, 378, False, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    [_, page] = document_pages(config, geometry, document_of_bytes("/x/inv.pdf", data))
    printed = pymupdf.open(stream=data, filetype="pdf")[1]
    assert page.page_number == 2 and INVOICE_HEADER in printed.get_text()
    lines = re.findall(r"^(Item 2\.\d  widget type \w)   (\d)   (\S+)   (\S+)$", printed.get_text(), re.MULTILINE)
    assert len(lines) >= 2
    header = {"description": "Description", "quantity": None, "unit_price": None, "amount": None}
    header |= {"taxable": None, "kind": None}
    records = [
        {"description": text, "quantity": quantity, "unit_price": price, "amount": amount}
        | {"taxable": "yes", "kind": "widget"}
        for text, quantity, price, amount in lines[:2]
    ]
    question = QuestionTemplate(**LABELLED)
    answerer = PageAnswerer(config, None, "r")
    answer = json.dumps([header, *records], separators=(",", ":"))
    columns = answerer._records(question, answer, page)
    assert (columns["value_status"], columns["error"], "answer" in columns) == ("parsed", None, False)
    entries = columns["items"]
    assert sorted({entry["record"] for entry in entries}) == [0, 1]  # the header is no item
    assert [entry["answer"] for entry in entries if entry["field"] == "description"] == [line[0] for line in lines[:2]]
    width, height = printed.rect.width, printed.rect.height
    parser = ValueParser(ValuesConfig())
    for entry in entries:
        field = next(field for field in question.fields if field.name == entry["field"])
        typed = {name: value for name, value in parser.parse(field, entry["answer"]).items() if name != "error"}
        assert {name: entry[name] for name in typed} == typed
        if field.type in ("boolean", "choice"):
            assert (entry["evidence"], entry["evidence_text"], entry["evidence_bbox"]) == ("none", None, None)
            continue
        words = " ".join(entry["answer"].split())
        assert (entry["evidence"], entry["evidence_text"]) == ("text_layer", words), entry
        box = entry["evidence_bbox"]
        assert 0 <= box["x0"] < box["x1"] <= 1 and 0 <= box["y0"] < box["y1"] <= 1
        if field.name != "quantity":  # a one-digit quantity is first found where it is first printed
            [rect] = printed.search_for(words)
            expected = {"x0": rect.x0 / width, "y0": rect.y0 / height, "x1": rect.x1 / width, "y1": rect.y1 / height}
            assert box == pytest.approx(expected, abs=0.01), entry
    assert find_evidence("widget", page.words, page.word_boxes)["evidence"] == "text_layer"  # printed, yet no evidence

    cut = answer[: answer.index(records[1]["description"]) + 4]  # the header, one record, the next one begun
    columns = answerer._records(question, cut, page)
    assert columns["value_status"] == TRUNCATED and columns["error"].endswith("; 1 complete record(s) kept")
    assert json.loads(columns["answer"]) == [header, records[0]] and columns["answer"] == closed_list(
        [header, records[0]]
    )
    assert {entry["record"] for entry in columns["items"]} == {0}
    vendor = QuestionTemplate(**VENDOR)
    columns = answerer._records(vendor, '{"name":"ACME","iss', page)
    assert (columns["value_status"], columns["answer"], columns["items"]) == (TRUNCATED, None, [])


@pytest.fixture(scope="module")
def line_item_run(ray_session, records_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run over two invoices, the second's table continuing over three pages."""
    invoices = {"one.pdf": (61, 1), "three.pdf": (62, 3)}
    return run_over_invoices(
        tmp_path_factory.mktemp("line-items"), invoices, records_model, [LINE_ITEMS, VENDOR, CUT_ITEMS]
    )


def test_every_answer_is_json_valid_against_its_schema_and_its_items_are_its_fields(line_item_run: Path) -> None:
    """Every answer is JSON valid against its schema: read whole, or cut by its cap and closed after its
    complete records (``cut_items`` keeps two of three); the ``items`` rows are its records field by field."""
    output = str(line_item_run / "out")
    rows = read_answers(output).to_pylist()
    questions = {spec["id"]: QuestionTemplate(**spec) for spec in (LINE_ITEMS, VENDOR, CUT_ITEMS)}
    items = _items(output)
    parser = ValueParser(ValuesConfig())
    assert len(rows) == 1 + 3 + 2 * 2  # line items on every page; vendor and cut items on the first pages
    for row in rows:
        question = questions[row["question_id"]]
        assert row["status"] == "ok", row["error"]
        if question.type == "object" and row["value_status"] == TRUNCATED:  # cut: no record, no answer
            assert row["answer"] is None and row["generated_tokens"] == question.max_new_tokens
            assert row["error"].startswith(f"object answer {TRUNCATED}: not a whole JSON object"), row["error"]
            assert row["error"].endswith("; 0 complete record(s) kept")
            records, problem = [], None
        else:
            records, problem = read_records(row["answer"], question.type == "list")
        assert problem is None, row["answer"]  # a cut list's answer is closed after its complete records
        if row["answer"] is not None:
            jsonschema.validate(json.loads(row["answer"]), record_schema(question))
        kept = _kept(records, question)
        if row["value_status"] != TRUNCATED:
            assert (row["value_status"], row["error"]) == ("parsed", None), row["answer"]
        elif question.type == "list":  # cut by max_new_tokens
            assert row["generated_tokens"] == question.max_new_tokens
            assert row["error"] == f"list answer {TRUNCATED}; {len(kept)} complete record(s) kept"
        mine = items.filter(
            pc.and_(
                pc.equal(items["document"], row["document"]),
                pc.and_(
                    pc.equal(items["page_number"], row["page_number"]),
                    pc.equal(items["question_id"], row["question_id"]),
                ),
            )
        ).to_pylist()
        assert len(mine) == len(kept) * len(question.fields)
        by_item: dict[int, dict[str, dict]] = {}
        for item in mine:
            by_item.setdefault(item["item"], {})[item["field"]] = item
        for record, item in zip(kept, [by_item[key] for key in sorted(by_item)], strict=True):
            for field in question.fields:
                stored = item[field.name]
                assert stored["answer"] == record[field.name]
                expected = parser.parse(field, record[field.name])
                for column in ("value_number", "value_currency", "value_date", "value_boolean", "value_status"):
                    assert stored[column] == expected[column], (field.name, column)
    assert any(read_records(row["answer"], True)[0] for row in rows if row["question_id"] == "line_items")
    cut = [row for row in rows if row["question_id"] == "cut_items"]
    assert {row["value_status"] for row in cut} == {TRUNCATED}
    assert {row["error"] for row in cut} == {f"list answer {TRUNCATED}; 2 complete record(s) kept"}


def test_items_are_numbered_across_the_pages_of_a_document(line_item_run: Path) -> None:
    """three.pdf's line items: one list over its pages, numbered from 0 in page order (each page gives
    records); and the ``items`` table as delta-rs alone reads it is, row for row, what ``docqa query`` shows."""
    output = str(line_item_run / "out")
    items = query(output, "SELECT * FROM items WHERE document LIKE '%three.pdf' AND question_id = 'line_items'")
    assert [(field.name, field.type) for field in items.schema] == [(field.name, field.type) for field in ITEM_SCHEMA]
    seen = sorted({(row["page_number"], row["item"]) for row in items.to_pylist()})
    numbers = [item for _, item in seen]
    assert len({page for page, _ in seen}) >= 2, seen  # items from several pages
    assert numbers == list(range(len(numbers)))  # 0, 1, 2 ... across pages, in page order

    path = f"{output}/items"  # delta-rs alone, no docqa code, with a filesystem of pyarrow's (docs/output.md)
    subtree = fs.SubTreeFileSystem(path, fs.LocalFileSystem())
    from_deltalake = DeltaTable(path).to_pyarrow_dataset(filesystem=subtree).to_table()
    everything = query(output, "SELECT * FROM items")
    key = ["document", "page_number", "question_id", "item", "field"]
    assert everything.num_rows == from_deltalake.num_rows > 0
    assert (
        everything.sort_by([(name, "ascending") for name in key]).to_pylist()
        == from_deltalake.select(ITEM_SCHEMA.names).sort_by([(name, "ascending") for name in key]).to_pylist()
    )


def test_views_and_the_table_command_show_the_items_with_typed_columns(line_item_run: Path, capsys) -> None:
    output = str(line_item_run / "out")
    view = query(output, "SELECT * FROM items_line_items ORDER BY document, item")
    assert view.column_names == [
        "document",
        "page_number",
        "item",
        "description",
        "quantity",
        "unit_price",
        "unit_price_currency",
        "amount",
        "amount_currency",
    ]
    assert (
        str(view.schema.field("quantity").type) == "double" and str(view.schema.field("description").type) == "string"
    )
    for doc in ("README.md", "docs/output.md"):  # their DuckDB pivot, run as it is written there
        [snippet] = [
            block for block in re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S) if "duckdb" in block
        ]
        namespace: dict = {}
        with _working_directory(line_item_run):
            exec(compile(snippet, doc, "exec"), namespace)
            pivoted = namespace["pivoted"].to_arrow_table()
        assert sorted(pivoted.column_names) == ["amount", "description", "document", "item", "quantity", "unit_price"]
        assert (
            pivoted.select(["document", "item", "description"]).to_pylist()
            == view.select(["document", "item", "description"]).to_pylist()
        )
    everything = _items(output).num_rows
    assert query(output, "SELECT count(*) AS items_count FROM items").column(0).to_pylist() == [everything]
    vendor = query(output, "SELECT * FROM items_vendor")
    assert str(vendor.schema.field("issued").type) == "date32[day]" and str(vendor.schema.field("paid").type) == "bool"
    assert main(["table", "--output", output, "--items", "line_items", "--format", "csv"]) == 0
    lines = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert lines[0][:4] == ["document", "page_number", "item", "description"]
    assert len(lines) == 1 + view.num_rows
    assert main(["table", "--output", output, "--items", "total"]) == 2
    assert "not a list or object question" in capsys.readouterr().err


def test_a_reprocessed_document_replaces_its_items(ray_session, records_model: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "one.pdf").write_bytes(invoice_pdf(63, 2, (612, 792)))
    question = {**LINE_ITEMS, "pages": "first"}
    job = write_job(tmp_path, inputs, records_model, [question], render={"image_splitting": False})
    assert main(["run", "--config", str(job), "--run-id", "first"]) == 0
    first = _items(str(tmp_path / "out"))
    assert first.num_rows > 0 and set(first.column("run_id").to_pylist()) == {"first"}
    changed = ["--set", "questions=" + json.dumps([{**question, "text": "Every line item?"}])]
    assert main(["run", "--config", str(job), "--run-id", "second", *changed]) == 0
    items = _items(str(tmp_path / "out"))
    assert set(items.column("run_id").to_pylist()) == {"second"}
    current = read_answers(str(tmp_path / "out"), "second").to_pylist()
    expected = sum(len(read_records(row["answer"], True)[0]) for row in current) * 4
    assert items.num_rows == expected


def test_an_older_output_gains_the_items_table(ray_session, records_model: Path, tmp_path: Path) -> None:
    """An output written before `items` existed (its answer tables without the `items` column, no `items`
    table): the next run adds both, and the table holds the new run's records."""
    output = tmp_path / "out"
    older = pa.schema([field for field in ANSWER_SCHEMA if field.name != "items"])
    row = {"run_id": "old", "document": "/elsewhere/old.pdf", "page_number": 1, "question_id": "q", "answer": "1"}
    old_rows = pa.Table.from_pylist([{**row, "status": "ok", "run_date": datetime.date(2026, 1, 1)}], schema=older)
    write_deltalake(str(output / "answers"), old_rows, partition_by=["run_date"])
    write_deltalake(str(output / "current"), old_rows)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "one.pdf").write_bytes(invoice_pdf(64, 1, (612, 792)))
    job = write_job(tmp_path, inputs, records_model, [LINE_ITEMS], render={"image_splitting": False})
    assert main(["run", "--config", str(job)]) == 0
    items = _items(str(output))
    assert items.schema == ITEM_SCHEMA and items.num_rows > 0
    assert set(items.column("document").to_pylist()) == {str(inputs / "one.pdf")}
    current = {row["document"]: row for row in read_current(str(output)).to_pylist()}
    assert current["/elsewhere/old.pdf"]["items"] in (None, [])  # the old row, read with the new column
    [new] = [row for document, row in current.items() if document != "/elsewhere/old.pdf"]
    assert len(items) == len(read_records(new["answer"], True)[0]) * len(LINE_ITEMS["fields"])


def test_the_prompts_command_shows_what_the_model_is_asked(records_model: Path, tmp_path: Path, capsys) -> None:
    job = write_job(tmp_path, tmp_path, records_model, [LINE_ITEMS])
    assert main(["prompts", "--config", str(job)]) == 0
    shown = capsys.readouterr().out
    assert "Answer with a JSON list of objects with the keys description (text)" in shown
    assert '"maxItems": 200' in shown
