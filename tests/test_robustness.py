"""Hostile input: isolation (deadline, memory cap, crashes, no secrets, no network), limits, passwords,
active content, no escapes."""

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pymupdf
import pytest

from jobs.cli import main
from jobs.devtools.samples import invoice_pdf, write_job
from pipeline.config import LimitsConfig, RenderConfig
from pipeline.config_loading import load_config
from pipeline.images import ImageGeometry, unpack_images
from pipeline.planning import Planner, document_of_bytes
from pipeline.records import DocumentError, Page, Status
from pipeline.render_helper import SECCOMP_CLOSED
from pipeline.rendering import Renderer, document_pages
from pipeline.sandbox import RenderSandbox, SandboxedDocument
from pipeline.tables import committed_runs, read_answers
from tests.hostile import active_content_pdf, encrypted_pdf, huge_page_pdf, many_pages_pdf, slow_pdf

# No splitting at 896: the page the model gets is the page as rendered (what Idefics2 renders for 448 split).
GEOMETRY = ImageGeometry(896, 224, False, 1 / 255, (0.5,) * 3, (0.5,) * 3)
PASSWORD = "open-sesame-7731"


def _config(pages="first", **sections):
    return load_config(
        None, {"input": "in", "output": "out", "questions": [{"id": "q", "text": "Q?", "pages": pages}], **sections}
    )


def _rasterize(data: bytes, config) -> list[Page]:
    return document_pages(config, GEOMETRY, document_of_bytes("/x/doc.pdf", data))


def test_sandbox_deadline_memory_cap_and_crash_each_cost_one_document_only() -> None:
    sandbox = RenderSandbox(memory_mb=1024)
    sandbox.call("open", (slow_pdf(), "pymupdf", ()), time.monotonic() + 30)
    limits = Path(f"/proc/{sandbox.helper_pid}/limits").read_text()
    assert f"{1024 * 1024 * 1024}" in next(line for line in limits.splitlines() if "address space" in line)
    slow_helper = sandbox.process_id
    with pytest.raises(DocumentError) as caught:
        sandbox.call("render", (1, 896), time.monotonic() + 0.3)
    # The events, not a wall-clock bound: the status, and the helper that missed the deadline replaced.
    assert caught.value.status == Status.TIMEOUT and sandbox.process_id != slow_helper

    sandbox.call("open", (invoice_pdf(1, 1, (612, 792)), "pymupdf", ()), time.monotonic() + 30)
    with pytest.raises(DocumentError) as caught:  # a 12000 px page and its copies exceed the 1 GiB cap
        sandbox.call("render", (1, 12000), time.monotonic() + 60)
    assert caught.value.status == Status.MEMORY_LIMIT

    sandbox.call("open", (invoice_pdf(2, 1, (612, 792)), "pymupdf", ()), time.monotonic() + 30)
    os.kill(sandbox.helper_pid, signal.SIGKILL)
    with pytest.raises(DocumentError) as caught:
        sandbox.call("render", (1, 448), time.monotonic() + 30)
    assert caught.value.status == Status.RENDER_ERROR

    sandbox.call("open", (invoice_pdf(3, 1, (612, 792)), "pymupdf", ()), time.monotonic() + 30)  # replaced, works
    shape = sandbox.call("render", (1, 448), time.monotonic() + 30)
    assert shape[0] == 448  # the answer names the shape: the pixels are in the shared buffer
    assert sandbox.pixels[: shape[0] * shape[1] * 3].min() < 255  # an invoice page, not blank
    with pytest.raises(DocumentError, match="cannot open") as caught:
        sandbox.call("open", (b"%PDF-1.7 garbage", "pymupdf", ()), time.monotonic() + 30)
    assert caught.value.status == Status.CORRUPT

    # A helper that dies between documents (killed from outside, or its replacement never started) costs the
    # next document nothing: it is started again before that document is sent.
    died = sandbox.process_id
    os.kill(sandbox.helper_pid, signal.SIGKILL)
    sandbox._process.wait(timeout=30)
    assert sandbox.call("open", (invoice_pdf(4, 1, (612, 792)), "pymupdf", ()), time.monotonic() + 30) == (
        1,
        False,
        "pdf",
    )
    assert sandbox.process_id != died


