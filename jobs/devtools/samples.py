"""Sample documents for the demo and the tests: invoices and reports of several page sizes, plus a few bad files."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pymupdf

PAGE_SIZES = {"letter": (612, 792), "a4": (595, 842), "a4-landscape": (842, 595)}


INVOICE_HEADER = "Description   Quantity   Unit price   Amount"  # the table's header row (``header=True``)


def invoice_pdf(number: int, pages: int, page_size: tuple[float, float], header: bool = False) -> bytes:
    """A small text invoice; deterministic for a given number. With ``header``, its items are a table of
    description, quantity, unit price and amount whose header row (``INVOICE_HEADER``) is printed again on
    every page, as a table continued over pages is; without, the invoice is as it always was."""
    rng = random.Random(number)
    document = pymupdf.open()
    total = 0.0
    for page_number in range(1, pages + 1):
        page = document.new_page(width=page_size[0], height=page_size[1])
        lines = [f"ACME Supplies Ltd. - Invoice INV-{number:04d}", f"Page {page_number} of {pages}", ""]
        if header:
            lines.append(INVOICE_HEADER)
        for item in range(rng.randint(4, 9)):
            amount = round(rng.uniform(5, 500), 2)
            description = f"Item {page_number}.{item + 1}  widget type {rng.choice('ABCDEFG')}"
            if header:  # the drawn amount is the unit price of a quantity of them
                quantity, unit_price = rng.randint(2, 9), amount
                amount = round(quantity * unit_price, 2)
                description += f"   {quantity}   ${unit_price:,.2f}"
            total += amount
            lines.append(f"{description}   ${amount:,.2f}")
        if page_number == pages:
            lines += ["", f"Date: 2026-11-{rng.randint(1, 28):02d}", f"TOTAL DUE: ${total:,.2f}"]
        page.insert_text((50, 72), "\n".join(lines), fontsize=13, fontname="helv")
        page.draw_rect(pymupdf.Rect(40, 50, page_size[0] - 40, 70 + 18 * len(lines)), color=(0.2, 0.2, 0.6))
    data = document.tobytes()
    document.close()
    return data


def scanned_pdf(data: bytes, dpi: int = 100) -> bytes:
    """The pages of a PDF as images only (a scan): the same look, no text layer."""
    source, scan = pymupdf.open(stream=data, filetype="pdf"), pymupdf.open()
    for page in source:
        image = scan.new_page(width=page.rect.width, height=page.rect.height)
        image.insert_image(image.rect, pixmap=page.get_pixmap(dpi=dpi))
    scanned = scan.tobytes()
    source.close()
    scan.close()
    return scanned


def page_images(data: bytes, dpi: int, grayscale: bool = False) -> list:
    """The pages of a PDF as Pillow images at ``dpi`` (what a scanner would give, without its noise), each
    carrying its resolution in ``info["dpi"]``."""
    from PIL import Image

    source = pymupdf.open(stream=data, filetype="pdf")
    images = []
    for page in source:
        pixmap = page.get_pixmap(dpi=dpi, colorspace=pymupdf.csGRAY if grayscale else pymupdf.csRGB)
        image = Image.frombytes("L" if grayscale else "RGB", (pixmap.width, pixmap.height), pixmap.samples)
        image.info["dpi"] = (dpi, dpi)
        images.append(image)
    source.close()
    return images


def multipage_tiff(frames: list[tuple[object, str]]) -> bytes:
    """A TIFF with one frame per (Pillow image, compression) pair, each compressed its own way (Pillow's
    ``save_all`` compresses every frame alike): ``group4`` (bilevel), ``tiff_lzw``, ``tiff_adobe_deflate``,
    ``jpeg``, ``raw``..."""
    import io

    from PIL import TiffImagePlugin

    written = io.BytesIO()
    with TiffImagePlugin.AppendingTiffWriter(written, new=True) as tiff:
        for image, compression in frames:
            frame = image.convert("1") if compression in ("group3", "group4") else image
            frame.save(tiff, format="TIFF", compression=compression, dpi=image.info.get("dpi", (72, 72)))
            tiff.newFrame()
    return written.getvalue()


def report_pdf(pages: int, page_size: tuple[float, float] = PAGE_SIZES["a4"]) -> bytes:
    """A long text report, one numbered section a page; deterministic for a given page count."""
    rng = random.Random(pages)
    words = "revenue margin outlook segment capital audit risk liquidity growth forecast".split()
    document = pymupdf.open()
    for page_number in range(1, pages + 1):
        page = document.new_page(width=page_size[0], height=page_size[1])
        lines = [f"Annual Report 2026 - Section {page_number}", ""]
        lines += [" ".join(rng.choice(words) for _ in range(11)) for _ in range(40)]
        lines += ["", f"Page {page_number} of {pages}"]
        page.insert_text((50, 60), "\n".join(lines), fontsize=10, fontname="helv")
    data = document.tobytes(garbage=3, deflate=True)
    document.close()
    return data


def write_samples(directory: str | Path, count: int = 6, with_bad_files: bool = True) -> list[Path]:
    """Write ``count`` invoices (1-3 pages, mixed sizes) and, optionally, a truncated, a non-PDF and an empty file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = list(PAGE_SIZES.values())
    written = []
    for number in range(1, count + 1):
        path = directory / f"invoice-{number:03d}.pdf"
        path.write_bytes(invoice_pdf(number, pages=1 + number % 3, page_size=sizes[number % len(sizes)]))
        written.append(path)
    if with_bad_files:
        truncated = invoice_pdf(999, 2, sizes[0])
        bad = {
            "truncated.pdf": truncated[: len(truncated) // 3],
            "not-a-pdf.pdf": b"<html><body>this is not a PDF</body></html>\n",
            "empty.pdf": b"",
        }
        for name, data in bad.items():
            (directory / name).write_bytes(data)
            written.append(directory / name)
    return written


def write_job(directory: Path, inputs: str | Path, model: Path, questions: list[dict], **sections) -> Path:
    """A job.yaml in ``directory`` writing to ``directory/out``; ``sections`` are further config fields
    (the tests' and benchmarks' jobs)."""
    import yaml

    path = directory / "job.yaml"
    config = {
        "input": str(inputs),
        "output": str(directory / "out"),
        "model": {"id": str(model)},
        "questions": questions,
    }
    path.write_text(yaml.safe_dump({**config, **sections}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write sample PDFs for the docqa demo.")
    parser.add_argument("directory")
    parser.add_argument("--count", type=int, default=6)
    args = parser.parse_args()
    for path in write_samples(args.directory, args.count):
        print(path)


if __name__ == "__main__":
    main()
