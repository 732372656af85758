"""Object storage end to end against a real S3 endpoint on loopback (moto server), with faults injected."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from jobs.cli import main
from jobs.devtools.samples import invoice_pdf, write_samples
from pipeline.config import StorageConfig
from pipeline.records import Status
from pipeline.tables import committed_runs, read_answers, read_current
from tests.conftest import AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
from tests.s3_server import FaultProxy

QUICK_JOB = {
    "input": "unused",
    "output": "unused",
    "questions": [{"id": "total", "text": "Total?", "pages": "first", "max_new_tokens": 2}],
    "render": {"image_splitting": False},
    "actors": {"batch_size": 16},
}


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint)


def _fill_bucket(endpoint: str, bucket: str, pdfs: int, others: int) -> tuple[set[str], set[str]]:
    """PDFs across prefixes (every third key without a .pdf suffix), non-PDF objects, and keys outside the input."""
    client = _client(endpoint)
    client.create_bucket(Bucket=bucket)
    pdf_keys, other_keys = set(), set()
    for number in range(pdfs):
        key = f"in/{2025 + number % 2}/{number % 7:02d}/doc-{number:04d}{'' if number % 3 == 0 else '.pdf'}"
        client.put_object(Bucket=bucket, Key=key, Body=invoice_pdf(number, 1, (300, 400)))
        pdf_keys.add(f"s3://{bucket}/{key}")
    for number in range(others):
        key = f"in/misc/note-{number:03d}.{'pdf' if number % 2 else 'json'}"
        client.put_object(Bucket=bucket, Key=key, Body=b'{"not": "a pdf"}')
        other_keys.add(f"s3://{bucket}/{key}")
    client.put_object(Bucket=bucket, Key="elsewhere/outside.pdf", Body=invoice_pdf(1, 1, (300, 400)))
    return pdf_keys, other_keys


def _job(tmp_path: Path, endpoint: str, **extra) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**QUICK_JOB, "storage": {"endpoint_url": endpoint}, **extra}))
    return path


def _assert_no_credentials(text: str | bytes) -> None:
    for secret in (AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID):
        assert (secret.encode() if isinstance(text, bytes) else secret) not in text


@pytest.mark.slow
def test_bucket_of_pdfs_is_processed_exactly_once(
    ray_session, tiny_model: Path, s3_endpoint: str, tmp_path: Path, capsys
) -> None:
    pdf_keys, other_keys = _fill_bucket(s3_endpoint, "bulk", pdfs=300, others=40)
    job = _job(tmp_path, s3_endpoint)
    code = main(
        [
            "run",
            "--config",
            str(job),
            "--input",
            "s3://bulk/in/",
            "--output",
            "s3://bulk/out/",
            "--model",
            str(tiny_model),
            "--run-id",
            "bulk-1",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "  output: s3://bulk/out/ (tables answers, current, items, runs)" in captured.out
    storage = StorageConfig(endpoint_url=s3_endpoint)
    rows = read_answers("s3://bulk/out/", storage=storage).to_pylist()
    documents = [row["document"] for row in rows]
    assert len(documents) == len(set(documents)) == len(pdf_keys) + len(other_keys)
    assert {row["document"] for row in rows if row["status"] == Status.OK} == pdf_keys
    assert {row["document"] for row in rows if row["status"] == Status.UNSUPPORTED_FORMAT} == other_keys
    client = _client(s3_endpoint)
    for row in rows[:: len(rows) // 15]:
        key = row["document"].removeprefix("s3://bulk/")
        assert row["etag"] == client.head_object(Bucket="bulk", Key=key)["ETag"].strip('"')
        assert row["file_size"] == client.head_object(Bucket="bulk", Key=key)["ContentLength"]
    [record] = committed_runs("s3://bulk/out/", storage)
    assert record["counts"]["documents"]["ok"] == len(pdf_keys) and record["output"] == "s3://bulk/out/"
    keys = [item["Key"] for item in client.list_objects_v2(Bucket="bulk", Prefix="out/")["Contents"]]
    for table in ("answers", "current", "runs"):  # Delta tables: a log and Parquet files
        assert any(key.startswith(f"out/{table}/_delta_log/") for key in keys)
        assert any(key.startswith(f"out/{table}/") and key.endswith(".parquet") for key in keys)
    _assert_no_credentials(captured.out + captured.err)
    # The workers' logs too (the session's Ray does not forward them to the driver).
    logs = Path(ray_session._private.worker.global_worker.node.get_logs_dir_path())
    worker_logs = [path for path in logs.rglob("*") if path.is_file() and path.suffix in (".out", ".err", ".log")]
    assert any(path.name.startswith("worker-") for path in worker_logs)
    for path in worker_logs:
        _assert_no_credentials(path.read_bytes())
    for key in keys:
        _assert_no_credentials(client.get_object(Bucket="bulk", Key=key)["Body"].read())


@pytest.mark.slow
def test_throttling_and_server_errors_are_retried_with_nothing_lost_or_duplicated(
    ray_session, tiny_model: Path, s3_endpoint: str, tmp_path: Path
) -> None:
    pdf_keys, other_keys = _fill_bucket(s3_endpoint, "flaky", pdfs=60, others=4)
    proxy = FaultProxy(s3_endpoint, every=5)  # every 5th request: 503 SlowDown or 500 InternalError
    try:
        job = _job(tmp_path, proxy.url, commit_rows=7)
        code = main(
            [
                "run",
                "--config",
                str(job),
                "--input",
                "s3://flaky/in/",
                "--output",
                "s3://flaky/out/",
                "--model",
                str(tiny_model),
            ]
        )
        assert code == 0
    finally:
        proxy.stop()
    assert sum(proxy.injected.values()) >= 20
    assert {fault.split()[0] for fault in proxy.injected} >= {"GET", "PUT"}  # reads, listing and writes all hit
    rows = read_answers("s3://flaky/out/", storage=StorageConfig(endpoint_url=s3_endpoint)).to_pylist()
    documents = [row["document"] for row in rows]
    assert sorted(documents) == sorted(pdf_keys | other_keys)
    assert {row["document"] for row in rows if row["status"] == Status.OK} == pdf_keys


@pytest.mark.slow
def test_a_run_killed_after_its_first_commit_resumes_with_nothing_lost_or_duplicated(
    ray_session, tiny_model: Path, s3_endpoint: str, tmp_path: Path
) -> None:
    pdf_keys, _ = _fill_bucket(s3_endpoint, "crash", pdfs=40, others=0)
    storage = StorageConfig(endpoint_url=s3_endpoint)
    job = _job(tmp_path, s3_endpoint, commit_rows=2)
    args = ["--config", str(job), "--input", "s3://crash/in/", "--output", "s3://crash/out/", "--model"]
    args += [str(tiny_model)]
    assert main(["run", *args, "--run-id", "good"]) == 0
    good = read_answers("s3://crash/out/", "good", storage)

    environment = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    # Another question: a new config fingerprint, so every document is processed again; a render task per page
    # (small documents would share one), so that its parts commit while it goes on.
    killed = ["run", *args, "--run-id", "killed", "--set", "questions.0.text=Total due?"]
    killed += ["--set", "render.range_pages=1"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *killed], env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        if read_answers("s3://crash/out/", "killed", storage).num_rows:  # its first part is committed
            break
        time.sleep(0.2)
    assert driver.poll() is None, "the run finished before it could be killed"
    driver.send_signal(signal.SIGKILL)
    output, _ = driver.communicate()
    _assert_no_credentials(output)
    assert [record["run_id"] for record in committed_runs("s3://crash/out/", storage)] == ["good"]
    before = read_answers("s3://crash/out/", "killed", storage)
    assert 0 < before.num_rows < len(pdf_keys)

    assert main(killed) == 0  # the same run id again: it resumes
    after = read_answers("s3://crash/out/", "killed", storage).to_pylist()
    documents = [row["document"] for row in after]
    print(f"S3 kill-and-rerun: rows before {before.num_rows}, after {len(after)}")
    assert sorted(documents) == sorted(pdf_keys) and all(row["status"] == Status.OK for row in after)
    current = read_current("s3://crash/out/", storage).to_pylist()
    assert sorted(row["document"] for row in current) == sorted(pdf_keys)
    assert {row["run_id"] for row in current} == {"killed"}
    assert read_answers("s3://crash/out/", "good", storage).equals(good)  # history kept
    assert [(r["run_id"], r["attempt"]) for r in committed_runs("s3://crash/out/", storage)] == [
        ("good", 1),
        ("killed", 2),
    ]


@pytest.mark.parametrize(
    ("endpoint_kind", "input_uri", "message"),
    [
        (
            "real",
            "s3://no-such-bucket/in/",
            "bucket 'no-such-bucket' (s3://no-such-bucket/in/): the bucket does not exist",
        ),
        ("deny", "s3://bulk/in/", "access denied"),
        ("closed", "s3://bulk/in/", "cannot reach the S3 endpoint"),
    ],
)
@pytest.mark.parametrize("command", ["run", "runs", "query"])
def test_storage_problems_fail_fast_with_a_clear_message(
    ray_session,
    tiny_model: Path,
    s3_endpoint: str,
    tmp_path: Path,
    capsys,
    refused_address: str,
    endpoint_kind: str,
    input_uri: str,
    message: str,
    command: str,
) -> None:
    """`docqa run` over a bad input, and the query commands over a bad output, stop at the first request with
    the same message."""
    proxy = FaultProxy(s3_endpoint, deny_all=True) if endpoint_kind == "deny" else None
    endpoint = {"real": s3_endpoint, "deny": proxy.url if proxy else "", "closed": refused_address}[endpoint_kind]
    job = _job(tmp_path, endpoint, storage={"endpoint_url": endpoint, "max_attempts": 2, "connect_timeout_s": 1})
    arguments = {
        "run": ["--input", input_uri, "--output", "s3://bulk/elsewhere/", "--model", str(tiny_model)],
        "runs": ["--output", input_uri],
        "query": ["SELECT count(*) FROM answers", "--output", input_uri],
    }[command]
    code = main([command, "--config", str(job), *arguments])
    err = capsys.readouterr().err
    if proxy:
        proxy.stop()
        assert proxy.requests == 1  # refused at the first request (the bucket check): nothing retried or started
    assert code == 1 and message in err and "Traceback" not in err
    _assert_no_credentials(err)


def test_a_store_that_ignores_conditional_writes_is_refused_before_any_work(
    tiny_model: Path, s3_endpoint: str, tmp_path: Path, capsys
) -> None:
    """A store that drops If-None-Match (here a proxy in front of the real endpoint) would let two writers
    overwrite each other's Delta commits: `docqa run` and `docqa optimize` refuse it and write nothing."""
    _client(s3_endpoint).create_bucket(Bucket="lax")
    write_samples(tmp_path / "in", count=1, with_bad_files=False)
    proxy = FaultProxy(s3_endpoint, every=10**9, drop_headers=frozenset({"if-none-match"}))
    try:
        job = _job(tmp_path, proxy.url)
        output = ["--output", "s3://lax/out/"]
        ran = main(["run", "--config", str(job), "--input", str(tmp_path / "in"), *output, "--model", str(tiny_model)])
        ran_err = capsys.readouterr().err
        optimized = main(["optimize", "--config", str(job), *output])
        optimized_err = capsys.readouterr().err
    finally:
        proxy.stop()
    for code, err in ((ran, ran_err), (optimized, optimized_err)):
        assert code == 1 and "Traceback" not in err, err
        assert "ignores conditional writes: a second PUT with If-None-Match: * of one key was accepted" in err, err
    assert _client(s3_endpoint).list_objects_v2(Bucket="lax").get("KeyCount") == 0  # no table, no probe left