def test_the_helpers_start_is_not_counted_in_the_documents_time_limit() -> None:
    """A document's time limit starts once a running helper is there: after the first start, and after
    the start of a replacement for a helper that died between documents."""
    limits = LimitsConfig(render_memory_mb=1024, document_timeout_s=30)
    first = SandboxedDocument(invoice_pdf(1, 1, (612, 792)), RenderConfig(), limits)
    assert first.deadline - 30 >= first.sandbox.started_at
    died = first.sandbox.process_id
    os.kill(first.sandbox.helper_pid, signal.SIGKILL)
    first.sandbox._process.wait(timeout=30)
    second = SandboxedDocument(invoice_pdf(2, 1, (612, 792)), RenderConfig(), limits)
    assert second.sandbox.process_id != died
    assert second.deadline - 30 >= second.sandbox.started_at


SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "docqa-test-secret-do-not-log-9f3a7c",
    "AWS_SESSION_TOKEN": "session-token-4f1c",
    "RAY_AUTH_TOKEN": "ray-token-7d2e",
    "DOCQA_SERVE_TOKEN": "serve-token-1a9b",
    "HTTPS_PROXY": "http://proxy.internal:3128",
    "no_proxy": "169.254.169.254",
}


def test_the_render_helper_holds_no_secrets_and_reaches_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    sandbox = RenderSandbox(memory_mb=1024)
    try:
        # Read from outside: the helper's environment and kernel status, as the kernel holds them.
        helper = sandbox.helper_pid
        environ = Path(f"/proc/{helper}/environ").read_bytes()
        assert not [value for value in SECRETS.values() if value.encode() in environ]
        names = {entry.split(b"=", 1)[0].decode() for entry in environ.split(b"\0") if entry}
        assert not names & set(SECRETS) and not [name for name in names if name.startswith(("AWS_", "RAY_"))]
        status = Path(f"/proc/{helper}/status").read_text()
        assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status  # no-new-privileges, a seccomp filter
        # Its working directory is its own tmpfs, in its own mount namespace: nothing of this machine's.
        assert os.readlink(f"/proc/{helper}/cwd") == "/tmp"
        mounts = Path(f"/proc/{helper}/mountinfo").read_text().splitlines()
        assert any(line.split()[4] == "/tmp" and " - tmpfs " in line for line in mounts)
        assert os.readlink(f"/proc/{helper}/ns/mnt") != os.readlink("/proc/self/ns/mnt")

        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(1)
            address = listener.getsockname()
            with socket.create_connection(address, timeout=2):  # the listener takes this process's connection
                listener.accept()[0].close()
            report = sandbox.call("isolation", (address,), time.monotonic() + 30)
            with pytest.raises(TimeoutError):  # and nothing from the helper
                listener.accept()
        assert report["connect"] == "refused by the sandbox (Permission denied)"
        assert report["network"] == sandbox.isolation["network"] == SECCOMP_CLOSED
        assert report["working_directory"] == "/tmp"

        # It still renders, through the shared pixel buffer.
        sandbox.call("open", (invoice_pdf(1, 1, (612, 792)), "pymupdf", ()), time.monotonic() + 30)
        shape = sandbox.call("render", (1, 448), time.monotonic() + 30)
        assert shape[2] == 3
    finally:
        os.killpg(sandbox.process_id, signal.SIGKILL)


