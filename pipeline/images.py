"""Split each page into the sub-images the model consumes, exactly as its image processor does (in the
rendering stage, pipeline/rendering.py).

Idefics2's processor (PIL backend) splits an image into 4 crops plus the whole image when splitting is
on, then resizes each so its longest edge is at most ``longest_edge`` and no edge is below
``shortest_edge`` (bilinear), then rescales by 1/255, normalizes and pads. Idefics1's processor resizes the
whole image to a square (bicubic) and never splits. This stage does the split and the resize on the CPU and
keeps uint8; the actor does the rescale/normalize/pad on its device (``actors.adapters.PixelNormalizer``) so
that images travel through Ray's object store and to the GPU as raw uint8, four times smaller than float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ImageGeometry:
    """The image rules of a checkpoint's processor, resolved once on the driver (actors/checkpoint.py)."""

    longest_edge: int
    shortest_edge: int
    splitting: bool
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    square: bool = False  # Idefics1: every image is resized to a longest_edge square, bicubic

    @property
    def max_split_page_bytes(self) -> int:
        """The most bytes of sub-images one page can have: every part's edges end at most ``longest_edge``."""
        return (5 if self.splitting else 1) * max(self.longest_edge, self.shortest_edge) ** 2 * 3

    @property
    def render_longest_edge(self) -> int:
        """Longest edge worth rendering: the processor keeps ``longest_edge``, per crop when splitting."""
        return self.longest_edge * (2 if self.splitting else 1)


def resized_size(height: int, width: int, geometry: ImageGeometry) -> tuple[int, int]:
    """Idefics2's resize rule: cap the longest edge (keeping the aspect ratio), then floor both edges.
    Idefics1's: the square."""
    if geometry.square:
        return geometry.longest_edge, geometry.longest_edge
    aspect_ratio = width / height
    if width >= height and width > geometry.longest_edge:
        width = geometry.longest_edge
        height = int(width / aspect_ratio)
    elif height > width and height > geometry.longest_edge:
        height = geometry.longest_edge
        width = int(height * aspect_ratio)
    return max(height, geometry.shortest_edge), max(width, geometry.shortest_edge)


def split_page(image: np.ndarray, geometry: ImageGeometry) -> list[np.ndarray]:
    """(H, W, 3) uint8 page → the uint8 sub-images the model sees: 4 crops + the page, or the page alone.
    Parts that keep their size are views of ``image``, not copies."""
    height, width = image.shape[:2]
    if geometry.splitting:
        mid_h, mid_w = height // 2, width // 2
        parts = [image[:mid_h, :mid_w], image[:mid_h, mid_w:], image[mid_h:, :mid_w], image[mid_h:, mid_w:], image]
    else:
        parts = [image]
    resample = Image.BICUBIC if geometry.square else Image.BILINEAR
    out = []
    for part in parts:
        target = resized_size(part.shape[0], part.shape[1], geometry)
        if target != part.shape[:2]:
            part = np.asarray(Image.fromarray(np.ascontiguousarray(part)).resize(target[::-1], resample))
        out.append(part)
    return out


def pack_images(images: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """uint8 (H, W, 3) arrays (views welcome) → one flat uint8 buffer, each copied into it once, and their
    [h0, w0, h1, w1, ...] shapes. Raw pixels: no PNG, no header."""
    buffer = np.empty(sum(image.size for image in images), dtype=np.uint8)
    offset = 0
    for image in images:
        buffer[offset : offset + image.size].reshape(image.shape)[...] = image
        offset += image.size
    return buffer, [dim for image in images for dim in image.shape[:2]]


def unpack_images(buffer: bytes | np.ndarray, shapes: list[int] | np.ndarray) -> list[np.ndarray]:
    flat = np.frombuffer(buffer, dtype=np.uint8)
    images, offset = [], 0
    for height, width in zip(shapes[0::2], shapes[1::2], strict=True):
        count = int(height) * int(width) * 3
        images.append(flat[offset : offset + count].reshape(int(height), int(width), 3))
        offset += count
    return images
