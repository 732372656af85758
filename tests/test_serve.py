"""The online endpoint over real HTTP on loopback: Ray Serve, the tiny Idefics2, the batch pipeline's stages."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml

from bench import free_port
from jobs.cli import main
from jobs.devtools.samples import invoice_pdf, multipage_tiff, page_images, write_job
from jobs.run import run_job
from jobs.serve import TOKEN_ENV
from pipeline.config import ConfigError
from pipeline.config_loading import load_config
from pipeline.records import OUTPUT_SCHEMA

TOKEN = "serve-test-token-7c1e"
CONFIG_TOKEN = "serve-config-token-loses-to-the-environment"
QUESTIONS = [
    {"id": "number", "text": "What is the invoice number?", "pages": "first", "max_new_tokens": 6},
    {"id": "total", "text": "What is the total?", "pages": "all", "max_new_tokens": 8},
]
INVOICES = ["invoice-001.pdf", "invoice-002.pdf", "invoice-003.pdf", "invoice-004.pdf"]


@pytest.fixture(scope="module")
def batch_answers(ray_session, tiny_model, sample_pdfs, tmp_path_factory) -> dict[tuple, str]:
    """The batch pipeline's answers for the same pages and questions, keyed by (file name, page, question)."""
    from pipeline.tables import read_answers

    directory = tmp_path_factory.mktemp("serve-batch")
    config = load_config(write_job(directory, sample_pdfs, tiny_model, QUESTIONS))
    run_job(config)
    rows = read_answers(config.output).to_pylist()
    return {
        (Path(row["document"]).name, row["page_number"], row["question_id"]): row["answer"]
        for row in rows
        if row["status"] == "ok"
    }


