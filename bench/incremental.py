"""Incremental at scale: a nightly run over an output whose `current` table already holds a million (or ten
million) committed documents, with a listing in which a thousand documents are new or changed.

`prepare` (its own process, so that building the synthetic tables does not count against the driver):
``--documents`` empty files in folders of 1,000, and `answers`/`current` tables holding 3 committed rows for
each of them (3 questions, 1 page) under the benchmark config's fingerprint and each file's real version, as
nightly runs would leave them (committed 100,000 documents at a time, in listing order); then ``--changed``
of those files get new contents (a sample invoice: a new size and time, so a new version), spread evenly
over the folders, and ``--new`` new documents (sample invoices) go into a folder whose name sorts last, so
the listing must get through every unchanged file before it reaches them (the worst case).
`run` (a fresh process): `docqa nightly`'s run with the tiny model, taking every new and changed document
(``--max-documents`` to take fewer); reports the time from the start of the run to the start of rendering
and to its first result row, what was taken, and the peak memory of the driver, of the largest Ray worker
(a listing task deciding its batches) and of the whole process tree.

    python -m bench.incremental [--documents 1000000] [--new 500] [--changed 500] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import date
from pathlib import Path

QUESTIONS = [{"id": f"q{n}", "text": f"Question {n}?", "pages": "first", "max_new_tokens": 2} for n in (1, 2, 3)]
FOLDER_SIZE = 1000
CHUNK_DOCUMENTS = 100_000


def _config(workdir: Path, model: str | None = None, max_documents: int | None = None):
    from pipeline.config_loading import load_config

    return load_config(
        None,
        {
            "input": str(workdir / "docs"),
            "output": str(workdir / "out"),
            "model": {"id": model or str(workdir / "tiny")},
            "questions": QUESTIONS,
            "render": {"image_splitting": False},
            "budget": {"max_documents": max_documents},
        },
    )


def prepare(workdir: Path, documents: int, new: int, changed: int) -> None:
    from deltalake import write_deltalake

    from jobs.devtools.samples import invoice_pdf
    from jobs.devtools.tiny_models import build_tiny_idefics2
    from pipeline.fingerprints import config_fingerprint
    from pipeline.locations import iter_documents
    from pipeline.tables import ANSWERS, CURRENT, OutputTables

    build_tiny_idefics2(workdir / "tiny")
    config = _config(workdir)
    tables = OutputTables(config.output, config.storage)
    tables.create()
    started = time.perf_counter()
    # A chunk of folders at a time, each its own commit of `answers` and `current` (as nightly runs commit
    # documents in listing order): the files' statistics on `document` then cover few folders each.
    for first in range(0, documents, CHUNK_DOCUMENTS):
        numbers = range(first, min(first + CHUNK_DOCUMENTS, documents))
        folders = sorted({workdir / "docs" / f"f{number // FOLDER_SIZE:05d}" for number in numbers})
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        for number in numbers:
            (workdir / "docs" / f"f{number // FOLDER_SIZE:05d}" / f"doc-{number:08d}.pdf").touch()
        # The URIs and versions a listing reports
        refs = [ref for folder in folders for ref in iter_documents(str(folder), config.storage)]
        table = _committed_rows(refs, config_fingerprint(config))
        write_deltalake(tables.uri(ANSWERS), table, mode="append", partition_by=["run_date"])
        write_deltalake(tables.uri(CURRENT), table, mode="append")
        print(f"prepare: {numbers.stop} documents, {time.perf_counter() - started:.0f} s", flush=True)
    for number in range(0, documents, max(documents // changed, 1))[:changed] if changed else []:
        folder = workdir / "docs" / f"f{number // FOLDER_SIZE:05d}"
        (folder / f"doc-{number:08d}.pdf").write_bytes(invoice_pdf(number, 1, (300, 400)))
    for number in range(new):
        folder = workdir / "docs" / "zz-new"
        folder.mkdir(exist_ok=True)
        (folder / f"new-{number:05d}.pdf").write_bytes(invoice_pdf(number, 1, (300, 400)))


def _committed_rows(refs: list, fingerprint: str):
    """Three committed `ok` rows (one page, three questions) for each of ``refs``, as a run leaves them."""
    import pyarrow as pa

    from pipeline.tables import ANSWER_SCHEMA

    rows = len(refs) * len(QUESTIONS)
    columns = {
        "run_id": pa.array(["seed"] * rows),
        "document": pa.array([ref.document for ref in refs for _ in QUESTIONS]),
        "source_version": pa.array([ref.source_version for ref in refs for _ in QUESTIONS]),
        "config_fingerprint": pa.array([fingerprint] * rows),
        "document_rows": pa.array([len(QUESTIONS)] * rows, pa.int32()),
        "page_number": pa.array([1] * rows, pa.int32()),
        "num_pages": pa.array([1] * rows, pa.int32()),
        "question_id": pa.array([q["id"] for _ in refs for q in QUESTIONS]),
        "answer": pa.array(["synthetic"] * rows),
        "status": pa.array(["ok"] * rows),
    }
    table = pa.table(
        {
            field.name: columns.get(field.name, pa.nulls(rows, field.type))
            for field in ANSWER_SCHEMA
            if field.name != "run_date"
        }
    ).append_column("run_date", pa.array([date(2026, 1, 1)] * rows, pa.date32()))
    return table.cast(ANSWER_SCHEMA)


def run(workdir: Path, max_documents: int | None) -> None:
    import psutil
    import ray

    from jobs.run import run_job
    from pipeline.tables import read_answers

    peak = {"driver": 0, "tree": 0, "worker": 0}
    largest: list[str] = [""]
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.is_set():
            driver = me.memory_info().rss
            tree = driver
            for process in me.children(recursive=True):
                try:
                    rss = process.memory_info().rss
                    title = " ".join(process.cmdline())
                except psutil.Error:
                    continue
                tree += rss
                if title.startswith("ray::") and rss > peak["worker"]:  # a Ray worker, titled by its task
                    peak["worker"], largest[0] = rss, title.split()[0]
            peak["driver"] = max(peak["driver"], driver)
            peak["tree"] = max(peak["tree"], tree)
            time.sleep(0.05)

    run_id = f"bench-{int(time.time())}"
    config = _config(workdir, max_documents=max_documents).model_copy(update={"run_id": run_id})
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    summary = run_job(config, progress_interval_s=30)
    done.set()
    taken = read_answers(config.output, run_id, columns=["document"]).column("document").to_pylist()
    new = sum("/zz-new/" in uri for uri in set(taken))
    committed = summary.ledger["unchanged_documents"]
    print(f"# bench.incremental  nightly over {committed:,} unchanged committed documents + new and changed ones")
    print(f"time from run start to the start of rendering: {summary.first_render_s:.1f} s")
    print(f"time from run start to its first result row: {summary.first_row_s:.1f} s")
    print(f"run wall time: {summary.wall_s:.1f} s; skipped unchanged {committed}")
    print(f"documents taken {len(set(taken))}: {new} new, {len(set(taken)) - new} changed")
    statuses = read_answers(config.output, run_id, columns=["status"]).column("status").to_pylist()
    print(f"statuses: {dict(Counter(statuses))}")
    print(f"peak RSS: driver {peak['driver'] / 2**30:.2f} GiB; whole process tree {peak['tree'] / 2**30:.2f} GiB")
    print(f"largest Ray worker: {peak['worker'] / 2**30:.2f} GiB ({largest[0]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", nargs="?", choices=["prepare", "run"], help="one step only (default: both)")
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=500, help="new documents in the listing")
    parser.add_argument("--changed", type=int, default=500, help="committed documents given new contents")
    parser.add_argument("--max-documents", type=int, help="budget.max_documents of the run (default: no limit)")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.workdir, args.documents, args.new, args.changed)
        return
    if args.step == "run":
        run(args.workdir, args.max_documents)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="docqa-incremental-"))
    try:
        for step in ("prepare", "run"):
            if step == "prepare":
                extra = ["--documents", str(args.documents), "--new", str(args.new), "--changed", str(args.changed)]
            else:
                extra = ["--max-documents", str(args.max_documents)] if args.max_documents else []
            command = [sys.executable, "-m", "bench.incremental", step, "--workdir", str(workdir), *extra]
            subprocess.run(command, check=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
