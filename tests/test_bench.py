"""The benchmark scripts run (the GPU one on CPU with the tiny architecture) and report what they claim."""

from __future__ import annotations

import pytest

from bench.end_to_end import operator_wall_times
from bench.gpu import run


def test_gpu_benchmark_runs_on_cpu_with_the_tiny_architecture() -> None:
    results = run(
        "tiny", "cpu", pages=3, short_tokens=4, transcribe_tokens=5, transcribe_pages=2, batch_pages=2, naive_limit=4
    )
    assert [entry["splitting"] for entry in results["runs"]] == [True, False]
    for entry in results["runs"]:
        short = entry["short"]
        assert short["page_questions"] == 3 * 3 and short["naive_page_questions"] == 4
        assert short["same_answers"] == 4  # ours and the naive loop give the same greedy answers
        assert short["ratio"] > 0 and short["peak_gib"] is None  # no GPU memory on a CPU
        assert entry["prefix_cache"]["same_answers"] == entry["prefix_cache"]["page_questions"] == 3 * 3
        transcription = entry["transcription"]
        # fixed length: every page gets exactly max_new_tokens tokens
        assert transcription["tokens_per_s"] * transcription["seconds"] == pytest.approx(2 * 5)


def test_stage_times_are_read_from_ray_data_stats(ray_session) -> None:
    import ray.data

    dataset = ray.data.range(40).map(lambda row: row).map_batches(lambda batch: batch, batch_size=10, num_cpus=0.5)
    assert sum(1 for _ in dataset.iter_rows()) == 40
    times = operator_wall_times(dataset.stats())
    assert times and all(seconds > 0 for seconds in times.values())
    assert any("MapBatches" in name for name in times)
