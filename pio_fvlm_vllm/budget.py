"""The token budget shared by the processor (placeholder count) and the model (kept count).

Both sides must compute the same k for the same image, or the number of placeholder tokens
would disagree with the number of embeddings the model returns. Everything that decides k
lives here, in one deterministic function over Python numbers.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

VISUAL_KEEP_FIELD = "visual_keep"
KEEP_RANGE_TEXT = "a number in (0, 1]"
_SHOWN_CHARS = 40


def shown(value: Any) -> str:
    """`repr(value)` for an error message, cut so that a client cannot make one echo a huge value."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return f"an {type(value).__name__} too long to show"
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}... ({len(text)} characters)"


def validate_visual_keep(value: Any, field: str = VISUAL_KEEP_FIELD) -> float:
    """Returns `value` as a float keep ratio, or raises ValueError naming `field` and the range.

    Booleans are rejected although they are ints in Python: `true` in a JSON body is almost
    certainly a client bug, not a keep ratio of 1.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(
            f"{field} must be {KEEP_RANGE_TEXT}, got {type(value).__name__} {shown(value)}"
        )
    try:
        keep = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{field} must be {KEEP_RANGE_TEXT}, got an integer too large to be one") from None
    if not math.isfinite(keep) or not 0.0 < keep <= 1.0:
        raise ValueError(f"{field} must be {KEEP_RANGE_TEXT}, got {shown(value)}")
    return keep


def budget(num_tokens: int, visual_keep: float, reference_tokens: int | None = None) -> int:
    """Number of image tokens kept out of `num_tokens` at ratio `visual_keep`.

    Rounds half up (2880 tokens at 0.111 keep 320, the paper's LLaVA-NeXT budget), never
    keeps fewer than one token, never more than `num_tokens`. With `reference_tokens` (the
    paper's convention, an absolute count) the ratio applies to that count instead of N:
    every image keeps round(reference * keep) tokens, or all of its N if it has fewer.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    keep = validate_visual_keep(visual_keep)
    if num_tokens == 0:
        return 0
    if keep == 1.0:
        return num_tokens
    base = num_tokens if reference_tokens is None else reference_tokens
    # The small epsilon absorbs binary representation error (0.5 * 3 must round to 2).
    k = math.floor(base * keep + 0.5 + 1e-9)
    return max(1, min(num_tokens, k))


VISUAL_TURNS_FIELD = "visual_turns"
# How a chat's later turns treat an image an earlier turn pruned:
# - incremental: the earlier turns' tokens (prefix-cache hits) plus the tokens the new question
#   selects among those not yet served;
# - first_turn: the earlier turns' tokens only (cheapest: nothing of the image is recomputed);
# - reselect: a fresh selection for the whole prompt (nothing of the image is reused).
VISUAL_TURNS_MODES = ("incremental", "first_turn", "reselect")


def validate_visual_turns(value: Any, field: str = VISUAL_TURNS_FIELD) -> str:
    """Returns `value` as one of `VISUAL_TURNS_MODES`, or raises ValueError naming `field`."""
    if not isinstance(value, str) or value not in VISUAL_TURNS_MODES:
        allowed = ", ".join(f'"{m}"' for m in VISUAL_TURNS_MODES)
        raise ValueError(f"{field} must be one of {allowed}, got {shown(value)}")
    return value


def delta_budget(num_tokens: int, num_keep: int, share: float, already_served: int) -> int:
    """Image tokens a later turn adds to an image that already served `already_served` of its
    `num_tokens`: `share` of its first turn's budget `num_keep`, never more than remain."""
    want = math.floor(num_keep * share + 0.5 + 1e-9)
    return max(0, min(want, num_tokens - already_served))
