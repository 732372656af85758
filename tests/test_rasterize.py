"""Stages 2-3 without Ray: reading, opening by content, rendering only what is asked, and every failure as a row."""

from pathlib import Path

import numpy as np
import pymupdf
import pytest

from jobs.devtools.samples import invoice_pdf
from pipeline.config import StorageConfig
from pipeline.config_loading import load_config
from pipeline.images import ImageGeometry, unpack_images
from pipeline.ledger import RunLedger
from pipeline.locations import InputError, check_input, first_time, iter_documents, iter_shard, listing_shards
from pipeline.planning import ReadDocument, document_of_bytes
from pipeline.records import Page, Status
from pipeline.rendering import document_pages

# No splitting at 896: the page the model gets is the page as rendered (what Idefics2 renders for 448 split).
GEOMETRY = ImageGeometry(896, 224, False, 1 / 255, (0.5,) * 3, (0.5,) * 3)


def _config(backend: str = "pymupdf", pages="all", **limits):
    return load_config(
        None,
        {
            "input": "in",
            "output": "out",
            "questions": [{"id": "q", "text": "What?", "pages": pages}],
            "render": {"backend": backend},
            "limits": limits,
        },
    )


def _pdf(pages: int, size=(612, 792), **save) -> bytes:
    document = pymupdf.open()
    for number in range(pages):
        page = document.new_page(width=size[0], height=size[1])
        page.insert_text((40, 60), f"page {number + 1}")
    return document.tobytes(**save)


def _rasterize(data: bytes, config) -> list[Page]:
    return document_pages(config, GEOMETRY, document_of_bytes("/x/doc.pdf", data))


def _image(page: Page) -> np.ndarray | None:
    """The page as rendered: its one sub-image (no splitting, at the render size), or None when not rendered."""
    return unpack_images(page.sub_images, page.sub_image_shapes)[0] if page.sub_image_shapes else None


@pytest.mark.parametrize("backend", ["pymupdf", "pdf2image"])
def test_renders_at_the_resolution_the_model_keeps(backend: str) -> None:
    document = pymupdf.open(stream=_pdf(1, (612, 792)))
    document.new_page(width=842, height=595).insert_text((40, 60), "landscape page")
    rows = _rasterize(document.tobytes(), _config(backend))
    assert [(row.page_number, _image(row).shape) for row in rows] == [(1, (896, 692, 3)), (2, (633, 896, 3))]
    for row in rows:
        assert row.status == Status.OK and row.num_pages == 2 and _image(row).dtype == np.uint8
        assert _image(row).min() < 128 < _image(row).max()  # the text is there: dark glyphs on a white page


def test_both_backends_render_the_same_page() -> None:
    data = invoice_pdf(7, 1, (595, 842))
    (pymu,) = _rasterize(data, _config("pymupdf"))
    (poppler,) = _rasterize(data, _config("pdf2image"))
    assert _image(pymu).shape == _image(poppler).shape
    assert (
        np.abs(_image(pymu).astype(int) - _image(poppler).astype(int)).mean() < 8
    )  # two rasterizers, same page: anti-aliasing differs, content does not


def test_only_pages_some_question_applies_to_are_rendered() -> None:
    data = _pdf(300)
    rows = _rasterize(data, _config(pages="first"))
    assert [(row.page_number, row.num_pages) for row in rows] == [(1, 300)]
    rows = _rasterize(data, _config(pages="1-2,-1"))
    assert [row.page_number for row in rows] == [1, 2, 300]


def _encrypted() -> bytes:
    return _pdf(1, encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="secret", owner_pw="owner")


@pytest.mark.parametrize("backend", ["pymupdf", "pdf2image"])
@pytest.mark.parametrize(
    ("make", "status"),
    [
        (lambda: b"", Status.EMPTY),
        (lambda: b"<html>not a pdf</html>", Status.UNSUPPORTED_FORMAT),
        (lambda: b"%PDF-1.7\n" + bytes(range(256)) * 8, Status.CORRUPT),
        (_encrypted, Status.ENCRYPTED),
    ],
)
def test_bad_documents_become_one_row_with_a_reason(backend: str, make, status: Status) -> None:
    rows = _rasterize(make(), _config(backend))
    assert len(rows) == 1
    assert rows[0].status == status and rows[0].error and _image(rows[0]) is None


def test_limits_are_checked_before_rendering() -> None:
    [row] = _rasterize(_pdf(5), _config(max_pages_per_document=4))
    assert (row.status, row.num_pages) == (Status.TOO_MANY_PAGES, 5)
    rows = _rasterize(_pdf(2), _config(max_pixels_per_page=896 * 600))
    assert [row.status for row in rows] == [Status.PAGE_TOO_LARGE] * 2
    assert "over limits.max_pixels_per_page" in rows[0].error


def test_no_applicable_pages_is_reported() -> None:
    [row] = _rasterize(_pdf(2), _config(pages="5"))
    assert row.status == Status.NO_APPLICABLE_PAGES and "2 page(s)" in row.error


def test_read_stage_hashes_and_enforces_the_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "a.pdf"
    path.write_bytes(_pdf(1))
    [ref] = iter_documents(str(tmp_path), StorageConfig())
    row = ReadDocument(_config().limits, StorageConfig())(ref)
    assert row.status == "ok" and len(row.sha256) == 64 and row.data == path.read_bytes()
    row = ReadDocument(_config(max_file_bytes=10).limits, StorageConfig())(ref)
    assert row.status == Status.FILE_TOO_LARGE and row.data == b""
    path.unlink()
    assert ReadDocument(_config().limits, StorageConfig())(ref).status == Status.READ_ERROR


