"""Inputs taken as written and secrets that never leak: S3 keys with any character, local names in any
encoding, links out of the input left alone unless asked for, poppler without a password on its command
line, and the digests of settings salted per output."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest

from jobs.cli import main
from jobs.devtools.samples import invoice_pdf, write_job
from jobs.incremental import runs_with_changed_settings
from pipeline.config import LimitsConfig, RenderConfig, StorageConfig
from pipeline.config_loading import load_config
from pipeline.helper_protocol import MAX_TEXT_CHARS
from pipeline.locations import first_time, iter_documents
from pipeline.sandbox import SandboxedDocument
from pipeline.storage import local_path, read_object, split_s3
from pipeline.tables import OutputTables, committed_runs, read_answers
from tests.hostile import encrypted_pdf, raw_pdf

PASSWORD = "the-password"
AWKWARD_KEYS = ["inv#1.pdf", "what?.pdf", "with space.pdf", "Rechnung-ä€漢.pdf", "/leading-slash.pdf", "a//b.pdf"]


def test_s3_keys_are_read_exactly_as_written(s3_endpoint: str) -> None:
    assert split_s3("s3://b/inv#1.pdf?x=1") == ("b", "inv#1.pdf?x=1")
    assert split_s3("s3://b//leading") == ("b", "/leading")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="awkward")
    for number, key in enumerate(AWKWARD_KEYS):
        client.put_object(Bucket="awkward", Key=f"in/{key}", Body=f"document {number}".encode())
    storage = StorageConfig(endpoint_url=s3_endpoint)
    listed = {ref.document for ref in iter_documents("s3://awkward/in/", storage)}
    assert listed == {f"s3://awkward/in/{key}" for key in AWKWARD_KEYS}
    for number, key in enumerate(AWKWARD_KEYS):
        read = read_object(f"s3://awkward/in/{key}", storage, 1000)
        assert read.data == f"document {number}".encode(), key


@pytest.fixture(scope="module")
def two_outputs(ray_session, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Two runs of one job (a password set, a question the model answers, one the text layer does) over an
    input holding a name that is not UTF-8, a link to / and a link to a folder outside: the first as set
    (links not followed) to ``out``, the second, the link to / removed, with ``input_follow_links=true`` to
    ``followed``. The folder outside holds a page whose text layer is past the helper's caps."""
    directory = tmp_path_factory.mktemp("inputs")
    inputs, outside = directory / "in", directory / "outside"
    inputs.mkdir()
    outside.mkdir()
    latin1 = os.fsencode(inputs) + b"/Rechnung-M\xfcller.pdf"  # ü in Latin-1: not UTF-8
    with open(latin1, "wb") as handle:
        handle.write(invoice_pdf(1, 1, (612, 792)))
    (inputs / "plain.pdf").write_bytes(invoice_pdf(2, 1, (612, 792)))
    (outside / "far.pdf").write_bytes(invoice_pdf(3, 1, (612, 792)))
    (outside / "crowded.pdf").write_bytes(crowded_pdf())
    (inputs / "root").symlink_to("/")
    (inputs / "far").symlink_to(outside)
    questions = [
        {"id": "q", "text": "Total?", "max_new_tokens": 2},
        {"id": "text", "text": "Transcribe.", "source": "auto"},
    ]
    job = write_job(directory, inputs, tiny_model, questions, render={"passwords": [PASSWORD]})
    run = ["run", "--config", str(job), "--set", "render.image_splitting=false"]
    assert main(run) == 0
    (inputs / "root").unlink()
    assert main([*run, "--set", "input_follow_links=true", "--output", str(directory / "followed")]) == 0
    return SimpleNamespace(
        job=job, inputs=inputs, outside=outside, latin1=latin1, out=directory / "out", followed=directory / "followed"
    )


