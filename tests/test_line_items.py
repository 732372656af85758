"""List and object questions: records of typed fields decoded as JSON under a schema (xgrammar), read back
field by field, typed and boxed, and kept in the `items` Delta table beside `current`, numbered across a
document's pages. The tiny random model answers: under the grammar it can only write JSON valid against the
schema, which is what these tests check."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import duckdb
import jsonschema
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from jobs.cli import main
from jobs.devtools.samples import invoice_pdf, write_job
from jobs.query import query
from pipeline.config import ValuesConfig
from pipeline.questions import QuestionTemplate
from pipeline.records import ITEM_SCHEMA, OUTPUT_SCHEMA
from pipeline.structured import TRUNCATED, document_items, is_header, read_records, record_prompt, record_schema
from pipeline.tables import read_answers
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

CUT_ITEMS = {**LINE_ITEMS, "id": "cut_items", "pages": "first", "max_new_tokens": 12}  # cut by its token cap


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
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"description": "Widget", "quantity": "two", "unit_price": None, "amount": None}], schema)
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


@pytest.fixture(scope="module")
def line_item_run(ray_session, records_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run over two invoices, the second's table continuing over three pages."""
    invoices = {"one.pdf": (61, 1), "three.pdf": (62, 3)}
    return run_over_invoices(
        tmp_path_factory.mktemp("line-items"), invoices, records_model, [LINE_ITEMS, VENDOR, CUT_ITEMS]
    )


def test_every_answer_is_json_valid_against_its_schema_and_its_items_are_its_fields(line_item_run: Path) -> None:
    output = str(line_item_run / "out")
    rows = read_answers(output).to_pylist()
    questions = {spec["id"]: QuestionTemplate(**spec) for spec in (LINE_ITEMS, VENDOR, CUT_ITEMS)}
    items = DeltaTable(f"{output}/items").to_pyarrow_table()  # deltalake alone, no docqa code
    parser = ValueParser(ValuesConfig())
    assert len(rows) == 1 + 3 + 2 * 2  # line items on every page; vendor and cut items on the first pages
    for row in rows:
        question = questions[row["question_id"]]
        assert row["status"] == "ok", row["error"]
        records, problem = read_records(row["answer"], question.type == "list")
        if row["value_status"] == TRUNCATED:  # cut by max_new_tokens: its complete records are valid
            assert problem.startswith(TRUNCATED) and f"{len(records)} complete record(s) kept" in row["error"]
            for record in records:
                jsonschema.validate(record, record_schema(question).get("items", record_schema(question)))
        else:
            assert (row["value_status"], problem) == ("parsed", None), row["answer"]
            jsonschema.validate(json.loads(row["answer"]), record_schema(question))
        mine = items.filter(
            pc.and_(
                pc.equal(items["document"], row["document"]),
                pc.and_(
                    pc.equal(items["page_number"], row["page_number"]),
                    pc.equal(items["question_id"], row["question_id"]),
                ),
            )
        ).to_pylist()
        assert len(mine) == len(records) * len(question.fields)
        by_item: dict[int, dict[str, dict]] = {}
        for item in mine:
            by_item.setdefault(item["item"], {})[item["field"]] = item
        for record, item in zip(records, [by_item[key] for key in sorted(by_item)], strict=True):
            for field in question.fields:
                stored = item[field.name]
                assert stored["answer"] == record[field.name]
                expected = parser.parse(field, record[field.name])
                for column in ("value_number", "value_currency", "value_date", "value_boolean", "value_status"):
                    assert stored[column] == expected[column], (field.name, column)
    assert any(read_records(row["answer"], True)[0] for row in rows if row["question_id"] == "line_items")
    assert {row["value_status"] for row in rows if row["question_id"] == "cut_items"} == {TRUNCATED}


def test_items_are_numbered_across_the_pages_of_a_document(line_item_run: Path) -> None:
    output = str(line_item_run / "out")
    items = query(output, "SELECT * FROM items WHERE document LIKE '%three.pdf' AND question_id = 'line_items'")
    assert [(field.name, field.type) for field in items.schema] == [(field.name, field.type) for field in ITEM_SCHEMA]
    seen = sorted({(row["page_number"], row["item"]) for row in items.to_pylist()})
    numbers = [item for _, item in seen]
    assert numbers == list(range(len(numbers)))  # 0, 1, 2 ... across pages
    assert [page for page, _ in seen] == sorted(page for page, _ in seen)  # in page order
    from_deltalake = DeltaTable(f"{output}/items").to_pyarrow_table()
    everything = query(output, "SELECT * FROM items")
    key = ["document", "page_number", "question_id", "item", "field"]
    assert sorted(everything.select(key).to_pylist(), key=str) == sorted(
        from_deltalake.select(key).to_pylist(), key=str
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
    connection = duckdb.connect()  # README's pivot, by DuckDB over the table as deltalake reads it
    connection.register("items", DeltaTable(f"{output}/items").to_pyarrow_table())
    pivoted = connection.sql(
        "PIVOT (SELECT document, item, field, answer FROM items WHERE question_id = 'line_items') "
        "ON field USING any_value(answer) ORDER BY document, item"
    ).fetch_arrow_table()
    assert sorted(pivoted.column_names) == ["amount", "description", "document", "item", "quantity", "unit_price"]
    assert pivoted.num_rows == view.num_rows
    everything = DeltaTable(f"{output}/items").to_pyarrow_table().num_rows
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
    first = DeltaTable(str(tmp_path / "out" / "items")).to_pyarrow_table()
    assert first.num_rows > 0 and set(first.column("run_id").to_pylist()) == {"first"}
    changed = ["--set", "questions=" + json.dumps([{**question, "text": "Every line item?"}])]
    assert main(["run", "--config", str(job), "--run-id", "second", *changed]) == 0
    items = DeltaTable(str(tmp_path / "out" / "items")).to_pyarrow_table()
    assert set(items.column("run_id").to_pylist()) == {"second"}
    current = read_answers(str(tmp_path / "out"), "second").to_pylist()
    expected = sum(len(read_records(row["answer"], True)[0]) for row in current) * 4
    assert items.num_rows == expected


@pytest.mark.slow
def test_an_older_output_gains_the_items_table(ray_session, records_model: Path, tmp_path: Path) -> None:
    """An output written before `items` existed: the next run adds the table (the `items` column of the
    answer tables is added as any new column is: tests/test_tables.py)."""
    import shutil

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "one.pdf").write_bytes(invoice_pdf(64, 1, (612, 792)))
    plain = write_job(tmp_path, inputs, records_model, [{"id": "q", "text": "Total?", "max_new_tokens": 2}])
    assert main(["run", "--config", str(plain)]) == 0
    shutil.rmtree(tmp_path / "out" / "items")  # as an older docqa left it
    (inputs / "two.pdf").write_bytes(invoice_pdf(65, 1, (612, 792)))
    job = write_job(tmp_path, inputs, records_model, [{**LINE_ITEMS, "max_new_tokens": 40}])
    assert main(["run", "--config", str(job)]) == 0
    items = DeltaTable(str(tmp_path / "out" / "items")).to_pyarrow_table()
    assert set(items.column("question_id").to_pylist()) <= {"line_items"}


def test_the_prompts_command_shows_what_the_model_is_asked(records_model: Path, tmp_path: Path, capsys) -> None:
    job = write_job(tmp_path, tmp_path, records_model, [LINE_ITEMS])
    assert main(["prompts", "--config", str(job)]) == 0
    shown = capsys.readouterr().out
    assert "Answer with a JSON list of objects with the keys description (text)" in shown
    assert '"maxItems": 200' in shown
