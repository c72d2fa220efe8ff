"""Original positions for a pruned prompt, and the rows that take over the proxy's states.

A served prompt holds k_i placeholders for an image of N_i tokens. Every token keeps the
position it has in the unpruned prompt: a kept image token `image start + its index among the
N`, every other token its served index plus the tokens dropped before it. Pure functions over
plain integers and tensors, shared by the vLLM model, the processor and the Hugging Face
reference so that all three agree by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Positions travel inside embedding rows as base-256 digits: every digit (<= 255) is exact in
# bf16, fp16 and fp32, where an integer such as 257 is not (bf16 stores it as 256).
DIGIT_BASE = 256
NUM_DIGITS = 3  # positions below 256**3 = 16.7M
POSITION_COLUMNS = 2 * NUM_DIGITS  # served index, original position


@dataclass(frozen=True)
class ImageSpan:
    offset: int  # served index of the image's first placeholder
    num_keep: int  # k: placeholders in the served prompt
    num_tokens: int  # N: the image's tokens in the unpruned prompt


def original_positions(served_len: int, spans: Sequence[ImageSpan]) -> tuple[torch.Tensor, int]:
    """(served_len,) int64 positions of the unpruned prompt, and the shift Σ(N - k).

    Kept image rows get `image start + r` here (r: index among the kept), a provisional value
    that the kept indices, known after selection, replace; every other row is final.
    """
    shift = torch.zeros(served_len, dtype=torch.int64)
    for span in spans:
        end = span.offset + span.num_keep
        if not 0 <= span.offset <= end <= served_len:
            raise ValueError(f"image span {span} outside a prompt of {served_len} tokens")
        shift[end:] += span.num_tokens - span.num_keep
    total = sum(s.num_tokens - s.num_keep for s in spans)
    return torch.arange(served_len, dtype=torch.int64) + shift, total


def handoff_rows(text_after: int, num_tokens: int, num_keep: int) -> int:
    """How many text rows after a pruned image take over the proxy's states.

    At most N - k, so the image's extended placeholder never holds more rows than the
    unpruned image did (the engine's encoder cache is sized for that).
    """
    return max(0, min(text_after, num_tokens - num_keep))


def encode_digits(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R,) non-negative ints -> (R, NUM_DIGITS) base-256 digits, most significant first."""
    if values.numel() and int(values.max()) >= DIGIT_BASE**NUM_DIGITS:
        raise ValueError(f"position {int(values.max())} does not fit {NUM_DIGITS} base-{DIGIT_BASE} digits")
    powers = DIGIT_BASE ** torch.arange(NUM_DIGITS - 1, -1, -1, device=values.device)
    return ((values[:, None] // powers) % DIGIT_BASE).to(dtype)


def decode_digits(digits: torch.Tensor) -> torch.Tensor:
    """(R, NUM_DIGITS) digits in any float dtype -> (R,) int64."""
    powers = DIGIT_BASE ** torch.arange(NUM_DIGITS - 1, -1, -1, device=digits.device)
    return (digits.round().long() * powers).sum(-1)


@dataclass(frozen=True)
class GridSpan:
    """An image of a multimodal-rotary (Qwen2-VL family) prompt."""

    offset: int  # served index of the image's first placeholder
    num_served: int  # placeholders in the served prompt (k, or N when unpruned)
    grid: tuple[int, int, int]  # (t, h, w) token grid of the unpruned image, t * h * w = N
    delta: bool = False  # a later turn's addition to an image: its cells are the image's own


def mrope_layout(served_len: int, spans: Sequence[GridSpan]) -> tuple[torch.Tensor, list[int], int]:
    """Multimodal rotary positions of a served prompt as the unpruned prompt numbers them.

    Returns (3, served_len) positions, each image's base (the position of its first cell; cell
    (t, h, w) sits at base + (t, h, w); delta spans have none), and the decode delta. Text advances all three rows
    together from one past the largest position before it, as Qwen2-VL numbers prompts, so
    every text token and every image base is what the unpruned prompt gives it: they depend
    on the images' grids, not on which of their tokens are kept. A pruned image's served rows
    get its first cells here, provisionally (its kept cells replace them after selection).
    """
    pieces, bases = [], []
    start, next_position = 0, 0
    for span in sorted(spans, key=lambda s: s.offset):
        t, h, w = span.grid
        if not 0 <= start <= span.offset or span.num_served > t * h * w:
            raise ValueError(f"image span {span} overlaps the one before or has more rows than cells")
        text = span.offset - start
        pieces.append(torch.arange(text).expand(3, -1) + next_position)
        if span.delta:
            # Provisional (its kept cells replace them); the text after it continues unshifted.
            next_position += text
            pieces.append(torch.full((3, span.num_served), next_position, dtype=torch.int64))
            start = span.offset + span.num_served
            continue
        base = next_position + text
        bases.append(base)
        cells = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        pieces.append(cells.reshape(3, -1)[:, : span.num_served] + base)
        next_position = base + max(t, h, w)
        start = span.offset + span.num_served
    if start > served_len:
        raise ValueError(f"image spans end at {start}, past a prompt of {served_len} tokens")
    pieces.append(torch.arange(served_len - start).expand(3, -1) + next_position)
    positions = torch.cat(pieces, dim=1).to(torch.int64)
    return positions, bases, next_position + (served_len - start) - served_len


def grid_cells(kept: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(k,) indices among an image's t * h * w tokens -> (3, k) their (t, h, w) cells."""
    _, h, w = grid
    return torch.stack([kept // (h * w), (kept // w) % h, kept % w])
