"""The driver's side of a run without a model: synthetic result batches of one-page documents through
``RunWriter`` and the run statistics, as the driver loop feeds them (jobs/run.py ``_stream``), for the
current tree and for a baseline commit, one after the other in one invocation.

Each document has ``--questions`` rows (one per question) and its rows are spread at random over a window
of ``--window`` documents, as results of many render tasks and actors interleave: so documents wait for
their last row, and the writer holds thousands of rows at a time. Reports the driver's peak RSS, the total
time, and the time per batch: the median over the batches that closed no part, the same over the first
and the last tenth of them (growth with the run), and the batches that closed a part (their Delta
commits), in all.

    python -m bench.writer_memory [--documents 100000] [--window 20000] [--baseline COMMIT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The measurement, run in a fresh interpreter against whichever tree is first on its path. It uses only what
# both trees have: RunWriter(output, run_id, date, storage, record, commit_rows, commit_interval_s), write,
# commit, and RunStats (``add`` on raw batches before; ``arrived`` on them and ``add`` on what write returns now),
# under either tree's module names (8c9d826: pipeline.rows, pipeline.sink and jobs.run; now pipeline.records,
# pipeline.writing and jobs.stats), chosen by the tree's files: an import that fails in the baseline tree
# would be found in the editable install's tree instead.
MEASURE = r"""
import json, os, random, resource, sys, time
from datetime import UTC, datetime
import pyarrow as pa
from pipeline.config import StorageConfig
if os.path.exists("pipeline/writing.py"):
    from jobs.stats import RunStats
    from pipeline.records import rows_to_table
    from pipeline.writing import RunWriter
else:
    from jobs.run import RunStats
    from pipeline.rows import rows_to_table
    from pipeline.sink import RunWriter

documents, questions, window, batch_rows = (int(value) for value in sys.argv[1:5])
output = sys.argv[5]
rng = random.Random(7)
order = []
for start in range(0, documents, window):
    block = [(d, q) for d in range(start, min(start + window, documents)) for q in range(questions)]
    rng.shuffle(block)
    order += block
base = {"run_id": "bench", "source_version": "v1", "document_rows": questions, "page_number": 1, "num_pages": 1,
        "status": "ok", "answer": "42", "confidence": 0.9}
batches = [
    rows_to_table(
        [{**base, "document": f"s3://in/{d:07d}.pdf", "question_id": f"q{q}"} for d, q in order[i:i + batch_rows]]
    )
    for i in range(0, len(order), batch_rows)
]
start = {"run_id": "bench", "started_at": datetime.now(UTC).isoformat(), "input": "synthetic"}
writer = RunWriter(output, "bench", "2026-12-06", StorageConfig(), start, 50_000, 10**6)
stats = RunStats()
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times, committed = [], []
for batch in batches:
    part = writer.part
    began = time.perf_counter()
    if hasattr(stats, "arrived"):
        stats.arrived(batch)
        stats.add(writer.write(batch))
    else:
        writer.write(batch)
        stats.add(batch)
    times.append(time.perf_counter() - began)
    committed.append(writer.part != part)
writer.commit({**start, "finished_at": datetime.now(UTC).isoformat(), "counts": stats.counts()})
counts = stats.counts()
print(json.dumps({
    "batches": len(times), "total_s": sum(times), "rss_before_mib": rss_before / 1024,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "times": times, "committed": committed, "documents_ok": counts["documents"].get("ok", 0),
    "rows": counts["rows"], "commits": writer.part, "writer": sys.modules[RunWriter.__module__].__file__,
}))
"""


def measure(tree: Path, documents: int, questions: int, window: int, batch_rows: int) -> dict:
    with tempfile.TemporaryDirectory() as output:
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, str(documents), str(questions), str(window), str(batch_rows), output],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        raise SystemExit(f"measurement in {tree} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result.pop("writer")).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the measurement in {tree} imported another tree's RunWriter")
    # Batches that closed a part include its two Delta commits: counted apart, they would hide the buffer's cost.
    plain = [t for t, committed in zip(result["times"], result.pop("committed"), strict=True) if not committed]
    commit_s = result["total_s"] - sum(plain)
    tenth = max(1, len(plain) // 10)
    result.update(
        median_ms=1000 * statistics.median(plain),
        first_ms=1000 * statistics.median(plain[:tenth]),
        last_ms=1000 * statistics.median(plain[-tenth:]),
        commit_s=commit_s,
    )
    del result["times"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--window", type=int, default=20_000, help="documents whose rows interleave")
    parser.add_argument("--batch-rows", type=int, default=600)
    parser.add_argument("--baseline", default="8c9d826", help="the commit to compare with (default: before the change)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as baseline_tree:
        archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", baseline_tree], input=archive, check=True)
        results = {}
        for name, tree in (("baseline " + args.baseline, Path(baseline_tree)), ("this tree", ROOT)):
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            results[name] = measure(tree, args.documents, args.questions, args.window, args.batch_rows)
    now = datetime.now(UTC)
    print(f"# bench.writer_memory  {now:%Y-%m-%d %H:%M} UTC  {platform.node()}  {os.cpu_count()} CPUs")
    print(
        f"# {args.documents} one-page documents x {args.questions} questions, rows spread over windows of "
        f"{args.window} documents, batches of {args.batch_rows} rows"
    )
    print(
        "# ms/batch: median time of a batch that closed no part (write + statistics); first/last: the same over "
        "the first and the last tenth of them; commits: the batches that closed a part, in all"
    )
    header = f"{'tree':<20} {'peak RSS':>10} {'total':>8} {'ms/batch':>9} {'first':>7} {'last':>7} {'commits':>8}"
    print(f"{header} {'ok docs':>8}")
    for name, r in results.items():
        print(
            f"{name:<20} {r['peak_rss_mib']:>6.0f} MiB {r['total_s']:>7.1f}s {r['median_ms']:>9.2f} "
            f"{r['first_ms']:>7.2f} {r['last_ms']:>7.2f} {r['commit_s']:>7.1f}s {r['documents_ok']:>8}"
        )
    before, after = results.values()
    print(
        f"ratio this/baseline: peak RSS {after['peak_rss_mib'] / before['peak_rss_mib']:.2f}, "
        f"time {after['total_s'] / before['total_s']:.2f}, ms/batch {after['median_ms'] / before['median_ms']:.2f}"
    )


if __name__ == "__main__":
    main()