def _tree_with_links(tmp_path: Path) -> tuple[Path, set[str]]:
    """An input folder of subfolders, files beside them, and links: to a folder and a file inside the input
    (listed where they are); from two subfolders to one folder outside it, from a third to a folder below
    that one, with a loop inside it, and to the folder above the input (each listed once, the input not
    again); with the paths each file must be listed under."""
    root, outside = tmp_path / "in", tmp_path / "outside"
    for folder in (root / "a" / "deeper", root / "b", root / "c", outside / "sub"):
        folder.mkdir(parents=True)
    for path in (root / "top.pdf", root / "a" / "x.pdf", root / "a" / "deeper" / "y.pdf", root / "b" / "z.pdf"):
        path.write_bytes(b"x")
    (outside / "o.pdf").write_bytes(b"x")
    (outside / "sub" / "p.pdf").write_bytes(b"x")
    (root / "to-a").symlink_to(root / "a")
    (root / "c" / "to-x.pdf").symlink_to(root / "a" / "x.pdf")
    (root / "a" / "to-sub").symlink_to(outside / "sub")
    (root / "b" / "to-outside").symlink_to(outside)
    (root / "c" / "to-outside").symlink_to(outside)
    (outside / "sub" / "loop").symlink_to(outside / "sub")
    (root / "c" / "up").symlink_to(tmp_path)
    expected = {"a/x.pdf", "a/deeper/y.pdf", "b/z.pdf", "top.pdf"}
    return root, {str(root / name) for name in expected} | {str(outside / "o.pdf"), str(outside / "sub" / "p.pdf")}


def test_listing_in_shards_lists_each_file_once_as_one_walk_does(tmp_path: Path) -> None:
    root, expected = _tree_with_links(tmp_path)
    storage = StorageConfig()
    shards = listing_shards(str(root), storage)
    assert [(Path(shard.location).name, shard.recursive) for shard in shards] == [
        ("in", False),  # the files (and links) directly in the input
        ("a", True),
        ("b", True),
        ("c", True),
    ]
    claim = first_time()  # what the run's ledger does across listing tasks
    sharded = [ref.document for shard in shards for ref in iter_shard(shard, storage, claim)]
    assert sorted(sharded) == sorted(expected)  # every file, none twice
    followed = iter_documents(str(root), storage, first_time())  # input_follow_links: true
    assert sorted(ref.document for ref in followed) == sorted(expected)
    inside = {path for path in expected if Path(path).is_relative_to(root)}
    assert sorted(ref.document for ref in iter_documents(str(root), storage)) == sorted(inside)  # the default

    wrapped = tmp_path / "wrapped"
    (wrapped / "only").mkdir(parents=True)
    (wrapped / "only" / "sub").mkdir()
    (wrapped / "only" / "f.pdf").write_bytes(b"x")
    # A level of one folder is stepped through: its contents are the shards.
    assert [Path(shard.location).name for shard in listing_shards(str(wrapped), storage)] == ["only", "sub"]
    (tmp_path / "empty" / "only").mkdir(parents=True)
    for single in (str(root / "top.pdf"), f"{root}/*.pdf", str(tmp_path / "list.txt"), str(tmp_path / "empty")):
        [shard] = listing_shards(single, storage)
        assert shard.whole and shard.location == single


def test_the_ledger_answers_a_listing_task_run_again_as_the_first_time() -> None:
    """Ray runs a task again after a failure or to rebuild lost output: its budget and its claims on folders
    outside the input must come out the same, or documents would go missing."""
    ledger = RunLedger(max_pages=None, max_documents=2)
    assert [ledger.take_document(0, uri) for uri in ("a", "b", "c")] == [True, True, False]
    assert [ledger.take_document(0, uri) for uri in ("a", "b", "c")] == [True, True, False]  # task 0 again
    assert not ledger.take_document(1, "a")  # another task never gets the same document
    assert ledger.claim_outside("/out", 3) and ledger.claim_outside("/out", 3) and not ledger.claim_outside("/out", 4)


def test_listing(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ["b.pdf", "a.bin", "sub/c"]:
        (tmp_path / name).write_bytes(b"x")
    storage = StorageConfig()
    assert [Path(ref.document).name for ref in iter_documents(str(tmp_path), storage)] == ["a.bin", "b.pdf", "c"]
    assert [Path(ref.document).name for ref in iter_documents(f"{tmp_path}/*.pdf", storage)] == ["b.pdf"]
    (tmp_path / "list.txt").write_text(f"# documents\n{tmp_path}/b.pdf\n\ns3://bucket/key without suffix\n")
    refs = list(iter_documents(str(tmp_path / "list.txt"), storage))
    assert [(ref.document, ref.file_size) for ref in refs] == [
        (f"{tmp_path}/b.pdf", 1),
        ("s3://bucket/key without suffix", -1),
    ]
    with pytest.raises(InputError, match="does not exist"):
        check_input(str(tmp_path / "nope"), storage)
    with pytest.raises(InputError, match="cannot read the list of documents"):
        check_input(str(tmp_path / "missing-list.txt"), storage)
    with pytest.raises(InputError, match="no files found"):
        check_input(f"{tmp_path}/*.tiff", storage)