@pytest.mark.parametrize("backend", ["pymupdf", "pdf2image"])
def test_generated_hostile_documents(backend: str) -> None:
    render = {"backend": backend}
    truncated = invoice_pdf(5, 2, (612, 792))
    cases = {
        "truncated": (truncated[: len(truncated) * 2 // 3], {}),
        "huge page": (huge_page_pdf(), {}),
        "5000 pages": (many_pages_pdf(), {}),
        "not a pdf": (b"MZ\x90\x00 this is an executable", {}),
        "empty": (b"", {}),
        "password": (encrypted_pdf(PASSWORD), {}),
        "password known": (encrypted_pdf(PASSWORD), {"render": {**render, "passwords": ["wrong", PASSWORD]}}),
        "slow": (slow_pdf(), {"limits": {"document_timeout_s": 0.5}}),
        "sliver": (invoice_pdf(6, 1, (4000, 50)), {}),
    }
    results = {}
    for name, (data, sections) in cases.items():
        rows = _rasterize(data, _config(**{"render": render, **sections}))
        results[name] = [row.status for row in rows], rows
    assert results["truncated"][0] == [Status.OK] if backend == "pymupdf" else [Status.CORRUPT]
    if backend == "pymupdf":
        assert results["truncated"][1][0].repaired is True
    [huge] = results["huge page"][1]
    [image] = unpack_images(huge.sub_images, huge.sub_image_shapes)  # no splitting: the page as rendered
    assert huge.status == Status.OK and max(image.shape[:2]) <= GEOMETRY.render_longest_edge
    assert results["5000 pages"][0] == [Status.TOO_MANY_PAGES]
    assert results["not a pdf"][0] == [Status.UNSUPPORTED_FORMAT] and results["empty"][0] == [Status.EMPTY]
    assert results["password"][0] == [Status.ENCRYPTED]
    assert results["password known"][0] == [Status.OK]
    assert results["slow"][0] == [Status.TIMEOUT]  # it would be ok had the render run to its end
    assert results["sliver"][0] == [Status.PAGE_TOO_LARGE] and "max_aspect_ratio" in results["sliver"][1][0].error

    # Planned from the page count alone: a document over the page limit is refused with no page to render,
    # and a first-page question over 5000 pages renders page 1 only (no wall-clock bound needed).
    document = document_of_bytes("/x/doc.pdf", many_pages_pdf())
    [refused] = Planner(_config(render=render)).plan(document)
    assert (refused.status, refused.num_pages, refused.pages) == (Status.TOO_MANY_PAGES, 5000, [])
    config = _config(limits={"max_pages_per_document": 10000}, render=render)
    [unit] = Planner(config).plan(document)
    assert (unit.status, unit.num_pages, unit.pages[0], unit.pages[-1]) == (Status.OK, 5000, 1, 1)
    [first_page] = Renderer(config, GEOMETRY).render(unit)
    assert (first_page.status, first_page.page_number) == (Status.OK, 1)


def test_hostile_folder_through_the_pipeline(ray_session, tiny_model: Path, tmp_path: Path, capsys) -> None:
    """Active content (JavaScript, links, an attachment: answered like any page; that nothing of it runs or
    reaches the network is the render helper's test), a password, a slow render; the password never leaks."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    files = {
        "active.pdf": active_content_pdf("https://example.invalid/exfiltrate"),
        "locked.pdf": encrypted_pdf(PASSWORD),
        "slow.pdf": slow_pdf(),
        "good.pdf": invoice_pdf(8, 2, (612, 792)),
    }
    for name, data in files.items():
        (inputs / name).write_bytes(data)
    job = write_job(
        tmp_path,
        inputs,
        tiny_model,
        [{"id": "q", "text": "What?", "pages": "all", "max_new_tokens": 3}],
        render={"passwords": [PASSWORD], "image_splitting": False},
        limits={"document_timeout_s": 1.0},  # slow.pdf renders for ~4 s here, the others in ~0.02 s
    )
    assert main(["run", "--config", str(job)]) == 0
    captured = capsys.readouterr()
    rows = read_answers(str(tmp_path / "out")).to_pylist()
    status = {Path(row["document"]).name: row["status"] for row in rows}
    assert status == {
        "active.pdf": "ok",
        "locked.pdf": "ok",
        "slow.pdf": "timeout",
        "good.pdf": "ok",
    }
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file())
    allowed = ("in/", "job.yaml", "out/answers/", "out/current/", "out/runs/", "out/items/", "out/reviews/")
    allowed += ("out/_docqa/digest_salt",)
    assert all(path.startswith(allowed) for path in written)
    [record] = committed_runs(str(tmp_path / "out"))
    assert record["config"]["render"]["passwords"] == ["**********"]
    for blob in [
        captured.out + captured.err,
        *(path.read_bytes().decode("latin-1") for path in (tmp_path / "out").rglob("*") if path.is_file()),
    ]:
        assert PASSWORD not in blob


# Files of the shared corpus whose defect is known, and the status each must get.
KNOWN_CORPUS_STATUSES = {
    "pdfCabinetOfHorrors/encryption_openpassword.pdf": Status.ENCRYPTED,
    "pdfCabinetOfHorrors/encryption_nocopy.pdf": Status.OK,  # owner password only: opens and renders
    "pdf-handbuilt-test-corpus/T02-02_001_no-page-tree-node.pdf": Status.EMPTY,
    "pdf-handbuilt-test-corpus/T02-01_001_document-catalog-No-document-catalog.pdf": Status.EMPTY,
    "pdf-handbuilt-test-corpus/T01_006_header-invalid-syntax-no-pdf.pdf": Status.UNSUPPORTED_FORMAT,
    "pdf-handbuilt-test-corpus/T02-02_002_page-tree-kids-links-recursive.pdf": Status.RENDER_ERROR,
    "pdf-handbuilt-test-corpus/T02-02_007_page-tree-wrong-count.pdf": Status.CORRUPT,
    "pdf-handbuilt-test-corpus/minimal_test.pdf": Status.CORRUPT,
    "pdfCabinetOfHorrors/javascript.pdf": Status.OK,
}


def test_shared_corpus_runs_through_with_every_file_exactly_once(ray_session, tiny_model: Path, tmp_path: Path) -> None:
    from tests.conftest import SHARED_CORPUS

    if not SHARED_CORPUS.is_dir():
        missing = f"the shared corpus is not at {SHARED_CORPUS}"
        if os.environ.get("DOCQA_REQUIRE_SHARED_CORPUS"):  # set by .ci/run: CI must not pass without it
            pytest.fail(f"{missing} (DOCQA_REQUIRE_SHARED_CORPUS is set)")
        pytest.skip(missing)
    files = sorted(str(path.resolve()) for path in SHARED_CORPUS.rglob("*") if path.is_file())
    job = write_job(
        tmp_path,
        SHARED_CORPUS,
        tiny_model,
        [{"id": "q", "text": "What is this?", "pages": "first", "max_new_tokens": 2}],
        render={"image_splitting": False},
        actors={"batch_size": 8},
    )
    assert main(["run", "--config", str(job)]) == 0
    rows = read_answers(str(tmp_path / "out")).to_pylist()
    assert sorted(row["document"] for row in rows) == files  # one question on one page: one row per file
    status = {str(Path(row["document"]).relative_to(SHARED_CORPUS.resolve())): row["status"] for row in rows}
    assert {name: status[name] for name in KNOWN_CORPUS_STATUSES} == KNOWN_CORPUS_STATUSES
    assert set(status.values()) <= {s.value for s in Status} and all(r["error"] for r in rows if r["status"] != "ok")
    assert sum(value == Status.OK for value in status.values()) >= 140


def test_killing_the_model_actor_mid_run_loses_and_duplicates_nothing(
    ray_session, tiny_model: Path, tmp_path: Path
) -> None:
    import psutil

    from jobs.devtools.samples import write_samples

    inputs = tmp_path / "in"
    write_samples(inputs, count=14, with_bad_files=False)
    questions = [
        {"id": "a", "text": "Total?", "max_new_tokens": 12},
        {"id": "b", "text": "Date?", "max_new_tokens": 12},
    ]
    job = write_job(tmp_path, inputs, tiny_model, questions, actors={"batch_size": 2}, commit_rows=2)
    first_part = tmp_path / "out" / "answers" / "_delta_log" / f"{1:020d}.json"  # version 0 creates the table
    killed: list[int] = []

    def kill_the_actor_once_it_has_answered() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not first_part.exists():  # the event: answers were committed
            time.sleep(0.05)
        for process in psutil.process_iter(["cmdline"]):
            if any("AnswerPages" in part for part in process.info["cmdline"] or []):
                try:
                    process.kill()
                    killed.append(process.pid)
                except psutil.NoSuchProcess:
                    pass

    killer = threading.Thread(target=kill_the_actor_once_it_has_answered)
    killer.start()
    assert main(["run", "--config", str(job)]) == 0
    killer.join()
    assert killed, "the actor was never killed: the run ended first"
    rows = read_answers(str(tmp_path / "out"))
    keys = list(zip(*rows.select(["document", "page_number", "question_id"]).to_pydict().values(), strict=True))
    expected = {
        (str(path.resolve()), page, q)
        for path in inputs.iterdir()
        for page in range(1, 1 + pymupdf.open(path).page_count)
        for q in ("a", "b")
    }
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert set(rows.column("status").to_pylist()) == {"ok"}
