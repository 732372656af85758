"""End to end: `docqa run` over a folder of PDFs with the tiny Idefics2 on CPU; pages/s, and the share of
the stages' time in each Ray Data operator (from Ray Data's own statistics of the run).

    .venv/bin/python -m bench.end_to_end [--documents 40]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def operator_wall_times(stats: str) -> dict[str, float]:
    """Total remote wall time per operator, in seconds, from ``Dataset.stats()`` text."""
    times: dict[str, float] = {}
    operator = None
    for line in stats.splitlines():
        header = re.match(r"Operator \d+ (.+?): \d+ tasks? executed", line)
        if header:
            operator = header.group(1)
        wall = re.match(r"\* Remote wall time: .*?([\d.]+)(us|ms|s) total", line)
        if wall and operator:
            times[operator] = times.get(operator, 0.0) + float(wall.group(1)) * _UNITS[wall.group(2)]
            operator = None
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=40)
    args = parser.parse_args()

    import ray

    from jobs.devtools.samples import write_samples
    from jobs.run import run_job
    from pipeline.config_loading import load_config

    model = tiny_model()
    directory = Path(tempfile.mkdtemp(prefix="docqa-e2e-"))
    write_samples(directory / "pdfs", count=args.documents, with_bad_files=False)
    config = load_config(
        Path(__file__).resolve().parents[1] / "examples" / "invoice.yaml",
        {"input": str(directory / "pdfs"), "output": str(directory / "out"), "model.id": str(model)},
    )
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    summary = run_job(config, progress_interval_s=30)
    pages = sum(summary.counts["pages"].values())
    times = operator_wall_times(summary.stage_stats)
    total = sum(times.values()) or 1.0
    print(f"# bench.end_to_end  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  {os.cpu_count()} CPUs")
    print(f"docqa run, examples/invoice.yaml (4 questions), tiny Idefics2 on CPU, {args.documents} invoices")
    print(
        f"pages {pages}, answers {summary.counts['answers']}, wall {summary.wall_s:.1f} s, "
        f"{pages / summary.wall_s:.2f} pages/s"
    )
    for operator, seconds in times.items():
        print(f"  {operator:70s} {seconds:7.2f} s  {100 * seconds / total:5.1f}% of the stages' time")


if __name__ == "__main__":
    main()
