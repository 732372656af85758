"""Shared fixtures: one Ray instance per session, the tiny Idefics2 built once, sample PDFs."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

from jobs.devtools.samples import write_samples
from jobs.devtools.tiny_models import build_tiny_idefics2

# No test may reach the Hugging Face Hub: the default checkpoint must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray's default, token authentication, for every Ray the tests start (ray.init and `ray start --head`) and
# every client they run; the token is this session's own, never the user's ~/.ray/auth_token.
RAY_AUTH_TOKEN_FILE = Path(tempfile.mkdtemp(prefix="docqa-ray-auth-")) / "auth_token"
RAY_AUTH_TOKEN_FILE.write_text(secrets.token_hex(32))
atexit.register(shutil.rmtree, RAY_AUTH_TOKEN_FILE.parent, ignore_errors=True)
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(RAY_AUTH_TOKEN_FILE))
os.environ.pop("RAY_AUTH_TOKEN", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Credentials for the loopback S3 server, set before Ray starts so its workers inherit them. Distinctive
# values, so tests can prove they never reach logs, errors or outputs.
AWS_ACCESS_KEY_ID = "AKIADOCQATESTKEY0001"
AWS_SECRET_ACCESS_KEY = "docqa-test-secret-do-not-log-9f3a7c"
os.environ.update(
    AWS_ACCESS_KEY_ID=AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY=AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION="us-east-1"
)
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_PROFILE", None)


SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "format-corpus"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_idefics2(tmp_path_factory.mktemp("models") / "tiny-idefics2")


@pytest.fixture(scope="session")
def records_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Idefics2 whose greedy answers under a JSON Schema write records: strings, nulls, lists
    closed and cut by their token cap (``tiny_model``'s, seed 0, are all ``[]`` and nulls)."""
    return build_tiny_idefics2(tmp_path_factory.mktemp("models") / "tiny-idefics2-records", seed=2)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def refused_address():
    """An http://127.0.0.1:PORT where every connection is refused: the port is bound and never listened on,
    and held for the test, so nothing else can take it (a fixed port such as 9 might be in use)."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 server (moto) on loopback; tests reach it over HTTP through boto3 and pyarrow."""
    from tests.s3_server import start_moto

    server, url = start_moto()
    yield url
    server.stop()


# What the sample folder's documents end as under the default backend: its bad files fail, the rest answer.
SAMPLE_FAILURES = {"empty.pdf": "empty", "not-a-pdf.pdf": "unsupported_format"}


def assert_sample_statuses(rows: list[dict], inputs: Path) -> None:
    """Every document of the sample folder ``inputs`` has rows, all with its expected status."""
    found: dict[str, set[str]] = {}
    for row in rows:
        found.setdefault(Path(row["document"]).name, set()).add(row["status"])
    assert found == {path.name: {SAMPLE_FAILURES.get(path.name, "ok")} for path in inputs.iterdir()}


@pytest.fixture(scope="session")
def sample_pdfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pdfs")
    write_samples(directory, count=4)
    return directory


def run_over_invoices(folder: Path, invoices: dict[str, tuple[int, int]], model: Path, questions: list[dict]) -> Path:
    """``docqa run`` (on the session's Ray, image splitting off) over generated invoices in ``folder/in``:
    file name → (invoice number, pages), letter size. Its output is ``folder/out``; returns ``folder``."""
    from jobs.cli import main
    from jobs.devtools.samples import invoice_pdf, write_job

    inputs = folder / "in"
    inputs.mkdir(exist_ok=True)
    for name, (number, pages) in invoices.items():
        (inputs / name).write_bytes(invoice_pdf(number, pages, (612, 792)))
    job = write_job(folder, inputs, model, questions, render={"image_splitting": False})
    assert main(["run", "--config", str(job)]) == 0
    return folder
