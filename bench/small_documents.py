"""Many small documents: docqa's pages/s against a plain PyMuPDF loop over the same files, same run.

N one-page born-digital invoices, one ``source: text_layer`` question (no model work: only docqa's own cost
per document is measured), against the loop a script would be: open the bytes with PyMuPDF,
``get_text(sort=True)`` and ``get_text("words")``, on one core. docqa's rate is per core of the Ray
instance (``--cpus``) so that the ratio compares like with like. Then, at the smallest N, the tiny model
path: one 2-token question, image splitting off. The driver's peak RSS is this process's (the driver runs
here). A first, unmeasured run warms Ray's worker pool up.

    .venv/bin/python -m bench.small_documents [--counts 300 1500 10000] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_invoices(directory: Path, count: int) -> Path:
    """``count`` one-page letter invoices (deterministic)."""
    from jobs.devtools.samples import PAGE_SIZES, invoice_pdf

    directory.mkdir(parents=True, exist_ok=True)
    for number in range(count):
        (directory / f"invoice-{number:05d}.pdf").write_bytes(invoice_pdf(number, 1, PAGE_SIZES["letter"]))
    return directory


def plain_loop(directory: Path) -> float:
    """Pages/s of the script a user would write, on one core."""
    import pymupdf

    files = sorted(directory.iterdir())
    started = time.perf_counter()
    pages = 0
    for path in files:
        with pymupdf.open(stream=path.read_bytes(), filetype="pdf") as document:
            for page in document:
                page.get_text(sort=True)
                page.get_text("words")
                pages += 1
    return pages / (time.perf_counter() - started)


def docqa_run(directory: Path, output: Path, question: dict, cpus: int) -> tuple[float, int]:
    """Pages/s per core of ``docqa run`` over ``directory``, and the pages it answered."""
    from jobs.run import run_job
    from pipeline.config_loading import load_config
    from pipeline.tables import read_answers

    config = load_config(
        None,
        {
            "input": str(directory),
            "output": str(output),
            "model": {"id": str(tiny_model())},
            "render": {"image_splitting": False},
            "questions": [question],
        },
    )
    started = time.perf_counter()
    summary = run_job(config, progress_interval_s=600)
    wall = time.perf_counter() - started
    answered = sum(row["status"] == "ok" for row in read_answers(config.output, summary.run_id).to_pylist())
    return answered / wall / cpus, answered


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[300, 1500, 10_000])
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="docqa-small-documents-"))
    text_layer = {"id": "text", "text": "Transcribe this page.", "source": "text_layer"}
    model = {"id": "total", "text": "Total?", "max_new_tokens": 2}
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        docqa_run(write_invoices(work / "warm-up", 20), work / "out-warm-up", text_layer, args.cpus)
        print(f"# bench.small_documents  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  {args.cpus} CPUs")
        print("| documents | plain loop, pages/s (1 core) | docqa text layer, pages/s per core | ratio | driver peak |")
        print("|---|---|---|---|---|")
        for count in args.counts:
            inputs = write_invoices(work / f"in-{count}", count)
            loop = plain_loop(inputs)
            rate, answered = docqa_run(inputs, work / f"out-{count}", text_layer, args.cpus)
            assert answered == count, (answered, count)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"| {count} | {loop:.1f} | {rate:.2f} | {rate / loop:.3f} | {peak:.0f} MiB |", flush=True)
        smallest = work / f"in-{min(args.counts)}"
        rate, answered = docqa_run(smallest, work / "out-model", model, args.cpus)
        print(f"tiny model path, {answered} one-page documents, one 2-token question: {rate:.2f} pages/s per core")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
