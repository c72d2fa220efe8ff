"""Hands the proxy's full-sequence states to the served prefill after decoder layer h.

A pruned image's placeholder range covers its k kept tokens and the text after it, and its
embedding rows carry, beside the input embedding, the state each of those rows has after
layer h in the unpruned prompt (computed by the proxy). vLLM's pruning hook strips that state
and stashes it here, marking the rows in the second M-RoPE position channel (which plain RoPE
never reads) with `-(slot + 1)`; the model's forward turns the marks into a row mask and a row
table, and a forward hook on layer h replaces the marked rows' residual stream.

The states are part of the encoder output, so vLLM's encoder cache keeps them exactly as long
as the kept tokens themselves: chunked prefill, prefix-cache hits and preemption re-gather
both together. The mask and the table are persistent buffers (static addresses for CUDA
graphs) and are cleared after every forward, so a replayed decode graph never sees stale marks.
"""

from __future__ import annotations

import torch
from torch import nn


class HandoffBuffers(nn.Module):
    def __init__(self, max_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("mask", torch.zeros(max_tokens, dtype=torch.bool), persistent=False)
        self.register_buffer("states", torch.zeros(max_tokens, hidden_size, dtype=dtype), persistent=False)
        self._pending: list[torch.Tensor] = []
        self._num_pending = 0
        self._loaded = 0

    def stash(self, states: torch.Tensor) -> torch.Tensor:
        """Keeps (R, D) states for this step's forward; returns the marks for their rows."""
        first = self._num_pending
        self._pending.append(states)
        self._num_pending += states.shape[0]
        return -(torch.arange(first, self._num_pending, device=states.device) + 1)

    def load(self, marks: torch.Tensor) -> None:
        """marks: (T,) the second position channel of this step's tokens."""
        if not self._pending:
            return
        num_tokens = marks.shape[0]
        if num_tokens > self.mask.shape[0]:
            raise RuntimeError(f"{num_tokens} tokens in one step, hand-off buffers hold {self.mask.shape[0]}")
        table = torch.cat(self._pending).to(self.states.device, self.states.dtype)
        marked = marks < 0
        slots = (-marks - 1).clamp(0, table.shape[0] - 1)
        self.mask[:num_tokens] = marked
        self.states[:num_tokens] = table[slots]
        self._loaded = num_tokens

    def clear(self) -> None:
        if self._loaded:
            self.mask[: self._loaded] = False
        self._pending, self._num_pending, self._loaded = [], 0, 0

    def after_layer(self, module: nn.Module, args, output):
        """Forward hook on layer h: (hidden, residual) with marked rows' stream replaced."""
        hidden, residual = output
        mask = self.mask[: hidden.shape[0], None]
        # vLLM's layers return the stream as hidden + residual: put the state in hidden and
        # zero the residual, leaving unmarked rows bit-identical.
        return (torch.where(mask, self.states[: hidden.shape[0]], hidden),
                residual.masked_fill(mask, 0))
