"""Inputs taken as written and secrets that never leak: S3 keys with any character, local names in any
encoding, links out of the input left alone unless asked for, poppler without a password on its command
line, and the digests of settings salted per output."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import boto3
import pytest

from jobs.cli import main
from jobs.devtools.samples import invoice_pdf, write_job
from pipeline.config import LimitsConfig, RenderConfig, StorageConfig
from pipeline.locations import iter_documents
from pipeline.sandbox import SandboxedDocument
from pipeline.storage import local_path, read_object, split_s3
from pipeline.tables import OutputTables, committed_runs, read_answers
from tests.hostile import encrypted_pdf

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


def test_a_local_name_in_another_encoding_and_links_out_of_the_input(
    ray_session, tiny_model: Path, tmp_path: Path
) -> None:
    """A name that is not UTF-8 is listed (as a percent-encoded file:// URI) and answered; a link to / and
    one to a folder outside are not followed unless input_follow_links says so."""
    inputs, outside = tmp_path / "in", tmp_path / "outside"
    inputs.mkdir()
    outside.mkdir()
    latin1 = os.fsencode(inputs) + b"/Rechnung-M\xfcller.pdf"  # ü in Latin-1: not UTF-8
    with open(latin1, "wb") as handle:
        handle.write(invoice_pdf(1, 1, (612, 792)))
    (inputs / "plain.pdf").write_bytes(invoice_pdf(2, 1, (612, 792)))
    (outside / "far.pdf").write_bytes(invoice_pdf(3, 1, (612, 792)))
    (inputs / "root").symlink_to("/")
    (inputs / "far").symlink_to(outside)
    job = write_job(tmp_path, inputs, tiny_model, [{"id": "q", "text": "Total?", "max_new_tokens": 2}])
    assert main(["run", "--config", str(job), "--set", "render.image_splitting=false"]) == 0
    rows = read_answers(str(tmp_path / "out")).to_pylist()
    documents = {row["document"]: row["status"] for row in rows}
    escaped = f"file://{inputs}/Rechnung-M%FCller.pdf"
    assert documents == {escaped: "ok", str(inputs / "plain.pdf"): "ok"}
    assert local_path(escaped) == Path(os.fsdecode(latin1))

    (inputs / "root").unlink()
    followed = ["run", "--config", str(job), "--set", "render.image_splitting=false"]
    assert main([*followed, "--set", "input_follow_links=true", "--output", str(tmp_path / "followed")]) == 0
    rows = read_answers(str(tmp_path / "followed")).to_pylist()
    assert str(outside / "far.pdf") in {row["document"] for row in rows}


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
