"""Pruned tokens at their original positions through vLLM's M-RoPE pruning hook.

The engine asks the model for a request's positions when the request arrives
(`get_mrope_input_positions`), before selection has run; every row but the kept image rows is
final then. After the multimodal embedding step, in the same engine step and before the
forward pass, the engine hands each request's embedding rows to `recompute_mrope_positions`:
each row of a pruned image carries its served index and original position in trailing digit
columns, so the hook needs no chunk arithmetic and gives the same answer under chunked
prefill, prefix-cache hits, preemption and re-gathers. The hook strips those columns only:
hand-off rows keep their layer-h state after the embedding for `embed_input_ids` (see
`handoff.py`).

The language model reads row 0 of the three position rows; row 2 keeps the values given on
arrival, its last column the unpruned prompt's last position, from which the decode delta
Σ(N - k) is read at every call, even when the prompt ends in image rows. Decode positions are
`served index + delta` on both the V1 runner and Model Runner V2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..positions import NUM_DIGITS, POSITION_COLUMNS, ImageSpan, decode_digits, encode_digits, original_positions
from .context import CONTEXT_FIELD, PromptContext

NUM_POSITION_ROWS = 3


def feature_context(feature) -> PromptContext | None:
    """The plugin's context of a `MultiModalFeatureSpec`, None when it has none."""
    data = feature.data
    elem = None if data is None else data.get(CONTEXT_FIELD)
    return None if elem is None else PromptContext.unpack(elem.data)


def initial_positions(num_tokens: int, mm_features: Sequence) -> tuple[torch.Tensor, int]:
    """(3, num_tokens) positions of the unpruned prompt and the decode delta Σ(N - k)."""
    spans = []
    for feature in mm_features:
        ctx = feature_context(feature)
        if ctx is not None and ctx.pruned:
            # A delta's rows sit at positions its image already has: the text after it
            # continues as if the delta were not there.
            spans.append(ImageSpan(feature.mm_position.offset, ctx.num_keep, 0 if ctx.is_delta else ctx.num_tokens))
    positions, shift = original_positions(num_tokens, spans)
    rows = positions.expand(NUM_POSITION_ROWS, -1).clone()
    if num_tokens:
        rows[2, -1] = num_tokens - 1 + shift
    return rows, shift


def served_rows(embeds: torch.Tensor, kept: torch.Tensor, ctx: PromptContext, states: torch.Tensor | None
                ) -> torch.Tensor:
    """The rows of a pruned image's placeholder: [input embedding | hand-off state | digits].

    embeds: (k + R, D) the kept tokens' embeddings, then the R = handoff_rows text rows after
    the image. states: (k + R, D) those rows' hand-off states, or None (no hand-off, or a
    selection that fell back). The digit columns hold each row's served index and original
    position.
    """
    rows = max(ctx.handoff_rows, 0)
    device = embeds.device
    kept = kept.to(device)
    text = torch.arange(rows, device=device)
    served = ctx.served_offset + torch.arange(kept.numel() + rows, device=device)
    original = torch.cat([ctx.original_offset + kept, ctx.first_text_position + text])
    columns = [embeds]
    if states is not None:
        columns.append(states.to(device, embeds.dtype))
    columns += [encode_digits(served, embeds.dtype), encode_digits(original, embeds.dtype)]
    return torch.cat(columns, dim=-1)


def apply_position_columns(embeddings: Sequence[torch.Tensor], positions: torch.Tensor, width: int,
                           num_columns: int, write) -> tuple[Sequence[torch.Tensor], torch.Tensor]:
    """Rows wider than `width` belong to a pruned image and end in `num_columns` position
    columns: `write(columns, positions)` applies each such image's to a copy of the positions,
    and the columns are cut off (what stays may be wider than `width`: a hand-off state). V1
    calls the hook for every request on every step, so without pruned rows this returns at once."""
    if not any(rows.shape[-1] > width for rows in embeddings):
        return embeddings, positions
    positions = positions.clone()
    stripped = []
    for rows in embeddings:
        if rows.shape[-1] > width:
            write(rows[:, -num_columns:], positions)
            rows = rows[:, :-num_columns]
        stripped.append(rows)
    return stripped, positions


class PositionsHook:
    """Original positions for a plain-rotary language model behind three emulated M-RoPE rows
    (LLaVA families): `recompute_mrope_positions` for embeddings `hidden_size` wide plus
    trailing columns, and what the model's other position seams need."""

    # Decode positions run Σ(N - k) past the served length: the rotary table needs the rows.
    decode_runs_ahead = True

    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size

    @staticmethod
    def initial(input_tokens: list[int], mm_features: Sequence) -> tuple[torch.Tensor, int]:
        return initial_positions(len(input_tokens), mm_features)

    @staticmethod
    def rows(embeds: torch.Tensor, kept: torch.Tensor, ctx: PromptContext, states: torch.Tensor | None,
             grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        return served_rows(embeds, kept, ctx, states)

    @staticmethod
    def language_model_positions(positions: torch.Tensor) -> torch.Tensor:
        """The forward's positions for the language model: row 0 of the three."""
        return positions[0] if positions.ndim == 2 else positions

    def recompute(self, embeddings: Sequence[torch.Tensor], positions: torch.Tensor
                  ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        stripped, positions = apply_position_columns(embeddings, positions, self.hidden_size, POSITION_COLUMNS,
                                                     self._write)
        return stripped, positions, self.delta(positions)

    @staticmethod
    def _write(columns: torch.Tensor, positions: torch.Tensor) -> None:
        """columns: served index and original position digits."""
        served = decode_digits(columns[:, :NUM_DIGITS]).to(positions.device)
        positions[:2, served] = decode_digits(columns[:, NUM_DIGITS:]).to(positions.device, positions.dtype)

    @staticmethod
    def delta(positions: torch.Tensor) -> int:
        return int(positions[2, -1]) + 1 - positions.shape[1]