def _questions_only(path: Path, tiny_model: Path, **serve_settings) -> Path:
    """A config for `docqa serve` alone: model and questions, no input or output."""
    config = {"model": {"id": str(tiny_model)}, "questions": QUESTIONS, "serve": serve_settings}
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_port_in_use_is_a_clear_error(ray_session, tiny_model, tmp_path, capsys):
    """First in this module: it starts (and shuts down) Serve, which must not run the endpoint yet. Its config
    names no input or output, which `docqa serve` does not use."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        job = _questions_only(tmp_path / "serve.yaml", tiny_model, port=port, token=TOKEN)
        assert main(["serve", "--config", str(job), "--set", "actors.num_cpus_per_actor=0.5"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"docqa: 127.0.0.1:{port} is in use: Ray Serve's HTTP proxy could not bind it; stop what listens there "
        "or choose another port (--port, or serve.port)"
    )


@pytest.fixture(scope="module")
def tight_server(ray_session, tiny_model, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """`docqa serve` in a process of its own (as Kubernetes or systemd runs it) with tight limits: one
    request at a time, one waiting, 5 s a request, 2 MB an upload. Its output goes to files (a pipe left
    unread would fill and stall it)."""
    directory = tmp_path_factory.mktemp("tight-serve")
    port = free_port()
    limits = {
        "request_timeout_s": 5,
        "max_requests_in_flight": 1,
        "max_requests_queued": 1,
        "max_upload_bytes": 2_000_000,
    }
    job = _questions_only(directory / "serve.yaml", tiny_model, port=port, **limits)
    environment = {**os.environ, TOKEN_ENV: TOKEN, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "jobs.cli", "serve", "--config", str(job)]
    command += ["--set", "actors.num_cpus_per_actor=0.5", "--set", "render.image_splitting=false"]
    out, err = directory / "stdout", directory / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        server = subprocess.Popen(command, env=environment, stdout=stdout, stderr=stderr, text=True)
    deadline = time.monotonic() + 180
    while "docqa serving" not in out.read_text():  # started and ready
        assert server.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
        time.sleep(0.2)
    yield SimpleNamespace(process=server, url=f"http://127.0.0.1:{port}", stderr=err)
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def test_one_client_cannot_stall_or_confuse_the_endpoint(tight_server: SimpleNamespace) -> None:
    """A chunked upload over the limit is refused while it is read; a request past its deadline gets 504
    and frees the render helper and the turn; a third request beside one answered and one waiting gets
    503 with Retry-After; a thousand questions are refused before any is validated."""
    from tests.hostile import slow_pdf

    url, headers = f"{tight_server.url}/v1/answers", {"Authorization": f"Bearer {TOKEN}"}

    def upload(data: bytes, name: str = "doc.pdf", timeout: float = 60) -> requests.Response:
        return requests.post(url, files={"file": (name, data)}, headers=headers, timeout=timeout)

    def chunks():
        for _ in range(100):
            yield b"x" * 65536  # 6.5 MB, no Content-Length: chunked

    chunked = requests.post(url, data=chunks(), headers={**headers, "Content-Type": "application/pdf"}, timeout=60)
    assert chunked.status_code == 413 and "over serve.max_upload_bytes=2000000" in chunked.json()["error"]

    started = time.monotonic()
    slow = slow_pdf(20_000_000)  # renders for longer than a request may take
    late = upload(slow, "slow.pdf")
    assert late.status_code == 504 and "serve.request_timeout_s=5" in late.json()["error"]
    assert time.monotonic() - started < 30
    assert upload(invoice_pdf(1, 1, (612, 792))).status_code == 200  # the helper and the turn are free again

    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(upload, slow, "a.pdf")
        time.sleep(1.0)
        second = pool.submit(upload, slow, "b.pdf")
        time.sleep(1.0)
        third = pool.submit(upload, invoice_pdf(2, 1, (612, 792)), "c.pdf")
        busy = third.result()
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "2", busy.text
        assert first.result().status_code == 504 and second.result().status_code == 504

    many = yaml.safe_dump([{"id": f"q{n}", "text": "?"} for n in range(1000)])
    refused = requests.post(
        url,
        files={"file": ("d.pdf", invoice_pdf(3, 1, (612, 792))), "questions": many},
        headers=headers,
        timeout=60,
    )
    assert refused.status_code == 422 and "1000 questions, over serve.max_questions=16" in refused.json()["error"]


def test_sigterm_shuts_the_endpoint_down_without_native_stack_frames(tight_server: SimpleNamespace) -> None:
    """SIGTERM (what Kubernetes and systemd send) is taken as Ctrl-C: Serve shuts down, exit 0, and Ray's
    native handler does not print stack frames."""
    assert requests.get(f"{tight_server.url}/healthz", timeout=30).status_code == 200
    tight_server.process.send_signal(signal.SIGTERM)
    tight_server.process.wait(timeout=120)
    err = tight_server.stderr.read_text()
    assert tight_server.process.returncode == 0, err[-3000:]
    assert "SIGTERM received" not in err and "absl::" not in err and "Traceback" not in err, err[-3000:]


@pytest.fixture(scope="module")
def endpoint(batch_answers, tiny_model, tmp_path_factory):
    from ray import serve

    from jobs.serve import start_server

    directory = tmp_path_factory.mktemp("serve")
    serve_settings = {
        "token": CONFIG_TOKEN,  # DOCQA_SERVE_TOKEN (TOKEN) wins over it
        "batch_wait_timeout_s": 0.2,
        "max_upload_bytes": 200_000,
        "max_pages": 3,
        "max_questions": 3,
        "question_sets": {"numbers": [QUESTIONS[0]]},
    }
    os.environ[TOKEN_ENV] = TOKEN
    try:
        for attempt in range(3):  # a free port can be taken before Serve binds it: then another
            config = load_config(
                write_job(
                    directory,
                    directory,
                    tiny_model,
                    QUESTIONS,
                    serve={**serve_settings, "port": free_port()},
                    actors={"batch_size": 8, "num_cpus_per_actor": 0.5},
                )
            )
            try:
                url = start_server(config)
                break
            except ConfigError as error:
                if "is in use" not in str(error) or attempt == 2:
                    raise
    finally:
        del os.environ[TOKEN_ENV]
    yield url
    serve.shutdown()


def _post(url: str, path: Path | None = None, data: bytes | None = None, token: str | None = TOKEN, **fields):
    files = {"file": (path.name if path else "upload.pdf", data if data is not None else path.read_bytes())}
    for name, value in fields.items():
        files[name] = (f"{name}.yaml", value) if name == "questions" else (None, value)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{url}/v1/answers", files=files, headers=headers, timeout=120)


def _check_against_batch(body: dict, batch_answers: dict[tuple, str]) -> None:
    assert body["answers"], body
    for row in body["answers"]:
        assert set(row) == set(OUTPUT_SCHEMA.names)
        assert row["status"] == "ok" and row["run_id"] == body["request_id"]
        assert row["answer"] == batch_answers[(body["document"], row["page_number"], row["question_id"])]


def test_one_request(endpoint, sample_pdfs, batch_answers):
    response = _post(endpoint, sample_pdfs / "invoice-002.pdf")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["document"], body["num_pages"]) == ("invoice-002.pdf", 3)
    # page 1: both questions; pages 2 and 3: total only
    assert sorted((row["page_number"], row["question_id"]) for row in body["answers"]) == [
        (1, "number"),
        (1, "total"),
        (2, "total"),
        (3, "total"),
    ]
    _check_against_batch(body, batch_answers)
    assert requests.get(f"{endpoint}/healthz", timeout=30).json() == {"status": "ok"}  # no model path
    assert requests.get(f"{endpoint}/openapi.json", timeout=30).status_code == 401  # the schema: with the token
    assert requests.get(f"{endpoint}/docs", timeout=30).status_code == 404
    paths = requests.get(f"{endpoint}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    paths = paths.json()["paths"]
    assert {"/v1/answers", "/healthz"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/answers"]["post"]["requestBody"]["content"]


def test_concurrent_one_page_requests_share_model_calls(endpoint, sample_pdfs, batch_answers):
    """Eight uploads of a one-page document at once: one page each, so only pages of different requests
    can fill a model call."""
    from ray import serve

    model = serve.get_deployment_handle("AnswerModel", app_name="docqa")
    model.reset_counts.remote().result()
    assert model.call_counts.remote().result() == {"pages_per_call": {}, "calls_mixing_requests": 0}
    one_page = sample_pdfs / "invoice-003.pdf"
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _post(endpoint, one_page), range(8)))
    assert [response.status_code for response in responses] == [200] * 8
    assert {response.json()["num_pages"] for response in responses} == {1}
    for response in responses:
        _check_against_batch(response.json(), batch_answers)
    counts = model.call_counts.remote().result()
    assert sum(pages * calls for pages, calls in counts["pages_per_call"].items()) == 8  # exactly these pages
    assert counts["calls_mixing_requests"] >= 1, counts  # pages of different requests shared a model call


def test_questions_from_the_request_or_a_named_set(endpoint, sample_pdfs):
    asked = yaml.safe_dump([{"id": "who", "text": "Who issued it?", "max_new_tokens": 4}])
    body = _post(endpoint, sample_pdfs / "invoice-001.pdf", questions=asked).json()
    assert sorted((row["page_number"], row["question_id"]) for row in body["answers"]) == [(1, "who"), (2, "who")]
    assert all(row["question"] == "Who issued it?" and row["generated_tokens"] >= 1 for row in body["answers"])
    body = _post(endpoint, sample_pdfs / "invoice-001.pdf", question_set="numbers").json()
    assert [row["question_id"] for row in body["answers"]] == ["number"]
    unknown = _post(endpoint, sample_pdfs / "invoice-001.pdf", question_set="nope")
    assert unknown.status_code == 422 and "no question set 'nope'" in unknown.json()["error"]
    invalid = _post(endpoint, sample_pdfs / "invoice-001.pdf", questions="- id: x\n  text: '{nope}'\n")
    assert invalid.status_code == 422 and "unknown template variable" in invalid.json()["error"]
    typed = [
        {"id": "kind", "text": "Kind?", "type": "choice", "choices": ["invoice", "receipt"]},
        {"id": "text", "text": "Transcribe.", "source": "auto"},
        {
            "id": "vendor",
            "text": "Who issued it?",
            "type": "object",
            "fields": [{"name": "paid", "type": "boolean"}, {"name": "kind", "type": "choice", "choices": ["a", "b"]}],
            "pages": "first",
            "max_new_tokens": 32,
        },
    ]
    body = _post(endpoint, sample_pdfs / "invoice-001.pdf", questions=yaml.safe_dump(typed)).json()
    [vendor] = [row for row in body["answers"] if row["question_id"] == "vendor"]
    assert vendor["value_status"] == "parsed", (vendor["answer"], vendor["error"])
    written = json.loads(vendor["answer"])  # a JSON object of its schema, its fields as items
    assert list(written) == ["paid", "kind"] and written["paid"] in ("yes", "no") and written["kind"] in ("a", "b")
    assert [(entry["record"], entry["field"], entry["answer"]) for entry in vendor["items"]] == [
        (0, "paid", written["paid"]),
        (0, "kind", written["kind"]),
    ]
    kinds = [row for row in body["answers"] if row["question_id"] == "kind"]
    texts = [row for row in body["answers"] if row["question_id"] == "text"]
    assert len(kinds) == len(texts) == 2
    assert all(row["answer"] in ("invoice", "receipt") and row["value_status"] == "parsed" for row in kinds)
    for row in texts:  # born-digital pages: their own text, and where it is
        assert (row["answer_source"], row["evidence"], row["value_status"]) == ("text_layer", "text_layer", None)
        assert row["answer"].startswith("ACME Supplies Ltd.") and set(row["evidence_bbox"]) == {"x0", "y0", "x1", "y1"}
    # A scanned page as a TIFF: answered, its text read by OCR.
    [scan] = page_images(invoice_pdf(8, 1, (612, 792)), 200)
    scanned = _post(endpoint, data=multipage_tiff([(scan, "group4")]), questions=yaml.safe_dump(typed)).json()
    [text] = [row for row in scanned["answers"] if row["question_id"] == "text"]
    assert (text["source_format"], text["answer_source"], text["status"]) == ("tiff", "ocr", "ok")
    assert "ACME" in text["answer"]
    many = yaml.safe_dump([{"id": f"q{i}", "text": "Total?"} for i in range(4)])
    too_many = _post(endpoint, sample_pdfs / "invoice-001.pdf", questions=many)
    assert too_many.status_code == 422 and "over serve.max_questions=3" in too_many.json()["error"]


def test_refusals_say_why(endpoint, sample_pdfs):
    pdf = sample_pdfs / "invoice-001.pdf"
    for token in (None, "wrong-token", CONFIG_TOKEN):
        response = _post(endpoint, pdf, token=token)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in response.json()["error"]
    oversize = _post(endpoint, data=b"%PDF-1.7\n" + b"0" * 300_000)
    assert oversize.status_code == 413
    assert set(oversize.json()) == {"status", "error"} and oversize.json()["status"] == "file_too_large"
    assert "over serve.max_upload_bytes=200000" in oversize.json()["error"]
    four_pages = _post(endpoint, data=invoice_pdf(7, pages=4, page_size=(595, 842)))
    assert four_pages.status_code == 413 and four_pages.json()["status"] == "too_many_pages"
    assert "4 pages, over" in four_pages.json()["error"] and "serve.max_pages=3" in four_pages.json()["error"]
    corrupt = _post(endpoint, data=b"%PDF-1.7\n" + bytes(range(256)) * 40)
    assert corrupt.status_code == 422 and corrupt.json()["status"] == "corrupt"
    assert "cannot open it" in corrupt.json()["error"]
    not_pdf = _post(endpoint, sample_pdfs / "not-a-pdf.pdf")
    assert not_pdf.status_code == 422 and not_pdf.json()["status"] == "unsupported_format"
    no_file = requests.post(
        f"{endpoint}/v1/answers", data={"x": "1"}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    assert no_file.status_code == 422 and "field named 'file'" in no_file.json()["error"]


def test_refusals_state_the_upload_size_and_the_bad_question(endpoint):
    """The upload's own size, not what was read of it; a bad template is the request's, not the job config's."""
    oversize = _post(endpoint, data=b"%PDF-1.7\n" + b"0" * 200_400)  # over 200000, within the form allowance
    assert oversize.status_code == 413
    assert oversize.json()["error"] == "upload is 200409 bytes, over serve.max_upload_bytes=200000"
    invalid = _post(endpoint, data=b"%PDF-1.7\n", questions="- id: x\n  text: '{nope}'\n")
    assert invalid.status_code == 422
    error = invalid.json()["error"]
    assert error.startswith("invalid questions in the request:\n  questions.0.text: unknown template variable")
    assert "job config" not in error


