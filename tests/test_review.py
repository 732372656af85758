"""Review and evaluate: the review page in a real browser (Debian's headless Chromium through Selenium), its
JSON API over a real output, reviews as a Delta table that the documents view and `docqa table` read,
Label Studio both ways, and `docqa evaluate`'s figures against a truth file."""

from __future__ import annotations

import csv
import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from deltalake import DeltaTable

from bench import free_port
from jobs.cli import main
from jobs.devtools.samples import write_job
from jobs.evaluate import Evaluation, Scored, summarize, threshold_for
from jobs.query import query
from jobs.review_server import TOKEN_ENV, build_app
from jobs.reviews import ReviewBook, entry_id
from pipeline.tables import read_current
from tests.conftest import run_over_invoices

TOKEN = "review-test-token-51c2"
QUESTIONS = [
    # The tiny model answers "5" on these pages: printed on each ("Page 1 of 5"), so it has evidence.
    {"id": "page", "text": "Which page is this?", "type": "number", "constrained": True, "max_new_tokens": 1},
    {"id": "total", "text": "What is the total?", "type": "money", "max_new_tokens": 4},  # noise: unparsed
    {"id": "who", "text": "Who issued it?", "pages": "first", "max_new_tokens": 4},
]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def reviewed_run(ray_session, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run over a 5-page and a 2-page invoice; each test reviews a copy of its output."""
    return run_over_invoices(
        tmp_path_factory.mktemp("review"), {"five.pdf": (71, 5), "two.pdf": (72, 2)}, tiny_model, QUESTIONS
    )


@pytest.fixture
def output(reviewed_run: Path, tmp_path: Path) -> str:
    copy = tmp_path / "out"
    shutil.copytree(reviewed_run / "out", copy)  # Delta tables hold relative paths: a copy is a table
    return str(copy)


class Server:
    """The review app on uvicorn in a thread, on a free port."""

    def __init__(self, book: ReviewBook) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_app(book, TOKEN), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the review server did not start"
            time.sleep(0.05)

    def api(self, method: str, path: str, token: str | None = TOKEN, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(method, self.url + path, headers=headers, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def server(output: str) -> Iterator[Server]:
    running = Server(ReviewBook(output, below=0.9))
    yield running
    running.stop()


def test_without_the_token_nothing_is_served(server: Server, output: str, monkeypatch, capsys) -> None:
    entry = server.api("GET", "/api/queue").json()["items"][0]
    for method, path, body in [
        ("GET", "/api/queue", None),
        ("GET", f"/api/pages/{entry['id']}", None),
        ("GET", f"/api/parse?id={entry['id']}&answer=1", None),
        ("POST", "/api/reviews", {"id": entry["id"], "decision": "accept"}),
    ]:
        for token in (None, "wrong-token"):
            response = server.api(method, path, token=token, json=body)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert entry["document"] not in response.text and "items" not in response.json()
    page = requests.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and 'name="token"' in page.text and "five.pdf" not in page.text
    wrong = requests.post(server.url + "/login", data={"token": "nope"}, timeout=30, allow_redirects=False)
    assert wrong.status_code == 401 and "Wrong token" in wrong.text and "set-cookie" not in wrong.headers
    signed = requests.post(server.url + "/login", data={"token": TOKEN}, timeout=30, allow_redirects=False)
    cookie = signed.headers["set-cookie"]
    assert signed.status_code == 303 and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert query(output, "SELECT count(*) AS n FROM reviews").column("n").to_pylist() == [0]
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["review", "--output", output]) == 2
    assert TOKEN_ENV in capsys.readouterr().err


def test_an_image_url_reaches_only_the_queue_s_pages(server: Server, output: str) -> None:
    entry = server.api("GET", "/api/queue").json()["items"][0]
    image = server.api("GET", f"/api/pages/{entry['id']}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(b"\x89PNG")
    elsewhere = entry_id("/etc/passwd", None, 1, "total", None, None, None)  # a document of no queue
    altered = entry["id"][:-1] + ("1" if entry["id"].endswith("0") else "0")  # one character off
    for identity in ["..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", elsewhere, altered]:
        response = server.api("GET", f"/api/pages/{identity}")
        assert response.status_code == 404 and not response.content.startswith(b"\x89PNG"), identity
    assert server.api("POST", "/api/reviews", json={"id": elsewhere, "decision": "accept"}).status_code == 404
    bad = server.api("POST", "/api/reviews", json={"id": entry["id"], "decision": "maybe"})
    assert bad.status_code == 422 and "decision must be one of" in bad.json()["error"]
    total = next(item for item in server.api("GET", "/api/queue").json()["items"] if item["question_id"] == "total")
    wrong = server.api("POST", "/api/reviews", json={"id": total["id"], "decision": "correct", "answer": "soon"})
    assert wrong.status_code == 422 and "not a value of its type" in wrong.json()["error"]
    assert query(output, "SELECT count(*) AS n FROM reviews").column("n").to_pylist() == [0]


def test_two_reviewers_at_once_lose_nothing(output: str) -> None:
    """Two `docqa review` servers on one output, each reviewer posting as fast as it can: every decision
    lands in `reviews` (Delta's concurrent appends), the same answer decided by both included."""
    first, second = Server(ReviewBook(output, below=0.9)), Server(ReviewBook(output, below=0.9))
    try:
        entries = first.api("GET", "/api/queue").json()["items"]
        second.api("GET", "/api/queue")
        assert len(entries) >= 9
        shared = entries[0]["id"]
        plan = [(first, "ann", entries[1 + 2 * n]["id"]) for n in range(4)]
        plan += [(second, "bob", entries[2 + 2 * n]["id"]) for n in range(4)]
        plan += [(first, "ann", shared), (second, "bob", shared)]

        def post(step) -> int:
            server, reviewer, identity = step
            body = {"id": identity, "decision": "accept", "reviewer": reviewer}
            return server.api("POST", "/api/reviews", json=body).status_code

        with ThreadPoolExecutor(len(plan)) as pool:
            assert list(pool.map(post, plan)) == [200] * len(plan)
    finally:
        first.stop()
        second.stop()
    reviews = query(output, "SELECT reviewer, decision FROM reviews").to_pylist()
    assert len(reviews) == len(plan)
    assert sorted(row["reviewer"] for row in reviews) == ["ann"] * 5 + ["bob"] * 5


def test_a_document_reprocessed_into_another_answer_returns_to_the_queue(
    reviewed_run: Path, output: str, tiny_model: Path
) -> None:
    book = ReviewBook(output, below=0.9)
    [entry] = [e for e in book.queue() if e.question_id == "who" and e.document.endswith("two.pdf")]
    book.decide(entry, "accept", None, "ann")
    assert not [e for e in book.queue() if e.question_id == "who" and e.document.endswith("two.pdf")]
    rows = query(output, "SELECT question_id, review FROM reviewed WHERE review IS NOT NULL").to_pylist()
    assert rows == [{"question_id": "who", "review": "accepted"}]
    longer = [{**question, "max_new_tokens": 6} if question["id"] == "who" else question for question in QUESTIONS]
    job = write_job(reviewed_run, reviewed_run / "in", tiny_model, longer, render={"image_splitting": False})
    assert main(["run", "--config", str(job), "--output", output, "--reprocess", "all"]) == 0
    [again] = [e for e in book.queue() if e.question_id == "who" and e.document.endswith("two.pdf")]
    assert again.answer != entry.answer and again.run_id != entry.run_id
    assert query(output, "SELECT count(*) AS n FROM reviewed WHERE review IS NOT NULL").column("n").to_pylist() == [0]


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_shows_the_evidence_and_a_correction_typed_with_the_keyboard_reaches_the_table(
    server: Server, output: str, browser, tmp_path: Path, capsys
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "reviewer").send_keys("ann")
    browser.find_element(By.ID, "sign-in").click()
    wait.until(shown.text_to_be_present_in_element((By.ID, "position"), "1 / "))
    queue = server.api("GET", "/api/queue?limit=200").json()["items"]
    body = browser.find_element(By.TAG_NAME, "body")

    def go_to(index: int) -> None:
        current = int(browser.find_element(By.ID, "position").text.split(" / ")[0]) - 1
        for _ in range(abs(index - current)):
            body.send_keys("j" if index > current else "k")
        wait.until(shown.text_to_be_present_in_element((By.ID, "position"), f"{index + 1} / "))

    # The page image, and the evidence box where the evidence is.
    boxed = next(index for index, item in enumerate(queue) if item["evidence_bbox"])
    go_to(boxed)
    drawn = (
        "const image = document.getElementById('page');"
        " return image.complete && image.naturalWidth > 0 && document.getElementById('box').style.display === 'block'"
    )
    wait.until(lambda _: browser.execute_script(drawn))
    image = browser.find_element(By.ID, "page").rect
    box = browser.find_element(By.ID, "box").rect
    bbox = queue[boxed]["evidence_bbox"]
    assert box["x"] - image["x"] == pytest.approx(bbox["x0"] * image["width"], abs=2)
    assert box["y"] - image["y"] == pytest.approx(bbox["y0"] * image["height"], abs=2)
    assert box["width"] == pytest.approx((bbox["x1"] - bbox["x0"]) * image["width"], abs=2)
    assert box["height"] == pytest.approx((bbox["y1"] - bbox["y0"]) * image["height"], abs=2)
    browser.save_screenshot(str(tmp_path / "review.png"))

    # A typed answer corrected with the keyboard: c, the value (its reading shown as typed), Enter.
    target = next(index for index, item in enumerate(queue) if item["question_id"] == "total")
    go_to(target)
    assert browser.find_element(By.ID, "reason").text == "typed value did not parse"
    body.send_keys("c")
    field = browser.switch_to.active_element
    assert field.get_attribute("id") == "correction"
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("$42.50")
    wait.until(shown.text_to_be_present_in_element((By.ID, "parsed"), "reads as 42.5 USD"))
    field.send_keys(Keys.ENTER)
    wait.until(shown.text_to_be_present_in_element((By.ID, "status"), "corrected: total"))

    [review] = query(output, "SELECT * FROM reviews").to_pylist()
    assert (review["decision"], review["answer"], review["value_number"], review["value_currency"]) == (
        "corrected",
        "$42.50",
        42.5,
        "USD",
    )
    assert review["reviewer"] == "ann" and review["reviewed_answer"] == queue[target]["answer"]
    document = queue[target]["document"]
    [row] = [r for r in query(output, "SELECT * FROM documents").to_pylist() if r["document"] == document]
    assert (row["total"], row["total_value"], row["total_review"]) == ("$42.50", 42.5, "corrected")
    assert main(["table", "--output", output, "--questions", "total", "--format", "csv"]) == 0
    assert '"$42.50",42.5,"USD",1,"corrected"' in capsys.readouterr().out
    assert queue[target]["id"] not in {item["id"] for item in server.api("GET", "/api/queue").json()["items"]}

    # One entry accepted with `a`, another rejected with `r` (the last of the queue, then the first).
    decided = {}
    for key, decision, pick in (("a", "accepted", -1), ("r", "rejected", 0)):
        queue = server.api("GET", "/api/queue?limit=200").json()["items"]
        wait.until(shown.text_to_be_present_in_element((By.ID, "position"), f" / {len(queue)}"))
        index = pick % len(queue)
        go_to(index)
        body.send_keys(key)
        item = queue[index]
        done = f"{decision}: {item['question_id']} on page {item['page_number']}"
        wait.until(shown.text_to_be_present_in_element((By.ID, "status"), done))
        decided[decision] = item
    reviews = {row["decision"]: row for row in query(output, "SELECT * FROM reviews").to_pylist()}
    assert sorted(reviews) == ["accepted", "corrected", "rejected"]
    for decision, item in decided.items():
        review = reviews[decision]
        assert (review["document"], review["page_number"], review["question_id"], review["reviewed_answer"]) == (
            item["document"],
            item["page_number"],
            item["question_id"],
            item["answer"],
        )
        assert review["answer"] == (item["answer"] if decision == "accepted" else None)
        assert review["reviewer"] == "ann"


LABEL_STUDIO_TASK = {  # the JSON task format (labelstud.io/guide/task_format): what an import needs
    "type": "object",
    "required": ["data", "predictions"],
    "properties": {
        "data": {"type": "object", "required": ["image"], "properties": {"image": {"type": "string"}}},
        "predictions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["result", "score", "model_version"],
                "properties": {
                    "score": {"type": "number", "minimum": 0, "maximum": 1},
                    "result": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["from_name", "to_name", "type", "value"],
                            "properties": {"type": {"enum": ["textarea", "rectanglelabels", "choices"]}},
                        },
                    },
                },
            },
        },
    },
}


