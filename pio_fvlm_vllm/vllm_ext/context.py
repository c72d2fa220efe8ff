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


_HEADER = 11


@dataclass(frozen=True)
class PromptContext:
    num_keep: int  # KEEP_ALL: stock behaviour
    num_tokens: int  # N, the image's tokens in the unpruned prompt
    served_offset: int  # index of the item's first placeholder in the served prompt
    # Position of the image's first token in the unpruned prompt: its index there (plain
    # rotary), or its base cell (multimodal rotary: cell (t, h, w) sits at base + (t, h, w)).
    original_offset: int
    handoff_rows: int  # text rows after the item that take over the proxy's states; NO_HANDOFF
    prefix_ids: list[int]
    suffix_ids: list[int]
    image_key: int = 0  # the item's multimodal hash, shortened (`kept_indices.image_key`); 0: none
    # Where the hand-off text rows start among suffix_ids, and the position of the first of
    # them: right after the image for a first selection, at the later user turn for a delta.
    handoff_text_start: int = 0
    text_position: int = -1  # -1: right after the image's N tokens
    # A later turn's delta: the keys of the items of the same image served before it (its first
    # selection, then earlier deltas); it selects among the tokens none of them kept.
    served_before: tuple[int, ...] = ()
    # The image's pixels alone (its stock multimodal hash, shortened): the vision tower's output
    # depends on nothing else, so every question about the image can share it; 0: none.
    vision_key: int = 0

    @property
    def pruned(self) -> bool:
        return self.num_keep != KEEP_ALL

    @property
    def handoff(self) -> bool:
        """Whether the item's kept rows (and handoff_rows text rows) take over proxy states."""
        return self.handoff_rows != NO_HANDOFF

    @property
    def first_text_position(self) -> int:
        """Position of the first hand-off text row in the unpruned prompt."""
        return self.original_offset + self.num_tokens if self.text_position < 0 else self.text_position

    @property
    def is_delta(self) -> bool:
        """A later turn's addition to an image: its rows take no positions of their own."""
        return bool(self.served_before)

    def pack(self) -> torch.Tensor:
        return torch.tensor(
            [self.num_keep, self.num_tokens, self.served_offset, self.original_offset,
             self.handoff_rows, self.image_key, self.handoff_text_start, self.text_position,
             len(self.served_before), len(self.prefix_ids), self.vision_key, *self.served_before, *self.prefix_ids,
             *self.suffix_ids],
            dtype=torch.int64,
        )

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> "PromptContext":
        values = packed.reshape(-1).tolist()
        if len(values) < _HEADER:
            raise ValueError(f"malformed PIO-FVLM context of {len(values)} values")
        num_before, num_prefix = values[8], values[9]
        if not (0 <= num_before and 0 <= num_prefix and num_before + num_prefix <= len(values) - _HEADER):
            raise ValueError(f"malformed PIO-FVLM context of {len(values)} values")
        start = _HEADER + num_before
        return cls(*values[:5], values[start: start + num_prefix], values[start + num_prefix:],
                   image_key=values[5], handoff_text_start=values[6], text_position=values[7],
                   served_before=tuple(values[_HEADER:start]), vision_key=values[10])


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