def test_the_endpoint_refuses_to_start_without_a_token(tiny_model, tmp_path, capsys):
    assert TOKEN_ENV not in os.environ
    job = write_job(tmp_path, tmp_path, tiny_model, QUESTIONS, serve={"port": free_port()})
    assert main(["serve", "--config", str(job)]) == 2
    assert "the endpoint needs a bearer token: set DOCQA_SERVE_TOKEN or serve.token" in capsys.readouterr().err


# Each load request asks for the text layer of every page (read from its own document, so its answer is
# known: the document's invoice number and the page's "Page p of n") and the model about the first page.
LOAD_QUESTIONS = yaml.safe_dump(
    [
        {"id": "text", "text": "Transcribe.", "source": "auto"},
        {"id": "number", "text": "What is the invoice number?", "pages": "first", "max_new_tokens": 4},
    ]
)


def _own_answers(response: requests.Response, name: str, data: bytes, number: int, pages: int) -> str:
    """``"own answers"`` when ``response`` answers this request's document and nothing else (its name,
    page count and hash; each page's text its own invoice number and page line); else what is wrong."""
    import hashlib

    if response.status_code == 503:
        return "busy"
    body = response.json()
    if response.status_code != 200:
        return f"refused: {body}"
    digest = hashlib.sha256(data).hexdigest()
    texts = {row["page_number"]: row["answer"] or "" for row in body["answers"] if row["question_id"] == "text"}
    wrong = [
        f"{body['document']}, {body['num_pages']} pages" * (body["document"] != name or body["num_pages"] != pages),
        *(f"{row['question_id']} {row['status']}" for row in body["answers"] if row["status"] != "ok"),
        *(f"sha256 {row['sha256']}" for row in body["answers"] if row["sha256"] != digest),
        *(
            f"page {page}: {texts.get(page, '')[:80]!r}"
            for page in range(1, pages + 1)
            if f"INV-{number:04d}" not in texts.get(page, "") or f"Page {page} of {pages}" not in texts.get(page, "")
        ),
        f"pages asked {sorted(texts)}" * (sorted(texts) != list(range(1, pages + 1))),
    ]
    wrong = [problem for problem in wrong if problem]
    return f"mixed: {wrong}" if wrong else "own answers"