def test_label_studio_export_and_import(output: str, tmp_path: Path, capsys) -> None:
    import base64

    import jsonschema

    queue = ReviewBook(output, below=0.9).queue()
    path = tmp_path / "tasks.json"
    assert main(["review", "export", str(path), "--format", "label-studio", "--output", output, "--below", "0.9"]) == 0
    assert capsys.readouterr().out.startswith(f"{len(queue)} Label Studio tasks in {path}")
    tasks = json.loads(path.read_text())
    for task, entry in zip(tasks, queue, strict=True):
        jsonschema.validate(task, LABEL_STUDIO_TASK)
        assert base64.b64decode(task["data"]["image"].split(",", 1)[1]).startswith(b"\x89PNG")
        results = {result["type"]: result for result in task["predictions"][0]["result"]}
        assert results["textarea"]["value"]["text"] == [entry.answer or ""]
        if entry.evidence_bbox:
            region = results["rectanglelabels"]["value"]
            assert region["x"] == pytest.approx(100 * entry.evidence_bbox["x0"])
            assert region["width"] == pytest.approx(100 * (entry.evidence_bbox["x1"] - entry.evidence_bbox["x0"]))
            assert region["y"] == pytest.approx(100 * entry.evidence_bbox["y0"])
            assert region["height"] == pytest.approx(100 * (entry.evidence_bbox["y1"] - entry.evidence_bbox["y0"]))
    assert any("rectanglelabels" in str(task) for task in tasks)
    assert "<RectangleLabels" in path.with_suffix(".label-config.xml").read_text()

    # A Label Studio export of three of those tasks: corrected, rejected (a choice), and one not annotated.
    total = next(task for task in tasks if task["data"]["question_id"] == "total")
    who = next(task for task in tasks if task["data"]["question_id"] == "who")
    annotated = [
        {**total, "annotations": [_annotation([_text("$7.00")], "ann@example.com")]},
        {**who, "annotations": [_annotation([_text(who["data"]["answer"]), _choice("reject")], "bob@example.com")]},
        {**tasks[-1], "annotations": []},
    ]
    exported = tmp_path / "export.json"
    exported.write_text(json.dumps(annotated))
    assert main(["review", "import", str(exported), "--output", output]) == 0
    assert capsys.readouterr().out == f"2 reviews recorded from {exported}; 1 tasks skipped\n"
    reviews = {row["question_id"]: row for row in query(output, "SELECT * FROM reviews").to_pylist()}
    assert (reviews["total"]["decision"], reviews["total"]["value_number"]) == ("corrected", 7.0)
    assert reviews["total"]["reviewer"] == "ann@example.com" and reviews["total"]["origin"] == "label-studio"
    assert (reviews["who"]["decision"], reviews["who"]["answer"]) == ("rejected", None)
    assert main(["review", "import", str(tmp_path / "missing.json"), "--output", output]) == 2


