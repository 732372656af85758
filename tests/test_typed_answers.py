"""Answers users can compute with and check: typed values read in a locale, choices the model cannot leave,
evidence boxes from the page's text layer, the text layer as the answer, document-level reductions."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pymupdf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.cli import main
from jobs.devtools.samples import PAGE_SIZES, invoice_pdf, scanned_pdf
from jobs.query import AnswerStore
from pipeline.config import JobConfig, TextLayerConfig, ValuesConfig
from pipeline.grammars import CONSTRAINED_FORMS
from pipeline.images import ImageGeometry
from pipeline.questions import QuestionTemplate
from pipeline.records import Document, Page
from pipeline.rendering import document_pages
from pipeline.tables import read_current
from pipeline.text_layer import find_evidence, is_usable
from pipeline.values import VALUE_COLUMNS, ValueParser

# (type, answer, locale, day_first) -> the value columns it must give
REAL_WORLD = [
    ("money", "1.234,50 €", "de_DE", None, {"value_number": 1234.5, "value_currency": "EUR"}),
    ("money", "$1,234.50", "en_US", None, {"value_number": 1234.5, "value_currency": "USD"}),
    ("money", "$1,234.50", "en_CA", None, {"value_number": 1234.5, "value_currency": "CAD"}),
    ("money", "Total: EUR 1 234,50", "fr_FR", None, {"value_number": 1234.5, "value_currency": "EUR"}),
    ("money", "£3.20", "en_GB", None, {"value_number": 3.2, "value_currency": "GBP"}),
    ("money", "-45.10 CHF", "en_US", None, {"value_number": -45.1, "value_currency": "CHF"}),
    ("money", "Total - $45.10", "en_US", None, {"value_number": 45.1, "value_currency": "USD"}),  # a dash, no sign
    ("money", "(45.10) EUR", "en_US", None, {"value_number": -45.1, "value_currency": "EUR"}),  # accounting
    ("money", "12.00", "en_US", None, {"value_number": 12.0, "value_currency": None}),
    ("number", "1,234", "en_US", None, {"value_number": 1234.0}),
    ("number", "1,234", "de_DE", None, {"value_number": 1.234}),
    ("number", "about 17 items", "en_US", None, {"value_number": 17.0}),
    ("date", "3 Nov 2025", "en_US", None, {"value_date": datetime.date(2025, 11, 3)}),
    ("date", "03/11/2025", "en_GB", None, {"value_date": datetime.date(2025, 11, 3)}),  # day first
    ("date", "03/11/2025", "en_US", None, {"value_date": datetime.date(2025, 3, 11)}),  # month first
    ("date", "03/11/2025", "en_US", True, {"value_date": datetime.date(2025, 11, 3)}),  # day_first wins
    ("date", "3. November 2025", "de_DE", None, {"value_date": datetime.date(2025, 11, 3)}),
    ("date", "The invoice is dated 3 Nov 2025.", "en_US", None, {"value_date": datetime.date(2025, 11, 3)}),
    ("boolean", "yes", "en_US", None, {"value_boolean": True}),
    ("boolean", "No", "en_US", None, {"value_boolean": False}),
    # Words around a value, as models and people write them.
    ("money", "Total: $45.10", "en_US", None, {"value_number": 45.1, "value_currency": "USD"}),
    ("money", "45.10 EUR due", "en_US", None, {"value_number": 45.1, "value_currency": "EUR"}),
    ("money", "-$45.10", "en_US", None, {"value_number": -45.1, "value_currency": "USD"}),
    ("money", "45.10EUR", "en_US", None, {"value_number": 45.1, "value_currency": "EUR"}),
    ("money", "The total amount due is $45.10", "en_US", None, {"value_number": 45.1, "value_currency": "USD"}),
    ("date", "dated 3 Nov 2025", "en_US", None, {"value_date": datetime.date(2025, 11, 3)}),
]
UNREADABLE = [
    ("money", "n/a"),
    ("number", "none"),
    ("date", "soon"),
    ("boolean", "maybe"),
    # The tiny random model's noise: a digit inside it is no amount.
    ("money", "xR,x3VM_e;;;;;;;"),
    ("money", "xMXa:xRwM1)_IO$"),
    ("number", "K;Q7vv9_x"),
    ("money", "VRP5MTI"),
    # Near misses: an identifier, a second number, a page count, two dates, symbols after the value.
    ("money", "INV-2025-0042"),
    ("number", "INV-2025-0042"),
    ("money", "2 x $10.00"),
    ("number", "Page 1 of 3"),
    ("money", "$45.10;;;;"),
    ("date", "3 Nov 2025 and 4 Nov 2025"),
    ("money", "The amount that the customer still has to pay is $45.10"),
]


@pytest.mark.parametrize(("kind", "answer", "locale", "day_first", "expected"), REAL_WORLD)
def test_typed_values_of_real_world_strings(kind, answer, locale, day_first, expected) -> None:
    parser = ValueParser(ValuesConfig(locale=locale, day_first=day_first))
    columns = parser.parse(QuestionTemplate(id="q", text="?", type=kind), answer)
    assert columns["value_status"] == "parsed"
    expected = {"value_number": None, "value_currency": None, "value_date": None, "value_boolean": None, **expected}
    assert {name: columns[name] for name in expected} == expected


@pytest.mark.parametrize(("kind", "answer"), UNREADABLE)
def test_an_unreadable_answer_is_kept_and_says_why(kind: str, answer: str) -> None:
    columns = ValueParser(ValuesConfig()).parse(QuestionTemplate(id="q", text="?", type=kind), answer)
    assert columns["value_status"] == "unparsed"
    assert columns["error"].startswith(f"{kind} not read from the answer: ") and repr(answer) in columns["error"]


def test_text_questions_have_no_value_and_choices_are_checked() -> None:
    parser = ValueParser(ValuesConfig())
    assert set(parser.parse(QuestionTemplate(id="q", text="?"), "12 EUR").values()) == {None}
    choice = QuestionTemplate(id="q", text="?", type="choice", choices=["red", "green"])
    assert parser.parse(choice, "Red") == {**dict.fromkeys(VALUE_COLUMNS), "value_status": "parsed", "answer": "red"}
    assert parser.parse(choice, "blue")["value_status"] == "unparsed"


def test_question_ids_cannot_take_a_documents_view_column() -> None:
    with pytest.raises(ValueError, match=r"question ids \['total_page'\] clash with columns of the documents view"):
        JobConfig(input="i", output="o", questions=[{"id": "total", "text": "?"}, {"id": "total_page", "text": "?"}])


def _pages(data: bytes, questions: list[dict], ocr: str = "none") -> list[Page]:
    """The pages of a document through the render stage (in its sandbox), as the pipeline makes them (OCR
    off unless ``ocr`` names the engine: these tests are about the PDF's own text layer)."""
    config = JobConfig(input="in", output="out", questions=questions, ocr={"engine": ocr})
    geometry = ImageGeometry(980, 378, False, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    pages = document_pages(config, geometry, Document("memory://invoice.pdf", len(data), data=data))
    return [page for page in pages if page.page_number is not None]


def test_evidence_boxes_are_where_the_words_are_printed() -> None:
    """Answers found in a born-digital invoice's text layer (after normalizing case, spaces and number
    formats) get the box PyMuPDF's own search finds for them; a scan of the same page has no text layer."""
    data = invoice_pdf(3, pages=1, page_size=PAGE_SIZES["letter"])
    [page] = _pages(data, [{"id": "q", "text": "?"}])
    document = pymupdf.open(stream=data, filetype="pdf")[0]
    width, height = document.rect.width, document.rect.height
    total = re.search(r"TOTAL DUE: (\S+)", document.get_text()).group(1)
    for answer, printed in [
        ("inv-0003", "INV-0003"),
        (total.replace(",", ""), total),
        ("acme  supplies", "ACME Supplies"),
    ]:
        evidence = find_evidence(answer, page.words, page.word_boxes)
        [rect] = document.search_for(printed)
        assert evidence["evidence"] == "text_layer" and evidence["evidence_text"] == printed
        expected = {"x0": rect.x0 / width, "y0": rect.y0 / height, "x1": rect.x1 / width, "y1": rect.y1 / height}
        assert evidence["evidence_bbox"] == pytest.approx(expected, abs=0.01), answer
    assert find_evidence("INV-9999", page.words, page.word_boxes)["evidence"] == "none"
    assert page.text_layer_chars > 100 and page.text_usable

    [scanned] = _pages(scanned_pdf(data), [{"id": "q", "text": "?"}])
    assert (scanned.text_layer_chars, scanned.words, scanned.text_usable) == (0, [], False)
    assert find_evidence("INV-0003", scanned.words, scanned.word_boxes)["evidence"] == "none"


def test_a_page_answered_from_its_text_layer_is_not_rendered() -> None:
    data = invoice_pdf(5, pages=1, page_size=PAGE_SIZES["a4"])
    [text_only] = _pages(data, [{"id": "t", "text": "?", "source": "auto"}])
    assert not text_only.sub_image_shapes and text_only.text == pymupdf.open(stream=data)[0].get_text(sort=True)
    [scanned] = _pages(scanned_pdf(data), [{"id": "t", "text": "?", "source": "auto"}])
    assert scanned.sub_image_shapes and scanned.text == ""  # no text layer, no OCR: the model reads it
    [read] = _pages(scanned_pdf(data), [{"id": "t", "text": "?", "source": "auto"}], ocr="tesseract")
    assert not read.sub_image_shapes and read.text_source == "ocr" and "INV-0005" in read.text  # OCR'd, not rendered


def test_usable_text_layer_rule() -> None:
    rule = TextLayerConfig(min_chars=10, min_readable_share=0.8)
    assert is_usable("Invoice INV-0001, total $12.00", rule)
    assert not is_usable("Invoice", rule)  # too short
    assert not is_usable("\ufffd\ufffd\ufffd\x01\x02\ue000\ue001 abc def", rule)  # unmapped glyphs


QUESTIONS = [
    {
        "id": "kind",
        "text": "What kind of document is this?",
        "type": "choice",
        "reduce": "last",
        "choices": ["invoice", "receipt", "credit note"],
        "max_new_tokens": 4,
    },
    {"id": "paid", "text": "Is it paid?", "type": "boolean", "pages": "first"},
    {
        "id": "total",
        "text": "Total due?",
        "type": "money",
        "constrained": True,
        "pages": "last",
        "max_new_tokens": 10,
        "reduce": "max_confidence",
    },
    {"id": "date", "text": "Invoice date?", "type": "date", "max_new_tokens": 6, "reduce": "all"},
    {"id": "text", "text": "Transcribe the page.", "source": "auto", "max_new_tokens": 8},
]


def test_run_types_constrains_cites_and_reduces(ray_session, tiny_model: Path, tmp_path: Path) -> None:
    """`docqa run` over born-digital and scanned invoices: every choice and boolean answer is allowed and
    read; constrained amounts take their form; born-digital pages are transcribed from their text layer
    (equal to PyMuPDF's text, with its evidence), scanned ones by the model; `docqa table` and the
    `documents` view reduce each question as configured."""
    import yaml

    inputs = tmp_path / "pdfs"
    inputs.mkdir()
    born_digital = {number: invoice_pdf(number, pages=2, page_size=PAGE_SIZES["letter"]) for number in (1, 2)}
    for number, data in born_digital.items():
        (inputs / f"invoice-{number}.pdf").write_bytes(data)
    (inputs / "scan-1.pdf").write_bytes(scanned_pdf(born_digital[1]))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": str(inputs), "output": str(tmp_path / "out"), "questions": QUESTIONS}))
    assert main(["run", "--config", str(job), "--model", str(tiny_model)]) == 0

    rows = read_current(str(tmp_path / "out")).to_pylist()
    assert len(rows) == 3 * (2 * 3 + 2)  # 3 documents x (2 pages x kind, date, text + paid, total)
    assert {row["status"] for row in rows} == {"ok"}
    by_question = {qid: [row for row in rows if row["question_id"] == qid] for qid in ("kind", "paid", "total", "date")}
    for row in by_question["kind"]:
        assert row["answer"] in ("invoice", "receipt", "credit note") and row["value_status"] == "parsed"
    for row in by_question["paid"]:
        assert row["answer"] in ("yes", "no") and row["value_boolean"] == (row["answer"] == "yes")
    for row in by_question["total"]:
        assert re.fullmatch(CONSTRAINED_FORMS["money"], row["answer"]) or row["generated_tokens"] == 10
    for row in by_question["date"]:
        assert row["value_status"] in ("parsed", "unparsed") and (row["value_status"] == "parsed") == (
            row["value_date"] is not None
        )
    for row in [row for row in rows if row["question_id"] == "text"]:
        name = Path(row["document"]).name
        if name.startswith("invoice"):
            page = pymupdf.open(stream=born_digital[int(name[8])])[row["page_number"] - 1]
            assert row["answer_source"] == "text_layer" and row["answer"] == page.get_text(sort=True)
            assert row["evidence"] == "text_layer" and row["text_layer_chars"] > 100
            assert row["confidence"] is None and row["generated_tokens"] is None
        else:  # the scan: no text layer, its text read by OCR (not the model)
            assert row["answer_source"] == "ocr" and row["text_source"] == "ocr" and row["text_layer_chars"] > 100
            assert "INV-0001" in row["answer"] and row["confidence"] is None

    store = AnswerStore(str(tmp_path / "out"))
    documents = {row["document"]: row for row in store.reader("SELECT * FROM documents").read_all().to_pylist()}
    table = {row["document"]: row for row in store.table().read_all().to_pylist()}
    assert documents == table and len(documents) == 3
    for document, reduced in documents.items():

        def of(qid: str, document: str = document) -> list[dict]:
            mine = (row for row in rows if (row["document"], row["question_id"]) == (document, qid))
            return sorted(mine, key=lambda row: row["page_number"])

        assert (reduced["kind"], reduced["kind_page"]) == (of("kind")[-1]["answer"], 2)  # last
        assert (reduced["paid"], reduced["paid_value"], reduced["paid_page"]) == (
            of("paid")[0]["answer"],
            of("paid")[0]["value_boolean"],
            1,
        )
        best = max(of("total"), key=lambda row: row["confidence"])
        if best["value_status"] == "parsed":
            assert (reduced["total_value"], reduced["total_currency"]) == (best["value_number"], best["value_currency"])
        parsed_dates = [row for row in of("date") if row["value_status"] == "parsed"]
        assert reduced["date_page"] == (", ".join(str(row["page_number"]) for row in parsed_dates) or None)  # all


def _evidence_word_by_word(answer: str, words: list[str]) -> tuple[int, int] | None:
    """The lookup as it was: from each word, extend while the answer's prefix matches (quadratic on a page
    of words that each begin the answer); the reference the linear lookup must equal."""
    from pipeline.text_layer import normalized

    target, keys = normalized(answer), [normalized(word) for word in words]
    for first, key in enumerate(keys):
        if not key or not target.startswith(key):
            continue
        read, last = key, first
        while len(read) < len(target) and last + 1 < len(keys):
            last += 1
            read += keys[last]
            if not target.startswith(read):
                break
        if read == target:
            return first, last
    return None


@settings(max_examples=300, deadline=None)
@given(
    words=st.lists(st.sampled_from(["a", "aa", "b", "A.", "-", "ab", "1,2", ""]), max_size=30),
    answer=st.text(alphabet="aAb1,2 .-", max_size=12),
)
def test_the_linear_evidence_lookup_finds_what_the_word_by_word_one_did(words: list[str], answer: str) -> None:
    boxes = [coordinate for index in range(len(words)) for coordinate in (index / 40, 0.1, (index + 1) / 40, 0.2)]
    found = find_evidence(answer, words, boxes)
    expected = _evidence_word_by_word(answer, words)
    if expected is None:
        assert found["evidence"] == "none"
    else:
        first, last = expected
        assert found["evidence_text"] == " ".join(words[first : last + 1])
        assert found["evidence_bbox"]["x0"] == pytest.approx(first / 40)


@pytest.mark.parametrize(
    ("words", "answer"),
    [
        (["aa"] * 100_000 + ["a"], "a" * 3001),  # it occurs everywhere, words end it only at the page's end
        (["a"] + ["ba"] * 99_999, "ab" * 1500),  # everywhere, but never at a word's start
    ],
    ids=["found-last", "never-at-a-word-start"],
)
def test_the_evidence_lookup_stays_linear_on_adversarial_pages(words: list[str], answer: str) -> None:
    """A page at the text layer's cap of 100,000 words and a 3,000-character answer: the lookup reading the
    page once (a fraction of a second), where retrying after each occurrence took seconds."""
    import time

    boxes = [0.0, 0.0, 1.0, 1.0] * len(words)
    elapsed = float("inf")
    for _ in range(3):  # the fastest of three: a busy machine slows one run, never all the work it does
        started = time.perf_counter()
        found = find_evidence(answer, words, boxes)
        elapsed = min(elapsed, time.perf_counter() - started)
    if words[-1] == "a" and words[0] == "aa":
        assert found["evidence_text"] == " ".join(words[98_500:])
    else:
        assert found["evidence"] == "none"
    assert elapsed < 0.5, f"{elapsed:.2f} s"