def _replicas_rss() -> int:
    import psutil

    return sum(
        process.memory_info().rss
        for process in psutil.process_iter(["cmdline"])
        if any("ServeReplica:docqa" in part for part in process.info["cmdline"] or [])
    )


@pytest.mark.slow
def test_a_bounded_load_with_slow_and_cancelled_clients_mixes_no_answers(endpoint):
    """First the issue's reproduction: five times, a slow-rendering PDF its client gives up on after 1 s,
    then a one-page and a three-page invoice (the endpoint's max_pages). Then two hundred uploads from
    sixteen clients, each of its own invoice (its own number, one or three pages), among them clients that
    give up after 0.2 s, clients that give up on a slow-rendering PDF after 1 s and clients that send
    their body slowly. Every answer that comes back is its own request's (its name, pages, hash, and each
    page's text with its own invoice number and page line), and the replicas' memory stays flat."""
    from collections import Counter

    from tests.hostile import slow_pdf

    headers = {"Authorization": f"Bearer {TOKEN}"}
    answers_url = f"{endpoint}/v1/answers"
    slow = slow_pdf(3_000_000)  # seconds to render, within the endpoint's 200,000 bytes

    def post(name: str, data: bytes, timeout: float) -> requests.Response:
        files = {"file": (name, data), "questions": ("questions.yaml", LOAD_QUESTIONS)}
        return requests.post(answers_url, files=files, headers=headers, timeout=timeout)

    started_at = _replicas_rss()
    for round_ in range(5):
        with pytest.raises(requests.Timeout):
            post(f"slow-{round_}.pdf", slow, 1.0)
        for number, pages in ((round_, 1), (round_ + 10, 3)):
            data = invoice_pdf(number, pages, (612, 792))
            outcome = _own_answers(post(f"after-{number}.pdf", data, 300), f"after-{number}.pdf", data, number, pages)
            assert outcome == "own answers", (round_, outcome)

    documents = {
        f"load-{n:03d}.pdf": (100 + n, 1 + 2 * (n % 2), invoice_pdf(100 + n, 1 + 2 * (n % 2), (612, 792)))
        for n in range(200)
    }

    def slowly(data: bytes):
        for start in range(0, len(data), 4096):
            time.sleep(0.002)
            yield data[start : start + 4096]

    def client(index: int, name: str, number: int, pages: int, data: bytes) -> str:
        if index % 10 == 3:  # gives up
            try:
                post(name, data, 0.2)
            except requests.Timeout:
                return "gave up"
            return "answered anyway"
        if index % 10 == 5:  # gives up on a slow-rendering PDF, as in the reproduction
            try:
                post(name, slow, 1.0)
            except requests.Timeout:
                return "gave up"
            return "answered anyway"
        if index % 10 == 7:  # a slow sender: a multipart body trickled in
            boundary = "docqa-load-boundary"
            body = b"".join(
                [
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                    "Content-Type: application/pdf\r\n\r\n".encode(),
                    data,
                    f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="questions"; '
                    'filename="questions.yaml"\r\n\r\n'.encode(),
                    LOAD_QUESTIONS.encode(),
                    f"\r\n--{boundary}--\r\n".encode(),
                ]
            )
            content_type = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
            response = requests.post(answers_url, data=slowly(body), headers={**headers, **content_type}, timeout=300)
            return _own_answers(response, name, data, number, pages)
        return _own_answers(post(name, data, 300), name, data, number, pages)

    before = _replicas_rss()
    with ThreadPoolExecutor(16) as pool:
        futures = {
            name: pool.submit(client, index, name, number, pages, data)
            for index, (name, (number, pages, data)) in enumerate(documents.items())
        }
        outcomes = {name: future.result() for name, future in futures.items()}  # an exception fails the test
    after = _replicas_rss()
    accepted = ("own answers", "busy", "gave up", "answered anyway")
    mib = 1024 * 1024
    print("outcomes:", dict(Counter(outcomes.values())))
    print(
        f"replicas' RSS: {started_at / mib:.0f} MiB at the start, {before / mib:.0f} MiB before the load, "
        f"{after / mib:.0f} MiB after it ({(after - before) / mib:+.0f} MiB)"
    )
    assert not [outcome for outcome in outcomes.values() if outcome not in accepted], {
        name: outcome for name, outcome in outcomes.items() if outcome not in accepted
    }
    assert sum(outcome == "own answers" for outcome in outcomes.values()) >= 150, outcomes
    assert before > 0 and after > 0, "no Serve replica found to measure"
    assert after - before < 300 * mib, (before, after)
