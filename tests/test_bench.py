"""The benchmark scripts run (the GPU one on CPU with the tiny architecture) and report what they claim."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.end_to_end import operator_wall_times
from bench.gpu import main


def test_gpu_benchmark_runs_on_cpu_with_the_tiny_architecture(tmp_path: Path) -> None:
    pages_dir, out = tmp_path / "pages", tmp_path / "out"
    main(["pages", str(pages_dir), "--count", "3", "--longest-edge", "500"])
    sections = "short,transcription,engines,prefix,sweep,encoder"
    arguments = "--architecture tiny --device cpu --pages 3 --batch-pages 2 --naive-limit 4 --short-tokens 4"
    arguments += " --transcribe-tokens 5 --transcribe-pages 2 --transcribe-batches 2 --sweep-batches 1,2"
    arguments += f" --encoder-images 5 --varied-rows 3 --sections {sections}"
    main(["run", "--pages-dir", str(pages_dir), "--out", str(out), *arguments.split()])
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in sections.split(",")}
    assert all("error" not in result for result in results.values()), results
    short = results["short"]["runs"]
    assert [entry["splitting"] for entry in short] == [True, False]
    for entry in short:
        assert entry["page_questions"] == 3 * 3 and entry["naive_page_questions"] == 4
        assert entry["same_answers"] == 4  # ours and the naive loop give the same greedy answers
        assert entry["peak_gib"] is None  # no GPU memory on a CPU
        assert entry["ratio"] == pytest.approx(entry["ours_rate"] / entry["naive_rate"])  # both measured
    for run in results["prefix"]["runs"]:
        assert run["same_answers"] == run["page_questions"]
    for run in results["transcription"]["runs"]:
        # fixed length: every page gets exactly max_new_tokens tokens
        assert run["tokens_per_s"] * run["seconds"] == pytest.approx(run["pages"] * 5)
    for case in ("short", "transcription"):
        engines = results["engines"][case]["runs"]
        assert set(engines) == {"generate", "slots", "slots+graphs"}
        questions = engines["generate"]["same_answers_as_generate"]
        assert all(engine["same_answers_as_generate"] == questions for engine in engines.values())
    assert [run["batch_pages"] for run in results["sweep"]["runs"]] == [1, 2]
    preparation = results["encoder"]["preparation"]  # the ratio is the two measured times, not a constant
    assert preparation["ratio"] == pytest.approx(
        preparation["cpu_numpy_ms_per_page"] / preparation["device_lookup_ms_per_page"]
    )
    assert [run["images_per_call"] for run in results["encoder"]["runs"]] == [5]


def test_stage_times_are_read_from_ray_data_stats(ray_session) -> None:
    import ray.data

    dataset = ray.data.range(40).map(lambda row: row).map_batches(lambda batch: batch, batch_size=10, num_cpus=0.5)
    assert sum(1 for _ in dataset.iter_rows()) == 40
    times = operator_wall_times(dataset.stats())
    assert times and all(seconds > 0 for seconds in times.values())
    assert any("MapBatches" in name for name in times)


def test_scans_benchmark_renders_every_format_and_ocrs(capsys) -> None:
    """bench.scans, one small page a set: every set renders its page, and the OCR lines are measured."""
    from bench import scans

    scans.main(["--pages", "1", "--dpi", "100"])
    report = capsys.readouterr().out
    rendered = re.findall(r"^render (\S+) +(\d+) pages", report, re.MULTILINE)
    assert rendered == [(name, "1") for name in ("pdf", "tiff-lzw", "tiff-g4", *scans.PILLOW_SETS)], report
    for line in ("OCR only (source: text_layer)", "render + OCR (typed)", "render only"):
        assert re.search(rf"^png {re.escape(line)} +\d+ ms/page", report, re.MULTILINE), (line, report)
