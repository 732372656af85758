"""Scans and images: docqa's render stage over image files against the same pages as born-digital PDFs, and
what OCR costs against rendering; then the real scans of ../shared/corpus/scans (OCR time, and the words of
phototest.tif against its ground truth).

    .venv/bin/python -m bench.scans [--pages 24] [--dpi 300]

The pages are one-page invoices (jobs/devtools/samples.py). As PDFs they are rendered from vector text; as
images they are the same pages scanned at ``--dpi`` (rendered to pixels), saved as PNG, JPEG, TIFF (LZW),
TIFF (CCITT G4, bilevel), WebP (lossy), BMP, GIF (256 colours) and JPEG 2000. Each set goes through docqa's
planning and rendering stages in this process (read, open in the render helper, render at Idefics2-8B's
resolution with splitting, split), one core, same run: pages/s and the ratio to the PDFs. Then the PNG
pages with OCR: a question answered from text (OCR only), one for the model with a typed answer (render and
OCR at once, in the task's two helpers), against rendering alone.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.cpu_stages import IDEFICS2_8B_GEOMETRY

SCANS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "scans"
# The image sets Pillow writes whole: set (and suffix) -> (Pillow's format, its save options). Pillow writes
# no resolution into WebP, GIF or JPEG 2000, so those pages are sized at 72 dpi; every set renders to the same
# 1960 px all the same.
PILLOW_SETS = {
    "png": ("PNG", {}),
    "jpeg": ("JPEG", {"quality": 90}),
    "webp": ("WEBP", {"quality": 90}),
    "bmp": ("BMP", {}),
    "gif": ("GIF", {}),
    "jp2": ("JPEG2000", {}),
}


def write_sets(folder: Path, pages: int, dpi: int) -> dict[str, Path]:
    """The same ``pages`` invoices as PDFs and as image files of each format, a folder per set."""
    from jobs.devtools.samples import invoice_pdf, multipage_tiff, page_images

    sets = {name: folder / name for name in ("pdf", "tiff-lzw", "tiff-g4", *PILLOW_SETS)}
    for path in sets.values():
        path.mkdir(parents=True)
    for number in range(pages):
        pdf = invoice_pdf(number, 1, (612, 792))
        (sets["pdf"] / f"{number:03d}.pdf").write_bytes(pdf)
        [image] = page_images(pdf, dpi)
        for name, (format, options) in PILLOW_SETS.items():
            written = io.BytesIO()
            image.save(written, format=format, dpi=(dpi, dpi), **options)
            (sets[name] / f"{number:03d}.{name}").write_bytes(written.getvalue())
        (sets["tiff-lzw"] / f"{number:03d}.tif").write_bytes(multipage_tiff([(image, "tiff_lzw")]))
        (sets["tiff-g4"] / f"{number:03d}.tif").write_bytes(multipage_tiff([(image, "group4")]))
    return sets


def stage_pages_per_second(folder: Path, questions: list[dict], ocr: str) -> tuple[int, float]:
    """(pages ok, seconds) through the planning and rendering stages in this process."""
    from pipeline.config_loading import load_config
    from pipeline.images import ImageGeometry
    from pipeline.locations import iter_documents
    from pipeline.planning import PlanDocuments
    from pipeline.record_schema import to_table
    from pipeline.records import DocumentRef, Status
    from pipeline.rendering import RenderPages

    config = load_config(
        None,
        {"input": str(folder), "output": "unused", "questions": questions, "ocr": {"engine": ocr}},
    )
    geometry = ImageGeometry(**IDEFICS2_8B_GEOMETRY)
    plan, render = PlanDocuments(config), RenderPages(config, geometry)
    plan(to_table([next(iter_documents(config.input, config.storage))], DocumentRef))  # start the helpers
    started, pages = time.perf_counter(), 0
    for ref in iter_documents(config.input, config.storage):
        batches = plan(to_table([ref], DocumentRef))
        for batch in range(batches.num_rows):
            for table in render(batches.slice(batch, 1)):
                pages += table["status"].to_pylist().count(Status.OK.value)
    return pages, time.perf_counter() - started


def corpus_ocr() -> list[str]:
    """Per real scan: its size, the OCR's time and words; phototest.tif's words against the ground truth."""
    from pipeline.config import LimitsConfig, RenderConfig
    from pipeline.confinement import tessdata_directory
    from pipeline.sandbox import SandboxedDocument

    if not SCANS.is_dir():
        return [f"{SCANS} is absent: no real scans measured"]
    tessdata, lines = tessdata_directory(["eng"]), []
    for path in sorted(SCANS.glob("*")):
        if path.suffix not in (".tif", ".png"):
            continue
        document = SandboxedDocument(path.read_bytes(), RenderConfig(), LimitsConfig())
        info = document.page_info(1)
        started = time.perf_counter()
        document.start_ocr(1, "eng", 300, tessdata)
        layer = document.finish_ocr()
        seconds = time.perf_counter() - started
        document.close()
        dpi = round(info["dpi"]) if info["dpi"] else "-"
        line = f"{path.name:28s} {info['pixels'] / 1e6:5.2f} Mpx  dpi {dpi:>4}  OCR {seconds:5.2f} s"
        line += f"  {len(layer.words):4d} words"
        if path.name == "phototest.tif":
            truth = (SCANS / "phototest.gold.txt").read_text().split()
            read = layer.text.split()
            found = sum(word in read for word in truth)
            line += f"  ground truth words found: {found}/{len(truth)} ({found / len(truth):.1%})"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=24)
    parser.add_argument("--dpi", type=int, default=300)
    args = parser.parse_args(argv)
    model = [{"id": "q", "text": "What is this?"}]
    from_text = [{"id": "t", "text": "Transcribe.", "source": "text_layer"}]
    typed = [{"id": "n", "text": "Total?", "type": "money"}]
    with tempfile.TemporaryDirectory() as folder:
        sets = write_sets(Path(folder), args.pages, args.dpi)
        rendering = {name: stage_pages_per_second(path, model, "none") for name, path in sets.items()}
        ocr_only = stage_pages_per_second(sets["png"], from_text, "tesseract")
        render_and_ocr = stage_pages_per_second(sets["png"], typed, "tesseract")
    print(f"# bench.scans  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  {os.cpu_count()} CPUs")
    size = f"{round(8.5 * args.dpi)}x{round(11 * args.dpi)} px"  # a letter page
    print(f"{args.pages} one-page invoices; images scanned at {args.dpi} dpi ({size}); rendered at longest")
    print("edge 1960 px and split (Idefics2-8B); planning + rendering stages in one process")
    pdf_rate = rendering["pdf"][0] / rendering["pdf"][1]
    for name, (pages, seconds) in rendering.items():
        rate = pages / seconds
        ratio = rate / pdf_rate
        print(f"render {name:9s} {pages:3d} pages {seconds:6.2f} s  {rate:6.2f} pages/s  ratio to PDF {ratio:.2f}")
    png_render = rendering["png"][1] / rendering["png"][0]
    for name, (pages, seconds) in [
        ("OCR only (source: text_layer)", ocr_only),
        ("render + OCR (typed)", render_and_ocr),
    ]:
        per_page = seconds / pages
        print(f"png {name:30s} {per_page * 1000:7.0f} ms/page  {per_page / png_render:5.1f}x rendering alone")
    print(f"png render only                    {png_render * 1000:7.0f} ms/page")
    print("real scans (../shared/corpus/scans), OCR at most 300 dpi in the render helper:")
    for line in corpus_ocr():
        print(f"  {line}")


if __name__ == "__main__":
    main()
