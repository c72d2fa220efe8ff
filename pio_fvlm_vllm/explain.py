"""Draws which patches of an image a request keeps.

    python -m pio_fvlm_vllm.explain --checkpoint DIR --image IMG --question Q --keep 0.11 --out kept.png

Runs the selection the server runs (the same engine-independent algorithm and settings, on the
Hugging Face model of a LLaVA-NeXT checkpoint, the prompt rendered by the checkpoint's chat
template as vLLM renders it) and draws two panels over the image: the base view (the whole
image at the tower's resolution) and the anyres tiles (the image at its best grid
resolution), each kept patch at full brightness, each dropped one dimmed. The figures printed
(kept of N, per view) are what the server's `x-pio-fvlm-image-tokens` header reports for the
same request.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PatchGrid:
    """One view's tokens as a rows x cols grid over the image, in the LLM's token order.

    `newline`: each row ends in a newline token (anyres tiles) that covers no patch.
    """

    first_token: int
    rows: int
    cols: int
    newline: bool

    @property
    def num_tokens(self) -> int:
        return self.rows * (self.cols + self.newline)

    def cells(self, kept: torch.Tensor) -> list[tuple[int, int]]:
        """(row, col) of the kept tokens that fall on this grid's patches."""
        width = self.cols + self.newline
        local = kept[(kept >= self.first_token) & (kept < self.first_token + self.num_tokens)] - self.first_token
        return [(int(i) // width, int(i) % width) for i in local if int(i) % width < self.cols]


def llava_next_grids(config, image_size: tuple[int, int], num_tokens: int) -> tuple[PatchGrid, PatchGrid]:
    """The base view's and the anyres tiles' grids of a LLaVA-NeXT image of (height, width),
    laid out as transformers' `pack_image_features` (and vLLM) lay them out."""
    from transformers.image_processing_utils import select_best_resolution

    tower = config.vision_config
    side = tower.image_size // tower.patch_size
    base = PatchGrid(0, side, side, newline=False)
    height, width = image_size
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    grid_h, grid_w = best_h // tower.image_size * side, best_w // tower.image_size * side
    # The tiles' padding is cut away so the grid keeps the image's aspect ratio.
    if width / height > grid_w / grid_h:
        rows, cols = _unpadded(grid_h, height * grid_w / width), grid_w
    else:
        rows, cols = grid_h, _unpadded(grid_w, width * grid_h / height)
    tiles = PatchGrid(base.num_tokens, rows, cols, newline=True)
    if base.num_tokens + tiles.num_tokens != num_tokens:
        raise ValueError(f"{num_tokens} image tokens do not lay out as a {side}x{side} base view and "
                         f"{rows}x{cols} tiles with newlines")
    return base, tiles


def _unpadded(full: int, scaled: float) -> int:
    padding = (full - int(round(scaled, 7))) // 2
    return full - 2 * padding


def draw(image, grids: list[tuple[str, PatchGrid]], kept: torch.Tensor, out: Path) -> None:
    from PIL import Image, ImageDraw, ImageEnhance

    image = image.convert("RGB")
    scale = max(1, 448 // max(image.size))  # small images drawn larger, patch edges kept sharp
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    panels = []
    for title, grid in grids:
        dim = ImageEnhance.Brightness(image).enhance(0.25)
        keep_mask = Image.new("L", image.size, 0)
        paint = ImageDraw.Draw(keep_mask)
        cells = grid.cells(kept)
        for r, c in cells:
            box = (math.floor(c * image.width / grid.cols), math.floor(r * image.height / grid.rows),
                   math.ceil((c + 1) * image.width / grid.cols), math.ceil((r + 1) * image.height / grid.rows))
            paint.rectangle(box, fill=255)
        panel = Image.composite(image, dim, keep_mask)
        canvas = Image.new("RGB", (panel.width, panel.height + 24), "white")
        canvas.paste(panel, (0, 24))
        ImageDraw.Draw(canvas).text((4, 6), f"{title}: {len(cells)} of {grid.rows * grid.cols} patches kept",
                                    fill="black")
        panels.append(canvas)
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), panels[0].height), "white")
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + 8
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def explain(checkpoint: str, image_path: str, question: str, keep: float, out: Path) -> dict:
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor, LlavaNextForConditionalGeneration

    from .budget import validate_visual_keep
    from .reference import HFReference
    from .settings import PioFvlmSettings

    keep = validate_visual_keep(keep, field="--keep")
    config = AutoConfig.from_pretrained(checkpoint)
    if config.architectures != ["LlavaNextForConditionalGeneration"]:
        raise ValueError(f"--checkpoint: explain draws LLaVA-NeXT checkpoints; {checkpoint} is "
                         f"{', '.join(config.architectures or ['unknown'])}")
    image = Image.open(image_path)
    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(checkpoint)
    reference = HFReference(model, processor, PioFvlmSettings.from_env())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    prepared = reference.prepare(prompt, [image.convert("RGB")], add_special_tokens=False)
    (kept,) = reference.select(prepared, keep)
    start, end = prepared.image_spans[0]
    base, tiles = llava_next_grids(model.config, prepared.image_sizes[0], end - start)
    draw(image, [("base view", base), ("anyres tiles", tiles)], kept.cpu(), out)
    base_kept, tiles_kept = len(base.cells(kept)), len(tiles.cells(kept))
    # The rest are row-end newline tokens of the tiles: kept, but no patch to draw.
    return {"kept": int(kept.numel()), "tokens": end - start, "base_kept": base_kept, "tiles_kept": tiles_kept,
            "newlines_kept": int(kept.numel()) - base_kept - tiles_kept, "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pio_fvlm_vllm.explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a LLaVA-NeXT checkpoint directory")
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", required=True)
    parser.add_argument("--keep", type=float, required=True, help="visual_keep, in (0, 1]")
    parser.add_argument("--out", type=Path, default=Path("kept.png"))
    args = parser.parse_args(argv)
    try:
        result = explain(args.checkpoint, args.image, args.question, args.keep, args.out)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"kept {result['kept']} of {result['tokens']} image tokens: {result['base_kept']} base-view patches, "
          f"{result['tiles_kept']} tile patches, {result['newlines_kept']} row-end newline tokens (no patch); "
          f"wrote {result['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