def _text(text: str) -> dict:
    return {"id": "t1", "from_name": "answer", "to_name": "image", "type": "textarea", "value": {"text": [text]}}


def _choice(choice: str) -> dict:
    return {"id": "c1", "from_name": "decision", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}


def _annotation(result: list[dict], email: str) -> dict:
    return {
        "id": 1,
        "completed_by": {"id": 1, "email": email},
        "result": result,
        "was_cancelled": False,
        "created_at": "2026-12-06T10:00:00.000000Z",
        "updated_at": "2026-12-06T10:01:00.000000Z",
    }


def test_evaluate_scores_a_truth_file_as_computed_by_hand(output: str, tmp_path: Path, capsys) -> None:
    """Three `who` answers against truths: the answer itself (ANLS 1, exact), the answer and one more
    character (ANLS 1 - 1/(n+1), not exact), something else entirely (ANLS 0)."""
    rows = [row for row in read_current(output).to_pylist() if row["question_id"] == "who"]
    assert len(rows) == 2
    five, two = sorted(rows, key=lambda row: row["document"])
    truth = tmp_path / "truth.jsonl"
    lines = [
        {"document": "five.pdf", "page_number": 1, "question_id": "who", "answer": five["answer"]},
        {"document": "two.pdf", "page_number": 1, "question_id": "who", "answer": two["answer"] + "x"},
        {"document": "two.pdf", "question_id": "who", "answer": "Globex Corporation, Springfield"},
    ]
    truth.write_text("\n".join(json.dumps(line) for line in lines))
    longer = len(two["answer"]) + 1
    expected_anls = (1 + (1 - 1 / longer if 1 / longer < 0.5 else 0) + 0) / 3
    plot = tmp_path / "calibration.png"
    command = ["evaluate", "--output", output, "--truth", str(truth), "--format", "json", "--plot", str(plot)]
    assert main([*command, "--target", "0.5"]) == 0
    [who] = json.loads(capsys.readouterr().out)["questions"]
    assert who["answers"] == 3
    assert who["anls"] == pytest.approx(expected_anls)
    assert who["exact_match"] == pytest.approx(1 / 3) and who["accuracy"] == pytest.approx(1 / 3)
    assert plot.read_bytes().startswith(b"\x89PNG")
    thresholds = tmp_path / "thresholds.json"
    saved = ["evaluate", "--output", output, "--truth", str(truth), "--save", "--write-thresholds", str(thresholds)]
    assert main(saved) == 0
    assert "who" in capsys.readouterr().out
    evaluations = DeltaTable(f"{output}/evaluations").to_pyarrow_table().to_pylist()  # deltalake alone
    assert [(row["question_id"], row["answers"], row["target"]) for row in evaluations] == [("who", 3, 0.98)]
    assert set(json.loads(thresholds.read_text())) <= {"who"}

    # From the reviews: accepted is right, corrected and rejected are wrong.
    book = ReviewBook(output, below=0.9)
    decisions = dict(zip(("accept", "correct", "reject"), book.queue()[:3], strict=True))
    for decision, entry in decisions.items():
        book.decide(entry, decision, "$1.00" if decision == "correct" else None, "ann")
    evaluation = Evaluation(output)
    scored = evaluation.from_reviews()
    assert sorted(answer.correct for answer in scored) == [False, False, True]


