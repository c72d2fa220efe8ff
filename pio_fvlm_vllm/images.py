"""Synthetic images and OpenAI request payloads for the demo, tests and benchmarks."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw


def synthetic_image(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A seeded picture of a few coloured shapes on a textured background."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 60 + 100).astype("uint8")
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width * 3 // 4 + 1)), int(rng.integers(0, height * 3 // 4 + 1))
        short = min(width, height)
        size = int(rng.integers(short // 10, short // 4 + 1))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle([x0, y0, x0 + size, y0 + size], fill=color)
    return img


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(question: str, *images: Image.Image) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]
