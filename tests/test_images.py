"""§5(b): the pixel values our split stage (+ the actor's normalizer) produce equal Idefics2Processor's."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

from actors.adapters import PixelNormalizer
from actors.checkpoint import ModelLoadError
from actors.families import inspect_checkpoint
from pipeline.config import ModelConfig, RenderConfig
from pipeline.images import ImageGeometry, pack_images, split_page, unpack_images
from pipeline.record_schema import to_table
from pipeline.records import PAGE_SCHEMA, Page

PAGE_SHAPES = [(896, 693), (693, 896), (895, 341), (70, 896), (1960, 1386), (200, 150), (981, 979)]


def _page(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _geometry_of(processor: Idefics2ImageProcessorPil, splitting: bool) -> ImageGeometry:
    return ImageGeometry(
        longest_edge=processor.size["longest_edge"],
        shortest_edge=processor.size["shortest_edge"],
        splitting=splitting,
        rescale_factor=processor.rescale_factor,
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
    )


@pytest.mark.parametrize("splitting", [True, False])
@pytest.mark.parametrize(
    "sizes", [{"shortest_edge": 378, "longest_edge": 980}, {"shortest_edge": 224, "longest_edge": 448}]
)
def test_split_stage_matches_idefics2_processor(splitting: bool, sizes: dict[str, int]) -> None:
    processor = Idefics2ImageProcessorPil(do_image_splitting=splitting, size=sizes)
    geometry = _geometry_of(processor, splitting)
    normalizer = PixelNormalizer(geometry, torch.device("cpu"))
    for seed, (height, width) in enumerate(PAGE_SHAPES):
        page = _page(height, width, seed)
        expected = processor([[Image.fromarray(page)]], return_tensors="np")
        sub_images = split_page(page, geometry)
        ours, mask = (tensor.numpy() for tensor in normalizer.batch([sub_images]))
        assert ours.shape == expected["pixel_values"].shape
        np.testing.assert_array_equal(mask, expected["pixel_attention_mask"])
        np.testing.assert_array_equal(ours, expected["pixel_values"])  # bit-identical, padding included


def test_split_stage_row_roundtrip_is_raw_uint8() -> None:
    geometry = ImageGeometry(448, 224, True, 1 / 255, (0.5,) * 3, (0.5,) * 3)
    page = _page(896, 693, 1)
    buffer, shapes = pack_images(split_page(page, geometry))  # what the rendering stage puts on a Page
    assert "image" not in {item.name for item in dataclasses.fields(Page)}  # the page itself never travels
    sub_images = unpack_images(buffer, shapes)
    assert [image.shape for image in sub_images] == [
        (448, 346, 3),
        (448, 347, 3),
        (448, 346, 3),
        (448, 347, 3),
        (448, 346, 3),
    ]
    assert buffer.nbytes == sum(image.size for image in sub_images)  # raw bytes: no PNG, no header
    for ours, expected in zip(sub_images, split_page(page, geometry), strict=True):
        np.testing.assert_array_equal(ours, expected)


def test_page_table_wraps_the_sub_image_buffers_without_copying_them() -> None:
    geometry = ImageGeometry(448, 224, True, 1 / 255, (0.5,) * 3, (0.5,) * 3)
    identity = {"document": "x", "file_size": 1, "source_version": "v", "etag": "", "version_id": "", "sha256": "h"}

    def page(number: int, status: str, image: np.ndarray | None) -> Page:
        record = Page(
            **identity,
            scope="page",
            num_pages=3,
            page_number=number,
            question_ids=["q"],
            by_model=[True],
            document_rows=3,
            repaired=False,
            status=status,
            error=None,
            render_ms=1.0,
        )
        if image is not None:
            record.sub_images, record.sub_image_shapes = pack_images(split_page(image, geometry))
        return record

    rows = [page(1, "ok", _page(896, 693, 1)), page(2, "render_error", None), page(3, "ok", _page(300, 200, 2))]
    table = to_table(rows, Page)
    assert table.schema == PAGE_SCHEMA and table.num_rows == 3
    assert table["page_number"].to_pylist() == [1, 2, 3] and table["status"].to_pylist()[1] == "render_error"
    for index, row in enumerate(rows):
        chunk = table["sub_images"].chunk(index)
        assert chunk.buffers()[2].address == row.sub_images.ctypes.data  # the same memory
        assert chunk[0].as_py() == row.sub_images.tobytes()
        assert table["sub_image_shapes"][index].as_py() == row.sub_image_shapes
    # What the actor gets from Ray's numpy batch format: the same pixels.
    [sub_images] = table.slice(2, 1)["sub_images"].to_numpy(zero_copy_only=False)
    for ours, expected in zip(
        unpack_images(sub_images, rows[2].sub_image_shapes), split_page(_page(300, 200, 2), geometry), strict=True
    ):
        np.testing.assert_array_equal(ours, expected)


def test_geometry_is_read_from_the_checkpoint(tiny_model: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model).image_processor
    geometry = inspect_checkpoint(ModelConfig(id=str(tiny_model)), RenderConfig()).geometry
    assert (geometry.longest_edge, geometry.shortest_edge, geometry.splitting) == (448, 224, True)
    assert geometry.render_longest_edge == 2 * processor.size["longest_edge"]
    off = inspect_checkpoint(ModelConfig(id=str(tiny_model)), RenderConfig(image_splitting=False)).geometry
    assert off.render_longest_edge == 448


def test_default_model_offline_says_how_to_use_a_local_model() -> None:
    with pytest.raises(ModelLoadError) as caught:
        inspect_checkpoint(ModelConfig(), RenderConfig())
    message = str(caught.value)
    assert "HuggingFaceM4/idefics2-8b" in message
    assert "--model PATH" in message and "docqa model tiny PATH" in message
