"""What the model needs to know about an image's request, carried beside the pixels.

The multimodal embedding step never sees the prompt, but the selection depends on it. The
processor therefore packs, per image, the token budget, where the image sits in the served and
in the unpruned prompt, how many text rows after it take over the proxy's states, and the
prompt text around it into one int64 tensor (a batched multimodal field), and the model
unpacks it. The same multimodal hash implies the same prompt, so all of it is fixed by the
hash.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CONTEXT_FIELD = "pio_fvlm_context"
KEEP_ALL = -1
NO_HANDOFF = -1


_HEADER = 7


@dataclass(frozen=True)
class PromptContext:
    num_keep: int  # KEEP_ALL: stock behaviour
    num_tokens: int  # N, the image's tokens in the unpruned prompt
    served_offset: int  # index of the image's first placeholder in the served prompt
    # Position of the image's first token in the unpruned prompt: its index there (plain
    # rotary), or its base cell (multimodal rotary: cell (t, h, w) sits at base + (t, h, w)).
    original_offset: int
    handoff_rows: int  # text rows after the image that take over the proxy's states; NO_HANDOFF
    prefix_ids: list[int]
    suffix_ids: list[int]
    image_key: int = 0  # the image's multimodal hash, shortened (`kept_indices.image_key`); 0: none

    @property
    def pruned(self) -> bool:
        return self.num_keep != KEEP_ALL

    @property
    def handoff(self) -> bool:
        """Whether the image's kept rows (and handoff_rows text rows) take over proxy states."""
        return self.handoff_rows != NO_HANDOFF

    def pack(self) -> torch.Tensor:
        return torch.tensor(
            [self.num_keep, self.num_tokens, self.served_offset, self.original_offset,
             self.handoff_rows, self.image_key, len(self.prefix_ids), *self.prefix_ids, *self.suffix_ids],
            dtype=torch.int64,
        )

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> "PromptContext":
        values = packed.reshape(-1).tolist()
        if len(values) < _HEADER or not 0 <= values[6] <= len(values) - _HEADER:
            raise ValueError(f"malformed PIO-FVLM context of {len(values)} values")
        num_prefix = values[6]
        return cls(*values[:5], values[_HEADER : _HEADER + num_prefix], values[_HEADER + num_prefix :],
                   image_key=values[5])


def image_contexts(prompt_ids: list[int], image_token_id: int) -> list[tuple[list[int], list[int]]]:
    """(text before, text after) each image of a prompt, other images' tokens left out.

    A run of consecutive image tokens is one image, so this works on prompts whose
    placeholders are already expanded as well as on one-token-per-image prompts.
    """
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(prompt_ids):
        if prompt_ids[i] == image_token_id:
            j = i
            while j < len(prompt_ids) and prompt_ids[j] == image_token_id:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    text = [t for t in prompt_ids if t != image_token_id]
    contexts = []
    for start, _ in runs:
        num_text_before = sum(1 for t in prompt_ids[:start] if t != image_token_id)
        contexts.append((text[:num_text_before], text[num_text_before:]))
    return contexts
