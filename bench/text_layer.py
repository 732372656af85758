"""Transcription with ``source: auto`` against ``source: model`` on the same pages, in one Ray instance:
the shared real-world corpus (../shared/corpus/format-corpus, pages 1-3 of each file) and generated
born-digital invoices with scanned copies of some of them. Reports pages/s of each run, their ratio,
and the share of answered pages served from the text layer.

    .venv/bin/python -m bench.text_layer [--invoices 24] [--max-new-tokens 128]

A first, unmeasured run over the generated invoices warms Ray's worker pool up, so that neither measured
run pays for it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "format-corpus"


def write_inputs(directory: Path, invoices: int) -> Path:
    """The corpus's files and ``invoices`` generated invoices, a quarter of them scanned (no text layer)."""
    from jobs.devtools.samples import PAGE_SIZES, invoice_pdf, scanned_pdf

    shutil.copytree(CORPUS, directory / "corpus")
    generated = directory / "invoices"
    generated.mkdir()
    for number in range(invoices):
        data = invoice_pdf(number, pages=1 + number % 3, page_size=PAGE_SIZES["letter"])
        (generated / f"invoice-{number:03d}.pdf").write_bytes(scanned_pdf(data) if number % 4 == 3 else data)
    return directory


def main() -> None:
    import ray

    from jobs.run import run_job
    from pipeline.config_loading import load_config
    from pipeline.tables import read_answers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--invoices", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="docqa-text-layer-"))
    inputs = write_inputs(work / "in", args.invoices)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results = {}
    for source in ("warm-up", "model", "auto"):
        question = {"id": "text", "text": "Transcribe this page.", "pages": "1-3", "source": source}
        if source == "warm-up":
            question["source"] = "model"
        config = load_config(
            None,
            {
                "input": str(inputs / "invoices" if source == "warm-up" else inputs),
                "output": str(work / f"out-{source}"),
                "model": {"id": str(tiny_model())},
                "questions": [{**question, "max_new_tokens": args.max_new_tokens}],
            },
        )
        started = time.perf_counter()
        summary = run_job(config, progress_interval_s=60)
        wall = time.perf_counter() - started
        rows = read_answers(config.output, summary.run_id).to_pylist()
        answered = [row for row in rows if row["status"] == "ok"]
        from_text = sum(row["answer_source"] == "text_layer" for row in answered)
        results[source] = {"pages": len(answered), "wall_s": wall, "from_text": from_text}
        if source == "warm-up":
            continue
        print(
            f"source {source}: {len(answered)} pages answered ({len(rows)} rows), {wall:.1f} s, "
            f"{len(answered) / wall:.2f} pages/s, {from_text} from the text layer",
            flush=True,
        )
    model, auto = results["model"], results["auto"]
    assert model["pages"] == auto["pages"], "both runs answer the same pages"
    print(
        f"# bench.text_layer  {auto['pages']} pages ({args.invoices} generated invoices, a quarter scanned, and "
        f"the corpus's pages 1-3), {args.max_new_tokens}-token transcriptions"
    )
    print(
        f"auto vs model: {model['wall_s'] / auto['wall_s']:.2f}x pages/s; "
        f"text layer usable on {auto['from_text']} of {auto['pages']} pages ({auto['from_text'] / auto['pages']:.0%})"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