def crowded_pdf() -> bytes:
    """One page of 120,000 words, over a million characters of text: past the text layer's caps (100,000
    words, 1,000,000 characters, pipeline/helper_protocol.py)."""
    line = b"(" + b"abcdefghi " * 100 + b") Tj T*\n"
    return raw_pdf(
        2000,
        2000,
        b"BT /F1 1 Tf 1.2 TL 10 1990 Td\n" + line * 1200 + b"ET",
        b"/Resources << /Font << /F1 5 0 R >> >>",
        (b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",),
    )


def _statuses(output: Path) -> dict[str, set[str]]:
    statuses: dict[str, set[str]] = {}
    for row in read_answers(str(output)).to_pylist():
        statuses.setdefault(row["document"], set()).add(row["status"])
    return statuses


def test_a_local_name_in_another_encoding_is_listed_and_answered(two_outputs: SimpleNamespace) -> None:
    """A name that is not UTF-8 is listed (as a percent-encoded file:// URI) and answered; a link to / and
    one to a folder outside are not followed unless input_follow_links says so."""
    escaped = f"file://{two_outputs.inputs}/Rechnung-M%FCller.pdf"
    assert _statuses(two_outputs.out) == {escaped: {"ok"}, str(two_outputs.inputs / "plain.pdf"): {"ok"}}
    assert local_path(escaped) == Path(os.fsdecode(two_outputs.latin1))
    followed = _statuses(two_outputs.followed)
    assert followed[str(two_outputs.outside / "far.pdf")] == {"ok"}


def test_a_page_past_the_text_layer_caps_is_kept_and_cut_to_them(two_outputs: SimpleNamespace) -> None:
    """The helper keeps what fits (100,000 words: past them the worker would refuse its answer and the page
    would fail), and the page is answered: its text, the answer to a ``source: auto`` question, is the
    first 1,000,000 characters of the page's."""
    rows = [
        row
        for row in read_answers(str(two_outputs.followed)).to_pylist()
        if row["document"] == str(two_outputs.outside / "crowded.pdf")
    ]
    assert {(row["question_id"], row["status"]) for row in rows} == {("q", "ok"), ("text", "ok")}, rows
    [text] = [row["answer"] for row in rows if row["question_id"] == "text"]
    assert len(text) == MAX_TEXT_CHARS and text.startswith("abcdefghi")  # of 1,127,458 (MuPDF's sorted text)


def test_each_output_salts_the_digests_of_its_settings(two_outputs: SimpleNamespace) -> None:
    """The same password, two outputs: two random salts, each kept beside its tables, two digests in the
    run records (and no password); for the next run of an output the same password is unchanged (nothing
    taken again) and another is a change (its encrypted documents taken again)."""
    config = load_config(two_outputs.job)
    digests, salts = [], []
    for output in (two_outputs.out, two_outputs.followed):
        [record] = committed_runs(str(output))
        assert record["incremental"]["digest_salt"] == "output"
        digests.append(record["incremental"]["setting_digests"]["encrypted"])
        tables = OutputTables(str(output), StorageConfig())
        salt = tables.digest_salt()
        assert len(salt) == 16 and bytes.fromhex((output / "_docqa" / "digest_salt").read_text()) == salt
        salts.append(salt)
        assert runs_with_changed_settings(config, tables) == {}
        other = load_config(two_outputs.job, {"render.passwords": ["another-password"]})
        assert runs_with_changed_settings(other, tables) == {"encrypted": [record["run_id"]]}
    assert salts[0] != salts[1] and digests[0] != digests[1]
    assert PASSWORD not in json.dumps(digests)


def test_a_glob_follows_no_link_out_of_the_input(tmp_path: Path) -> None:
    """``in/**/*.pdf`` lists what is below ``in``: not what a link to a folder outside or to / leads to
    (unless input_follow_links: then the folder outside too), and a link back up ends."""
    inputs, outside = tmp_path / "in", tmp_path / "outside"
    (inputs / "a").mkdir(parents=True)
    outside.mkdir()
    for path in (inputs / "x.pdf", inputs / "a" / "y.pdf", outside / "far.pdf"):
        path.write_bytes(b"%PDF-1.7\n")
    (inputs / "a" / "far").symlink_to(outside)
    (inputs / "a" / "up").symlink_to(inputs)
    (inputs / "root").symlink_to("/")
    pattern, storage = f"{inputs}/**/*.pdf", StorageConfig()
    inside = {str(inputs / "x.pdf"), str(inputs / "a" / "y.pdf")}
    assert {ref.document for ref in iter_documents(pattern, storage)} == inside
    (inputs / "root").unlink()  # followed, it would list the whole filesystem
    followed = {ref.document for ref in iter_documents(pattern, storage, first_time())}
    assert followed == inside | {str(outside / "far.pdf")}


def test_poppler_never_sees_a_password_on_its_command_line() -> None:
    """The pdf2image backend has MuPDF decrypt the document in the helper first: no process of the machine
    ever has the password in its arguments (where `ps` shows them to everyone)."""
    password = "poppler-must-not-see-7c3a"
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for entry in Path("/proc").iterdir():
                try:
                    arguments = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if password.encode() in arguments:
                    seen.append(arguments.decode(errors="replace"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        render = RenderConfig(backend="pdf2image", passwords=[password])
        document = SandboxedDocument(encrypted_pdf(password), render, LimitsConfig())
        assert document.num_pages == 1 and document.render(1, 448).shape[2] == 3
        document.close()
    finally:
        stop.set()
        watcher.join()
    assert seen == []


@pytest.mark.slow
def test_the_digests_of_settings_are_salted_per_output(ray_session, tiny_model: Path, tmp_path: Path) -> None:
    """Two outputs, the same password: different digests in their run records, each output with its own
    random salt, and the next night with the same password takes nothing again."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "locked.pdf").write_bytes(encrypted_pdf("the-password"))
    digests = []
    for name in ("one", "two"):
        directory = tmp_path / name
        directory.mkdir()
        job = write_job(
            directory,
            inputs,
            tiny_model,
            [{"id": "q", "text": "Total?", "max_new_tokens": 2}],
            render={"image_splitting": False, "passwords": ["the-password"]},
        )
        assert main(["nightly", "--config", str(job), "--date", "2026-12-01"]) == 0
        [record] = committed_runs(str(directory / "out"))
        digests.append(record["incremental"]["setting_digests"]["encrypted"])
        assert record["incremental"]["digest_salt"] == "output"
        salt = OutputTables(str(directory / "out"), StorageConfig()).digest_salt()
        assert len(salt) == 16 and bytes.fromhex((directory / "out" / "_docqa" / "digest_salt").read_text()) == salt
        assert main(["nightly", "--config", str(job), "--date", "2026-12-02"]) == 0
        runs = committed_runs(str(directory / "out"))
        assert runs[-1]["incremental"]["unchanged_documents"] == 1  # the same password: not taken again
    assert digests[0] != digests[1]
    assert "the-password" not in json.dumps(digests)
