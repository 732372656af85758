"""CPU stages (list → read → rasterize → split) over the real PDFs of ../shared/corpus, against a plain
PyMuPDF loop (open, render each page at the same resolution) in one process, same run.

    .venv/bin/python -m bench.cpu_stages [--pages-per-document 5]

Both render the same pages (the first N of every document) at Idefics2-8B's resolution with image
splitting (longest edge 2 x 980 px). A second baseline adds Idefics2's split (4 crops + the page resized
to 980 px) to the plain loop: the pixel work itself, so that ratio shows our overhead alone. Ours is
measured twice: the stage functions in one process (pages/s per core, the like-for-like figure) and the
Ray Data plan of `docqa run` on every core (pages/s / cores; after a warm-up pass over a few documents that
starts Ray's workers and their render helpers, as any long run has them).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "format-corpus"
# Idefics2-8B's image processor (HuggingFaceM4/idefics2-8b/preprocessor_config.json).
IDEFICS2_8B_GEOMETRY = {
    "longest_edge": 980,
    "shortest_edge": 378,
    "splitting": True,
    "rescale_factor": 1 / 255,
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}


def raw_pymupdf_loop(paths: list[Path], pages_per_document: int, geometry, split: bool = False) -> int:
    """The baseline: what a script would do. Returns the number of pages rendered. With ``split``, it also
    does the pixel work Idefics2's processor adds (4 crops + the page resized to 980 px, bilinear), which
    any pipeline feeding Idefics2 must do per page: the baseline for our overhead alone."""
    import pymupdf

    from pipeline.images import split_page

    rendered = 0
    for path in paths:
        try:
            document = pymupdf.open(stream=path.read_bytes(), filetype="pdf")
            count = min(document.page_count, pages_per_document)
        except Exception:  # noqa: BLE001 - the baseline skips what it cannot open
            continue
        for index in range(count):
            try:
                page = document[index]
                zoom = geometry.render_longest_edge / max(page.rect.width, page.rect.height)
                pixmap = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
                image = np.frombuffer(pixmap.samples, dtype=np.uint8).reshape(pixmap.height, pixmap.width, 3)
                if split:
                    split_page(image, geometry)
                rendered += 1
            except Exception:  # noqa: BLE001
                continue
        document.close()
    return rendered


def stage_functions(config, geometry) -> int:
    """Our stages in this process: the listing, then the tasks each listed document gets in Ray (read → plan
    its units into render batches; each batch: render → split → Arrow tables; the render sandbox is their
    helper process)."""
    from pipeline.locations import iter_documents
    from pipeline.planning import PlanDocuments
    from pipeline.record_schema import to_table
    from pipeline.records import DocumentRef, Status
    from pipeline.rendering import RenderPages

    plan, render = PlanDocuments(config), RenderPages(config, geometry)
    pages = 0
    for ref in iter_documents(config.input, config.storage):
        batches = plan(to_table([ref], DocumentRef))
        for batch in range(batches.num_rows):
            for table in render(batches.slice(batch, 1)):
                pages += table["status"].to_pylist().count(Status.OK.value)
    return pages


def ray_plan(config, geometry) -> int:
    from jobs.plan import build_page_dataset
    from pipeline.records import Status

    pages = 0
    for batch in build_page_dataset(config, geometry).iter_batches(batch_format="numpy", batch_size=None):
        pages += int(np.sum(batch["status"] == Status.OK.value))
    return pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages-per-document", type=int, default=5)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args()

    import ray

    from pipeline.config_loading import load_config
    from pipeline.images import ImageGeometry

    paths = sorted(path for path in args.corpus.rglob("*") if path.is_file())
    geometry = ImageGeometry(**IDEFICS2_8B_GEOMETRY)
    config = load_config(
        None,
        {
            "input": str(args.corpus),
            "output": "unused",
            "questions": [{"id": "q", "text": "Transcribe.", "pages": f"1-{args.pages_per_document}"}],
        },
    )
    timings: dict[str, tuple[int, float]] = {}
    for name, run in [
        ("raw PyMuPDF loop", lambda: raw_pymupdf_loop(paths, args.pages_per_document, geometry)),
        ("raw loop + Idefics2 split", lambda: raw_pymupdf_loop(paths, args.pages_per_document, geometry, True)),
        ("docqa stages, one process", lambda: stage_functions(config, geometry)),
    ]:
        started = time.perf_counter()
        pages = run()
        timings[name] = (pages, time.perf_counter() - started)
    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Warm-up on a few documents: start the workers, their render helpers and imports, as a long run has.
    ray_plan(
        config.model_copy(update={"budget": config.budget.model_copy(update={"max_documents": 2 * cores})}), geometry
    )
    started = time.perf_counter()
    pages = ray_plan(config, geometry)
    timings["docqa Ray Data plan"] = (pages, time.perf_counter() - started)
    ray.shutdown()

    print(f"# bench.cpu_stages  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  {cores} CPUs")
    print(f"{len(paths)} files of {args.corpus.name}, first {args.pages_per_document} pages each, rendered at")
    print(f"longest edge {geometry.render_longest_edge} px (Idefics2-8B with splitting)")
    per_core = {}
    for name, (pages, seconds) in timings.items():
        used = cores if name == "docqa Ray Data plan" else 1
        per_core[name] = pages / seconds / used
        print(f"{name:28s} {pages:5d} pages {seconds:7.2f} s  {per_core[name]:6.2f} pages/s per core ({used} cores)")
    for ours in ("docqa stages, one process", "docqa Ray Data plan"):
        for baseline in ("raw PyMuPDF loop", "raw loop + Idefics2 split"):
            print(f"ratio {ours} / {baseline}, per core: {per_core[ours] / per_core[baseline]:.2f}")


if __name__ == "__main__":
    main()
