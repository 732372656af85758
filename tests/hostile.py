"""Generated hostile PDFs for the robustness tests."""

from __future__ import annotations

import zlib

import pymupdf


def raw_pdf(
    width: float, height: float, content: bytes, extra_page_keys: bytes = b"", objects: tuple[bytes, ...] = ()
) -> bytes:
    """A one-page PDF written by hand (objects 1-4, then ``objects`` from 5), with a correct xref."""
    stream = zlib.compress(content, 9)
    body = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %g %g] /Contents 4 0 R %s >>" % (width, height, extra_page_keys),
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
        *objects,
    ]
    out, offsets = bytearray(b"%PDF-1.7\n"), []
    for number, obj in enumerate(body, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(body) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(body) + 1, xref)
    return bytes(out)


def slow_pdf(operators: int = 3_000_000) -> bytes:
    """Millions of tiny filled rectangles: a small file that takes seconds to render."""
    return raw_pdf(612, 792, b"0.5 0 0 rg\n" + b"1 1 0.5 0.5 re f\n" * operators)


def huge_page_pdf() -> bytes:
    """A 50000 x 50000 pt page (far beyond the 14400 pt the spec allows)."""
    return raw_pdf(50000, 50000, b"BT /F1 2000 Tf 1000 25000 Td (huge) Tj ET")


def many_pages_pdf(pages: int = 5000) -> bytes:
    document = pymupdf.open()
    for _ in range(pages):
        document.new_page(width=200, height=200)
    return document.tobytes()


def encrypted_pdf(password: str) -> bytes:
    document = pymupdf.open()
    document.new_page().insert_text((72, 72), "secret invoice 42")
    return document.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw=password, owner_pw=password + "-owner")


def active_content_pdf(url: str) -> bytes:
    """JavaScript on open, a launch action, a link and an embedded file, all pointing at ``url``."""
    document = pymupdf.open()
    page = document.new_page()
    page.insert_text((72, 72), "click me")
    page.insert_link({"kind": pymupdf.LINK_URI, "from": pymupdf.Rect(72, 60, 200, 80), "uri": url})
    document.embfile_add("payload.html", f'<img src="{url}/embedded">'.encode(), filename="payload.html")
    catalog = document.pdf_catalog()
    script = document.get_new_xref()
    document.update_object(script, f"<< /S /JavaScript /JS (app.launchURL('{url}/js', true);) >>")
    document.xref_set_key(catalog, "OpenAction", f"{script} 0 R")
    return document.tobytes()