# An output of every kind of answer the queue speaks of, committed by the run writer (pipeline/writing.py)
# with rows as the answering actor makes them (values by the real parser), over three real one-page PDFs.
WRITTEN_QUESTIONS = [
    {"id": "who", "text": "Who issued it?"},
    {"id": "total", "text": "What is the total?", "type": "money"},
    {"id": "paid", "text": "Is it paid?", "type": "boolean"},
    {"id": "kind", "text": "What is it?", "type": "choice", "choices": ["invoice", "receipt"]},
    {"id": "issued", "text": "When was it issued?", "type": "date"},
    {
        "id": "lines",
        "text": "List the line items.",
        "type": "list",
        "fields": [{"name": "description", "type": "text"}, {"name": "amount", "type": "money"}],
    },
]
LINE_FIELDS = ("description", "amount")
BOX = {"x0": 0.1, "y0": 0.2, "x1": 0.3, "y1": 0.25}
LINES = [{"description": "Widget", "amount": "$5.00"}, {"description": "Bolt", "amount": "$2.00"}]
# document -> question -> (answer, confidence, evidence found on the page)
WRITTEN_ANSWERS = {
    "a.pdf": {
        "who": ("Acme Corp", 0.3, True),  # below 0.5
        "total": ("$42.50", 0.95, True),  # trusted, unless total's own threshold is higher
        "paid": ("yes", 0.9, False),  # labels are never looked for on the page: not doubtful for that
        "kind": ("Invoice", 0.9, False),
        "issued": ("2026-01-03", 0.9, True),
        "lines": (json.dumps(LINES), 0.4, True),  # below 0.5: its four fields wait
    },
    "b.pdf": {
        "who": ("Globex", 0.9, True),
        "total": ("soon", 0.9, False),  # did not parse
        "paid": ("no", 0.9, False),
        "kind": ("receipt", 0.9, False),
        "issued": ("2026-02-01", 0.9, False),  # parsed, but not on the page
        "lines": ('[{"description": "Nut", "amount": "$1.00"}, {"descr', 0.9, True),  # cut by max_new_tokens
    },
    "c.pdf": {},  # the model failed on its page
}


