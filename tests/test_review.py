"""Review and evaluate: the review page in a real browser (Debian's headless Chromium through Selenium), its
JSON API over a real output, reviews as a Delta table that the documents view and `docqa table` read,
Label Studio both ways, and `docqa evaluate`'s figures against a truth file."""

from __future__ import annotations

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
from jobs.label_studio import export_tasks, import_reviews
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


def test_label_studio_export_and_import(output: str, tmp_path: Path) -> None:
    import base64

    import jsonschema

    book = ReviewBook(output, below=0.9)
    queue = book.queue()
    path = tmp_path / "tasks.json"
    assert export_tasks(book, path) == len(queue)
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
    assert import_reviews(ReviewBook(output), exported) == (2, 1)
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
