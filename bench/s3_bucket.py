"""Listing and processing a bucket of small PDFs on a loopback S3 server (moto), against the same files on
local disk in the same run.

    .venv/bin/python -m bench.s3_bucket --documents 1000

Uses the tiny offline Idefics2 (built under .cache/ if missing), one short question per document and no
image splitting, so the figure is dominated by storage, listing, rendering and Ray overheads, not the model.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from bench import tiny_model

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _config(input_uri: str, output_uri: str, endpoint: str, model: Path):
    from pipeline.config_loading import load_config

    return load_config(
        None,
        {
            "input": input_uri,
            "output": output_uri,
            "model": {"id": str(model)},
            "questions": [{"id": "total", "text": "Total?", "pages": "first", "max_new_tokens": 2}],
            "render": {"image_splitting": False},
            "actors": {"batch_size": 32},
            "storage": {"endpoint_url": endpoint},
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=1000)
    args = parser.parse_args()

    import boto3
    import ray

    from jobs.devtools.samples import invoice_pdf
    from jobs.run import run_job
    from pipeline.config import StorageConfig
    from pipeline.locations import iter_documents
    from tests.s3_server import start_moto

    model = tiny_model()
    server, endpoint = start_moto()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    pdfs = {f"in/{n % 10}/doc-{n:05d}.pdf": invoice_pdf(n, 1, (300, 400)) for n in range(args.documents)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: client.put_object(Bucket="bench", Key=item[0], Body=item[1]), pdfs.items()))
    local = Path(tempfile.mkdtemp(prefix="docqa-bench-"))
    for key, data in pdfs.items():
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(data)

    started = time.perf_counter()
    listed = sum(1 for _ in iter_documents("s3://bench/in/", StorageConfig(endpoint_url=endpoint)))
    listing_s = time.perf_counter() - started
    assert listed == args.documents

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    timings = {}
    for name, input_uri, output_uri in [
        ("s3", "s3://bench/in/", "s3://bench/out/"),
        ("local", str(local / "in"), str(local / "out")),
    ]:
        started = time.perf_counter()
        summary = run_job(_config(input_uri, output_uri, endpoint, model), progress_interval_s=30)
        timings[name] = time.perf_counter() - started
        assert summary.counts["documents"] == {"ok": args.documents}, summary.counts
    server.stop()

    n = args.documents
    print(f"# bench.s3_bucket  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  {os.cpu_count()} CPUs")
    print(f"documents: {n} one-page PDFs, tiny Idefics2 on CPU, 1 question, no splitting")
    print(f"S3 listing alone:        {listing_s:7.2f} s  {n / listing_s:9.1f} documents/s")
    print(f"S3 bucket end to end:    {timings['s3']:7.2f} s  {n / timings['s3']:9.1f} documents/s")
    print(f"local folder end to end: {timings['local']:7.2f} s  {n / timings['local']:9.1f} documents/s")
    print(f"ratio S3 / local throughput: {timings['local'] / timings['s3']:.2f}")


if __name__ == "__main__":
    main()