def _written_rows(document: str, answers: dict[str, tuple[str, float, bool]]) -> list[dict]:
    from pipeline.config import ValuesConfig
    from pipeline.questions import QuestionTemplate
    from pipeline.structured import TRUNCATED, read_records
    from pipeline.values import ValueParser

    parser = ValueParser(ValuesConfig())
    identity = {
        "run_id": "written",
        "document": document,
        "source_version": "v1",
        "config_fingerprint": "f" * 16,
        "document_rows": len(WRITTEN_QUESTIONS),
        "page_number": 1,
        "num_pages": 1,
        "scope": "page",
    }
    rows = []
    for spec in WRITTEN_QUESTIONS:
        question = QuestionTemplate(**spec)
        row = {**identity, "question_id": question.id, "question": question.text}
        if question.id not in answers:
            rows.append({**row, "status": "model_error", "error": "model failed on this page"})
            continue
        answer, confidence, found = answers[question.id]
        evidence = {"evidence": "text_layer", "evidence_text": "x", "evidence_bbox": BOX} if found else {}
        row |= {"answer": answer, "confidence": confidence, "evidence": "none"} | evidence
        if question.has_records:
            records, problem = read_records(answer, True)
            items = [
                {"record": number, "field": field.name, "answer": record[field.name], "evidence": "none"}
                | {key: value for key, value in parser.parse(field, record[field.name]).items() if key != "error"}
                | evidence
                for number, record in enumerate(records)
                for field in question.fields
            ]
            status = "parsed" if problem is None else TRUNCATED
            row |= {"items": items, "value_status": status, "evidence": "none", "evidence_bbox": None}
        else:
            row |= {key: value for key, value in parser.parse(question, answer).items() if key != "error"}
        rows.append(row)
    return rows


