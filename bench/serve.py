"""The online endpoint over HTTP on loopback: latency of one single-page request, and throughput of 8
concurrent requests against the same 8 sent one after another (the baseline) in the same run.

    .venv/bin/python -m bench.serve [--rounds 5]

Tiny offline Idefics2 on CPU, two 16-token questions per page, the checkpoint's image splitting (on).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from bench import free_port, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKEN = "bench-token"
QUESTIONS = [
    {"id": "number", "text": "What is the invoice number?", "max_new_tokens": 16},
    {"id": "total", "text": "What is the total amount due?", "max_new_tokens": 16},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="repetitions of each measurement")
    args = parser.parse_args()

    import ray
    import requests
    from ray import serve

    from jobs.devtools.samples import invoice_pdf
    from jobs.serve import start_server
    from pipeline.config_loading import load_config

    model = tiny_model()
    pdfs = [invoice_pdf(n, 1, (595, 842)) for n in range(8)]
    config = load_config(
        None,
        {
            "input": tempfile.gettempdir(),
            "output": tempfile.gettempdir(),
            "model": {"id": str(model)},
            "questions": QUESTIONS,
            "actors": {"batch_size": 8, "num_cpus_per_actor": 1},
            "serve": {"port": free_port(), "token": TOKEN, "batch_wait_timeout_s": 0.05},
        },
    )
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    url = start_server(config) + "/v1/answers"

    def ask(pdf: bytes) -> float:
        started = time.perf_counter()
        response = requests.post(
            url, files={"file": ("invoice.pdf", pdf)}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600
        )
        assert response.status_code == 200 and len(response.json()["answers"]) == len(QUESTIONS), response.text
        return time.perf_counter() - started

    for pdf in pdfs[:2]:  # warm-up: first model call, first render helper
        ask(pdf)
    latencies = [ask(pdfs[i % len(pdfs)]) for i in range(args.rounds * 2)]
    sequential, concurrent = [], []
    with ThreadPoolExecutor(len(pdfs)) as pool:
        for _ in range(args.rounds):
            started = time.perf_counter()
            for pdf in pdfs:
                ask(pdf)
            sequential.append(time.perf_counter() - started)
            started = time.perf_counter()
            list(pool.map(ask, pdfs))
            concurrent.append(time.perf_counter() - started)
    deployment = serve.get_deployment_handle("AnswerModel", app_name="docqa")
    batch_sizes = deployment.call_counts.remote().result()["pages_per_call"]
    serve.shutdown()

    n = len(pdfs)
    seq, conc = statistics.median(sequential), statistics.median(concurrent)
    print(f"# bench.serve  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  {os.cpu_count()} CPUs")
    print(f"tiny Idefics2 on CPU, one-page PDFs, {len(QUESTIONS)} questions x 16 tokens, splitting on")
    print(
        f"one request, one page: median {statistics.median(latencies) * 1000:.0f} ms "
        f"(min {min(latencies) * 1000:.0f}, max {max(latencies) * 1000:.0f}, n={len(latencies)})"
    )
    print(f"8 requests one after another: median {seq:.2f} s = {n / seq:.2f} requests/s (baseline)")
    print(f"8 concurrent requests:        median {conc:.2f} s = {n / conc:.2f} requests/s")
    print(f"ratio concurrent / sequential throughput: {seq / conc:.2f}")
    print(f"pages per model call (calls): {dict(sorted(batch_sizes.items()))}")


if __name__ == "__main__":
    main()
