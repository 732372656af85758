"""§5(b): the pixel values our split stage (+ the actor's normalizer) produce equal Idefics2Processor's."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

from pipeline.config import ModelConfig, RenderConfig
from pipeline.images import (
    ImageGeometry,
    ModelLoadError,
    PixelNormalizer,
    SplitPage,
    pack_images,
    resolve_image_geometry,
    split_page,
    unpack_images,
)

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
    normalizer = PixelNormalizer(geometry)
    for seed, (height, width) in enumerate(PAGE_SHAPES):
        page = _page(height, width, seed)
        expected = processor([[Image.fromarray(page)]], return_tensors="np")
        sub_images = split_page(page, geometry)
        ours, mask = normalizer.batch([sub_images])
        assert ours.shape == expected["pixel_values"].shape
        np.testing.assert_array_equal(mask, expected["pixel_attention_mask"])
        np.testing.assert_array_equal(ours, expected["pixel_values"])  # bit-identical, padding included


def test_split_stage_row_roundtrip_is_raw_uint8() -> None:
    geometry = ImageGeometry(448, 224, True, 1 / 255, (0.5,) * 3, (0.5,) * 3)
    page = _page(896, 693, 1)
    buffer, _ = pack_images([page])
    row = {"uri": "x", "image": buffer, "height": 896, "width": 693}
    out = SplitPage(geometry)(row)
    assert "image" not in out and out["uri"] == "x"
    sub_images = unpack_images(out["sub_images"], out["sub_image_shapes"])
    assert [image.shape for image in sub_images] == [
        (448, 346, 3),
        (448, 347, 3),
        (448, 346, 3),
        (448, 347, 3),
        (448, 346, 3),
    ]
    assert len(out["sub_images"]) == sum(image.size for image in sub_images)  # raw bytes: no PNG, no header
    for ours, expected in zip(sub_images, split_page(page, geometry), strict=True):
        np.testing.assert_array_equal(ours, expected)


def test_geometry_is_read_from_the_checkpoint(tiny_model: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model).image_processor
    geometry = resolve_image_geometry(ModelConfig(id=str(tiny_model)), RenderConfig())
    assert (geometry.longest_edge, geometry.shortest_edge, geometry.splitting) == (448, 224, True)
    assert geometry.render_longest_edge == 2 * processor.size["longest_edge"]
    off = resolve_image_geometry(ModelConfig(id=str(tiny_model)), RenderConfig(image_splitting=False))
    assert off.render_longest_edge == 448


def test_default_model_offline_says_how_to_use_a_local_model() -> None:
    with pytest.raises(ModelLoadError) as caught:
        resolve_image_geometry(ModelConfig(), RenderConfig())
    message = str(caught.value)
    assert "HuggingFaceM4/idefics2-8b" in message
    assert "--model PATH" in message and "docqa model tiny PATH" in message