@pytest.fixture
def written(tmp_path: Path) -> str:
    """The output (tmp_path/out) of one run over a.pdf, b.pdf and c.pdf (tmp_path/in), as described above."""
    from datetime import UTC, datetime

    from jobs.devtools.samples import invoice_pdf
    from pipeline.config import StorageConfig
    from pipeline.records import rows_to_table
    from pipeline.writing import RunWriter

    inputs = tmp_path / "in"
    inputs.mkdir()
    rows = []
    for number, (name, answers) in enumerate(WRITTEN_ANSWERS.items()):
        (inputs / name).write_bytes(invoice_pdf(80 + number, 1, (612, 792)))
        rows += _written_rows(str(inputs / name), answers)
    start = {
        "run_id": "written",
        "started_at": datetime.now(UTC).isoformat(),
        "input": str(inputs),
        "config": {"questions": WRITTEN_QUESTIONS, "values": {}},
    }
    output = str(tmp_path / "out")
    writer = RunWriter(output, "written", "2026-12-07", StorageConfig(), start)
    writer.write(rows_to_table(rows))
    writer.commit({**start, "finished_at": datetime.now(UTC).isoformat(), "counts": {}})
    return output


def _reasons(entries) -> dict[tuple[str, str, int | None, str | None], str]:
    return {(Path(e.document).name, e.question_id, e.item, e.field): e.reason for e in entries}


def test_the_queue_holds_each_doubtful_answer_with_its_reason(written: str, tmp_path: Path) -> None:
    """One entry per reason, and per-question thresholds (docqa evaluate's, then a higher one) move
    answers out of the queue and into it; `docqa review export` lists the same entries."""
    model_error = "model error: model failed on this page"
    expected = {
        ("a.pdf", "who", None, None): "confidence 0.3 below 0.5",
        **{("a.pdf", "lines", item, field): "confidence 0.4 below 0.5" for item in (0, 1) for field in LINE_FIELDS},
        ("b.pdf", "total", None, None): "typed value did not parse",
        ("b.pdf", "issued", None, None): "typed value without evidence",
        **{("b.pdf", "lines", 0, field): "answer cut by max_new_tokens" for field in LINE_FIELDS},
        **{("c.pdf", spec["id"], None, None): model_error for spec in WRITTEN_QUESTIONS},
    }
    assert _reasons(ReviewBook(written, below=0.5).queue()) == expected

    # evaluate's suggestion, per question: who's 0.3 answer was right, so who needs no more than 0.3.
    truth = tmp_path / "truth.csv"
    truth.write_text("document,page_number,question_id,answer\na.pdf,1,who,Acme Corp\n")
    thresholds = tmp_path / "thresholds.json"
    evaluate = ["evaluate", "--output", written, "--truth", str(truth), "--write-thresholds", str(thresholds)]
    assert main([*evaluate, "--target", "0.9"]) == 0
    assert json.loads(thresholds.read_text()) == {"who": 0.3}
    tasks = tmp_path / "tasks.json"
    export = ["review", "export", str(tasks), "--format", "label-studio", "--output", written]
    assert main([*export, "--thresholds", str(thresholds)]) == 0
    exported = json.loads(tasks.read_text())
    listed = {(Path(task["data"]["document"]).name, task["data"]["question_id"]) for task in exported}
    assert len(exported) == len(expected) - 1 and ("a.pdf", "who") not in listed
    for task in exported:  # the evidence in percent of the page image
        regions = [result for result in task["predictions"][0]["result"] if result["type"] == "rectanglelabels"]
        boxed = task["data"]["question_id"] == "lines" and "model error" not in task["data"]["reason"]
        assert len(regions) == boxed
        for region in regions:
            corner = {key: region["value"][key] for key in ("x", "y", "width", "height")}
            assert corner == pytest.approx({"x": 10, "y": 20, "width": 20, "height": 5})
            assert region["value"]["rectanglelabels"] == ["evidence"]
    # a threshold above an answer's confidence brings it in
    book = ReviewBook(written, below=0.5, thresholds={"who": 0.3, "total": 0.99})
    moved = {**expected, ("a.pdf", "total", None, None): "confidence 0.95 below 0.99"}
    del moved[("a.pdf", "who", None, None)]
    assert _reasons(book.queue()) == moved


