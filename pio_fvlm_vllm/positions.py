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