@pytest.mark.slow
def test_listing_pages_globs_lists_and_versions(s3_endpoint: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.locations import first_time, iter_documents, iter_shard, listing_shards
    from pipeline.storage import read_object

    client = _client(s3_endpoint)
    client.create_bucket(Bucket="listing")
    keys = [f"deep/{n % 3}/k{n:05d}{'.pdf' if n % 2 else ''}" for n in range(2100)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket="listing", Key=key, Body=b"%PDF-1.4"), keys))
    storage = StorageConfig(endpoint_url=s3_endpoint)
    listed = [ref.document for ref in iter_documents("s3://listing/deep/", storage)]  # 3 pages of at most 1000 keys
    assert sorted(listed) == sorted(f"s3://listing/{key}" for key in keys)
    globbed = {ref.document for ref in iter_documents("s3://listing/deep/1/*.pdf", storage)}
    assert globbed == {f"s3://listing/{key}" for key in keys if key.startswith("deep/1/") and key.endswith(".pdf")}

    # In shards, as a run's listing tasks take them: the keys directly under the prefix, then one shard per
    # subprefix; a level of one prefix only (the bucket's root here) is stepped through.
    client.put_object(Bucket="listing", Key="deep/top.pdf", Body=b"%PDF-1.4")
    shards = listing_shards("s3://listing/", storage)
    assert [(shard.bucket, shard.location, shard.recursive) for shard in shards] == [
        ("listing", "deep/", False),
        *(("listing", f"deep/{n}/", True) for n in range(3)),
    ]
    sharded = [ref.document for shard in shards for ref in iter_shard(shard, storage, first_time())]
    assert sorted(sharded) == sorted(f"s3://listing/{key}" for key in [*keys, "deep/top.pdf"])
    [shard] = listing_shards("s3://listing/deep/1/*.pdf", storage)
    assert {ref.document for ref in iter_shard(shard, storage, first_time())} == globbed
    client.create_bucket(Bucket="flat")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: client.put_object(Bucket="flat", Key=f"k{n:04d}", Body=b""), range(1001)))
    [whole] = listing_shards("s3://flat/", storage, max_pages=1)  # its first level takes 2 requests
    assert whole.whole and len(list(iter_shard(whole, storage, first_time()))) == 1001

    client.put_object(
        Bucket="listing",
        Key="lists/tonight.txt",
        Body=b"# two documents\ns3://listing/deep/0/k00000\n\ns3://listing/deep/1/k00001.pdf\n",
    )
    assert [ref.document for ref in iter_documents("s3://listing/lists/tonight.txt", storage)] == [
        "s3://listing/deep/0/k00000",
        "s3://listing/deep/1/k00001.pdf",
    ]

    client.create_bucket(Bucket="versioned")
    client.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
    first = client.put_object(Bucket="versioned", Key="a.pdf", Body=b"%PDF-1.4 one")["VersionId"]
    second = client.put_object(Bucket="versioned", Key="a.pdf", Body=b"%PDF-1.4 two!")["VersionId"]
    read = read_object("s3://versioned/a.pdf", storage, max_bytes=1000)
    assert (read.data, read.size, read.version_id) == (b"%PDF-1.4 two!", 13, second) and first != second
    assert read.etag == client.head_object(Bucket="versioned", Key="a.pdf")["ETag"].strip('"')
    too_big = read_object("s3://versioned/a.pdf", storage, max_bytes=5)
    assert (too_big.data, too_big.size) == (b"", 13)