def test_a_list_is_reviewed_field_by_field_and_evaluated_from_its_fields(written: str) -> None:
    server = Server(ReviewBook(written, below=0.5))
    try:
        queue = server.api("GET", "/api/queue").json()["items"]
        lines = {
            (e["item"], e["field"]): e for e in queue if e["question_id"] == "lines" and e["document"].endswith("a.pdf")
        }
        assert {key: (e["answer"], e["value"]) for key, e in lines.items()} == {
            (0, "description"): ("Widget", None),
            (0, "amount"): ("$5.00", "5.0 USD"),
            (1, "description"): ("Bolt", None),
            (1, "amount"): ("$2.00", "2.0 USD"),
        }
        assert lines[1, "amount"]["question"] == "List the line items. [amount of item 1]"
        for key, decision, answer in [
            ((0, "amount"), "reject", None),
            ((1, "amount"), "correct", "$2.50"),
            ((1, "description"), "accept", None),
        ]:
            body = {"id": lines[key]["id"], "decision": decision, "answer": answer, "reviewer": "ann"}
            assert server.api("POST", "/api/reviews", json=body).status_code == 200
        left = server.api("GET", "/api/queue").json()["items"]
    finally:
        server.stop()
    assert {
        (e["item"], e["field"]) for e in left if e["question_id"] == "lines" and e["document"].endswith("a.pdf")
    } == {(0, "description")}
    reviews = query(
        written, "SELECT item, field, decision, answer, value_number, value_currency FROM reviews ORDER BY item, field"
    )
    assert reviews.to_pylist() == [
        {
            "item": 0,
            "field": "amount",
            "decision": "rejected",
            "answer": None,
            "value_number": None,
            "value_currency": None,
        },
        {
            "item": 1,
            "field": "amount",
            "decision": "corrected",
            "answer": "$2.50",
            "value_number": 2.5,
            "value_currency": "USD",
        },
        {
            "item": 1,
            "field": "description",
            "decision": "accepted",
            "answer": "Bolt",
            "value_number": None,
            "value_currency": None,
        },
    ]
    seen = query(
        written,
        "SELECT item, field, answer, value_number, review FROM reviewed_items"
        " WHERE question_id = 'lines' AND document LIKE '%a.pdf' ORDER BY item, field",
    ).to_pylist()
    assert [tuple(row.values()) for row in seen] == [
        (0, "amount", None, None, "rejected"),
        (0, "description", "Widget", None, None),
        (1, "amount", "$2.50", 2.5, "corrected"),
        (1, "description", "Bolt", None, "accepted"),
    ]
    view = query(
        written,
        "SELECT item, description, amount, amount_currency FROM items_lines WHERE document LIKE '%a.pdf' ORDER BY item",
    )
    assert [tuple(row.values()) for row in view.to_pylist()] == [(0, "Widget", None, None), (1, "Bolt", 2.5, "USD")]

    # Evaluated from the reviews: the records as reviewed are the truth, [{Widget, null}, {Bolt, $2.50}],
    # against the model's [{Widget, $5.00}, {Bolt, $2.00}]: ANLS* = mean over records of the mean over
    # fields: ((1 + 0) / 2 + (1 + (1 - 1/5)) / 2) / 2 = (0.5 + 0.9) / 2 = 0.7 ("$2.00" is 1 edit from "$2.50").
    [scored] = Evaluation(written).from_reviews()
    assert (Path(scored.document).name, scored.question_id, scored.confidence) == ("a.pdf", "lines", 0.4)
    assert scored.anls == pytest.approx(0.7) and not scored.correct and not scored.exact
    assert json.loads(scored.truth) == [
        {"amount": None, "description": "Widget"},
        {"amount": "$2.50", "description": "Bolt"},
    ]


