"""Hands the proxy's states to the served prefill after decoder layer h, for every family.

A pruned image's placeholder range covers its k kept tokens and the text after it, and its
embedding rows carry, after the input embedding, the state each of those rows has after
layer h in the unpruned prompt (computed by the proxy). The rows reach the model's
`embed_input_ids` in the order of the step's multimodal mask, so the mask gives each row's
index in the step's flattened batch: the model loads the states there and cuts them off
before the embeddings are merged, and a forward hook on layer h replaces those rows' residual
stream. No position row is involved, so families whose language model reads all three
M-RoPE rows (Qwen2.5-VL, Qwen3-VL) hand off as LLaVA does.

The states are part of the encoder output, so vLLM's encoder cache keeps them exactly as long
as the kept tokens themselves: chunked prefill, prefix-cache hits and preemption re-gather
both together, and a chunk carries the states of exactly the rows it computes. The mask and
the table are persistent buffers (static addresses for CUDA graphs) and are cleared after
every forward, so a replayed decode graph never sees stale rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class HandoffBuffers(nn.Module):
    def __init__(self, max_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("mask", torch.zeros(max_tokens, dtype=torch.bool), persistent=False)
        self.register_buffer("states", torch.zeros(max_tokens, hidden_size, dtype=dtype), persistent=False)
        self._loaded = 0  # rows of `mask` that may be set

    def load(self, embeddings: Sequence[torch.Tensor], is_multimodal: torch.Tensor, width: int
             ) -> Sequence[torch.Tensor]:
        """embeddings: this step's multimodal rows, item by item, in the order `is_multimodal`
        (T,) marks them; an item wider than `width` ends in its rows' hand-off states. Loads
        those at the rows' flattened indices and returns the embeddings cut to `width`."""
        if not any(e.shape[-1] > width for e in embeddings):
            return embeddings
        rows = is_multimodal.nonzero().flatten().to(self.mask.device)
        # One host read per step: the mask is cleared up to the last multimodal row.
        last = int(rows[-1]) if rows.numel() else -1
        if last >= self.mask.shape[0]:
            raise RuntimeError(f"{last + 1} tokens in one step, hand-off buffers hold {self.mask.shape[0]}")
        self._loaded = max(self._loaded, last + 1)
        stripped, first = [], 0
        for e in embeddings:
            num = e.shape[0]
            if e.shape[-1] > width:
                at = rows[first:first + num]
                self.mask[at] = True
                self.states[at] = e[:, width:].to(self.states.device, self.states.dtype)
                e = e[:, :width]
            stripped.append(e)
            first += num
        return stripped

    def clear(self) -> None:
        if self._loaded:
            self.mask[: self._loaded] = False
        self._loaded = 0

    def after_layer(self, module: nn.Module, args, output):
        """Forward hook on layer h: (hidden, residual) with marked rows' stream replaced."""
        hidden, residual = output
        mask = self.mask[: hidden.shape[0], None]
        # vLLM's layers return the stream as hidden + residual: put the state in hidden and
        # zero the residual, leaving unmarked rows bit-identical.
        return (torch.where(mask, self.states[: hidden.shape[0]], hidden),
                residual.masked_fill(mask, 0))
