"""Long documents: one generated A4 text report (800 pages by default), one question on every page, through
`docqa run` with the tiny Idefics2 given the real checkpoint's image sizes (longest edge 980, splitting on:
pages render at 1960 px, as for idefics2-8b). Cases, each its own `docqa run` (its own local Ray):

- ``whole``: the document in one task and one block (``render.range_pages`` and ``render.block_mb`` past
  the document's size): how the CPU stage handled a document before page ranges and blocks; the baseline;
- ``ranges``: the defaults (ranges of 64 pages, 32 MB blocks);
- ``short``: the same pages as documents of 20 pages: the rate a long document should keep;
- ``longest``: a document at the default ``limits.max_pages_per_document`` (2000 pages), defaults.

For each: wall time, pages/s, and the peak memory of the run's whole process tree (driver, Ray, workers,
render helpers), as proportional set size (shared memory such as Ray's object store counted once),
sampled every 0.2 s; and the machine's used memory above what it was before the run.

    .venv/bin/python -m bench.long_document [--pages 800] [--longest-pages 2000] [--cases whole,ranges,short,longest]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import tiny_model

REAL_GEOMETRY = {"longest_edge": 980, "shortest_edge": 378}
SHORT_DOCUMENT_PAGES = 20
QUESTION = {"id": "topic", "text": "What is this page about?", "max_new_tokens": 4}
GiB = 1024**3


def real_geometry_model(directory: Path) -> Path:
    """The tiny model with idefics2-8b's image processor sizes (the tiny vision tower takes any size)."""
    import shutil

    model = directory / "tiny-idefics2-980"
    shutil.copytree(tiny_model(), model)
    path = model / "processor_config.json"
    processor = json.loads(path.read_text())
    processor["image_processor"].update(size=REAL_GEOMETRY, do_image_splitting=True)
    path.write_text(json.dumps(processor, indent=2))
    return model


def write_inputs(directory: Path, pages: int, documents: int) -> Path:
    """``documents`` reports sharing ``pages`` pages between them."""
    from jobs.devtools.samples import report_pdf

    directory.mkdir(parents=True)
    for number in range(documents):
        (directory / f"report-{number:03d}.pdf").write_bytes(report_pdf(pages // documents))
    return directory


class TreeMemory:
    """Samples the peak PSS of a process and its descendants (and, at that peak, the largest of them), and
    the machine's used memory."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.machine_before = psutil.virtual_memory().used
        self.tree_peak = 0
        self.peak_processes: list[tuple[str, int]] = []  # (name, PSS) of the largest processes at the peak
        self.machine_peak = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        while not self.done.is_set():
            sizes = []
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for process in processes:
                try:
                    sizes.append((process.name(), process.memory_full_info().pss))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            total = sum(size for _, size in sizes)
            if total > self.tree_peak:
                self.tree_peak = total
                self.peak_processes = sorted(sizes, key=lambda item: -item[1])[:4]
            self.machine_peak = max(self.machine_peak, psutil.virtual_memory().used - self.machine_before)
            time.sleep(0.2)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def run_case(workdir: Path, name: str, inputs: Path, model: Path, render: dict, max_pages: int) -> dict:
    from jobs.devtools.samples import write_job
    from pipeline.tables import read_answers

    case = workdir / f"run-{name}"
    case.mkdir()
    job = write_job(
        case,
        inputs,
        model,
        [QUESTION],
        render=render,
        limits={"max_pages_per_document": max_pages, "document_timeout_s": 3600},
        actors={"batch_size": 4},
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    environment.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "run", "--config", str(job)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    memory = TreeMemory(process.pid)
    output, _ = process.communicate()
    wall_s = time.perf_counter() - started
    memory.stop()
    if process.returncode != 0:
        raise SystemExit(f"case {name} failed (exit {process.returncode}):\n{output[-3000:]}")
    statuses = read_answers(str(case / "out"), columns=["status"]).column("status").to_pylist()
    return {
        "case": name,
        "pages": len(statuses),
        "ok": statuses.count("ok"),
        "wall_s": round(wall_s, 1),
        "pages_per_s": round(len(statuses) / wall_s, 3),
        "tree_peak_gib": round(memory.tree_peak / GiB, 2),
        "largest_at_peak_gib": [[process, round(size / GiB, 2)] for process, size in memory.peak_processes],
        "machine_used_peak_gib": round(memory.machine_peak / GiB, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=800)
    parser.add_argument("--longest-pages", type=int, default=2000)
    parser.add_argument("--cases", default="whole,ranges,short,longest")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cases = args.cases.split(",")

    workdir = Path(tempfile.mkdtemp(prefix="docqa-long-"))
    model = real_geometry_model(workdir)
    one = write_inputs(workdir / "one", args.pages, 1) if {"whole", "ranges"} & set(cases) else None
    unbounded = {"range_pages": 1_000_000, "block_mb": 1_000_000}
    plans = {  # inputs written only for the cases asked for
        "whole": lambda: (one, unbounded, args.pages),
        "ranges": lambda: (one, {}, args.pages),
        "short": lambda: (
            write_inputs(workdir / "short", args.pages, args.pages // SHORT_DOCUMENT_PAGES),
            {},
            args.pages,
        ),
        "longest": lambda: (write_inputs(workdir / "longest", args.longest_pages, 1), {}, 2000),
    }
    results = []
    print(
        f"# bench.long_document  A4 text reports of {args.pages} pages (longest: {args.longest_pages}), "
        "1 question a page, pages at 1960 px",
        flush=True,
    )
    print(f"machine: {os.cpu_count()} CPUs; cases: {', '.join(cases)}", flush=True)
    for name in cases:
        inputs, render, max_pages = plans[name]()
        result = run_case(workdir, name, inputs, model, render, max_pages)
        results.append(result)
        print(json.dumps(result), flush=True)
    by_case = {result["case"]: result for result in results}
    if "whole" in by_case and "ranges" in by_case:
        whole, ranges = by_case["whole"], by_case["ranges"]
        print(
            f"ranges vs whole: peak memory {ranges['tree_peak_gib'] / whole['tree_peak_gib']:.2f}x, "
            f"pages/s {ranges['pages_per_s'] / whole['pages_per_s']:.2f}x"
        )
    if "short" in by_case and "ranges" in by_case:
        print(
            f"one long document vs the same pages in short ones: pages/s "
            f"{by_case['ranges']['pages_per_s'] / by_case['short']['pages_per_s']:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