def test_a_rejected_answer_is_null_and_says_rejected_in_every_view(written: str, capsys) -> None:
    book = ReviewBook(written, below=0.5, thresholds={"total": 0.99})
    [total] = [e for e in book.queue() if e.question_id == "total" and e.document.endswith("a.pdf")]
    book.decide(total, "reject", None, "ann")
    [reviewed] = query(
        written,
        "SELECT answer, value_number, review FROM reviewed WHERE question_id = 'total' AND document LIKE '%a.pdf'",
    ).to_pylist()
    assert reviewed == {"answer": None, "value_number": None, "review": "rejected"}
    documents = {Path(row["document"]).name: row for row in query(written, "SELECT * FROM documents").to_pylist()}
    assert [documents["a.pdf"][column] for column in ("total", "total_value", "total_page", "total_review")] == [
        None,
        None,
        None,
        "rejected",
    ]
    assert documents["b.pdf"]["total_review"] is None  # b.pdf's total (unparsed) nobody reviewed
    assert main(["table", "--output", written, "--questions", "total", "--format", "csv"]) == 0
    rows = {Path(row["document"]).name: row for row in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert (rows["a.pdf"]["total"], rows["a.pdf"]["total_review"]) == ("", "rejected")


# Truths for a.pdf's answers ($42.50, yes, invoice, 2026-01-03, Acme Corp, the two line items) and what each
# scores, by hand: (question, truth, ANLS, exact after normalization, typed value the same). ANLS is
# 1 - edit distance / the longer length (lowercased), 0 under 0.5: "42.50 usd" is 5 edits from "$42.50"
# (9 characters: 0.44, so 0), "2026-01-04" 1 of 10 from "2026-01-03" (0.9), "acme corp." 1 of 10 (0.9).
TRUTHS = [
    ("total", "$42.50", 1.0, True, True),
    ("total", "42.50 USD", 0.0, False, True),  # the same money
    ("total", "42.50 EUR", 0.0, False, False),  # another currency
    ("issued", "January 3, 2026", 0.0, False, True),
    ("issued", "2026-01-04", 0.9, False, False),
    ("paid", "Yes", 1.0, True, True),
    ("paid", "no", 0.0, False, False),
    ("kind", "INVOICE", 1.0, True, True),
    ("kind", "receipt", 0.0, False, False),
    ("who", "Acme Corp.", 0.9, True, None),
    # ANLS* over records: one field 1 edit off ("Bolts"): ((1 + 1) / 2 + (1 + (1 - 1/5)) / 2) / 2 = 0.95.
    ("lines", json.dumps([LINES[0], {**LINES[1], "description": "Bolts"}]), 0.95, False, None),
]


def test_evaluate_reads_typed_values_and_records_from_a_csv_or_json_lines_truth(
    written: str, tmp_path: Path, capsys
) -> None:
    as_csv, as_json = tmp_path / "truth.csv", tmp_path / "truth.jsonl"
    rows = [{"document": "a.pdf", "page_number": 1, "question_id": qid, "answer": truth} for qid, truth, *_ in TRUTHS]
    with as_csv.open("w", newline="") as file:
        writer = csv.DictWriter(file, ["document", "page_number", "question_id", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    as_json.write_text(
        "\n".join(
            json.dumps({**row, "answer": json.loads(row["answer"]) if row["question_id"] == "lines" else row["answer"]})
            for row in rows
        )
    )
    evaluation = Evaluation(written)
    for path in (as_csv, as_json):
        scored = evaluation.from_file(path)
        assert [(s.question_id, s.anls, s.exact, s.typed_match) for s in scored] == [
            (qid, pytest.approx(anls), exact, typed) for qid, _, anls, exact, typed in TRUTHS
        ], path.name
        # correct: typed questions by their value, text by exact match, records by ANLS* >= 0.9
        assert [s.correct for s in scored] == [True, True, False, True, False, True, False, True, False, True, True]

    assert main(["evaluate", "--output", written, "--truth", str(as_csv), "--format", "table", "--target", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "question_id",
        "type",
        "answers",
        "anls",
        "exact_match",
        "typed_match",
        "accuracy",
        "threshold",
        "sent_to_review",
    ]
    shown = {line.split()[0]: line.split()[1:] for line in lines[2:] if not line.startswith("(")}
    # total: ANLS 1/3, exact 1/3, typed 2/3, accuracy 2/3; right at 0.95 (2 of 3): 0.95 reaches 0.5, none sent.
    assert shown["total"] == ["money", "3", "0.3333", "0.3333", "0.6667", "0.6667", "0.95", "0"]
    assert shown["issued"][:6] == ["date", "2", "0.45", "0", "0.5", "0.5"]
    assert shown["lines"][:5] == ["list", "1", "0.95", "0", "1"]
    assert lines[-1] == "(6 rows)"


def test_the_threshold_for_a_target_on_a_constructed_set() -> None:
    def answer(confidence: float, correct: bool) -> Scored:
        return Scored("d", 1, "q", "a", "a", confidence, float(correct), correct, None, correct)

    # by confidence: right, right, wrong, right, wrong: the answers at 0.6 and above are 3 of 4 right.
    answers = [answer(0.9, True), answer(0.8, True), answer(0.7, False), answer(0.6, True), answer(0.5, False)]
    assert threshold_for(answers, 0.75) == (0.6, pytest.approx(0.2))
    assert threshold_for(answers, 1.0) == (0.8, pytest.approx(0.6))
    assert threshold_for([answer(0.9, False)], 0.9) == (None, 1.0)
    assert threshold_for([], 0.9) == (None, None)


def test_summarize_buckets(output: str) -> None:
    evaluation = Evaluation(output)
    scored = [Scored("d", 1, "who", "a", "a", 0.05 + n / 10, 1.0, True, None, n % 2 == 0) for n in range(10)]
    [figure] = summarize(evaluation, scored, 0.5)
    assert [bucket["answers"] for bucket in figure.buckets] == [1] * 10
    assert [bucket["accuracy"] for bucket in figure.buckets] == [1.0, 0.0] * 5
