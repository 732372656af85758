"""The shared real-world corpus (../shared/corpus/format-corpus) through `docqa run` with the tiny model:
documents per status, wall time, and the peak memory of the whole process tree (driver, Ray, workers,
render sandboxes), sampled every 100 ms.

    .venv/bin/python -m bench.corpus
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "format-corpus"


def main() -> None:
    import psutil
    import ray

    from jobs.run import run_job
    from pipeline.config_loading import load_config
    from pipeline.tables import read_answers

    model = tiny_model()
    peak = {"rss": 0}
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            peak["rss"] = max(peak["rss"], total)
            time.sleep(0.1)

    output = tempfile.mkdtemp(prefix="docqa-corpus-")
    config = load_config(
        None,
        {
            "input": str(CORPUS),
            "output": output,
            "model": {"id": str(model)},
            "questions": [{"id": "q", "text": "What is this document?", "pages": "first", "max_new_tokens": 8}],
        },
    )
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    summary = run_job(config, progress_interval_s=30)
    wall = time.perf_counter() - started
    done.set()
    rows = read_answers(output, summary.run_id)
    statuses = Counter(rows.column("status").to_pylist())
    print(f"# bench.corpus  {len(rows)} documents from {CORPUS}")
    print("documents per status: " + ", ".join(f"{status} {n}" for status, n in statuses.most_common()))
    print(f"wall time (ray.init + run + commit): {wall:.1f} s; run alone {summary.wall_s:.1f} s")
    print(f"peak memory, whole process tree: {peak['rss'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
