"""What the model needs to know about an image's request, carried beside the pixels.

The multimodal embedding step never sees the prompt, but the selection depends on it. The
processor therefore packs, per image, the token budget and the prompt text around that image
into one int64 tensor (a batched multimodal field), and the model unpacks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CONTEXT_FIELD = "pio_fvlm_context"
KEEP_ALL = -1


@dataclass(frozen=True)
class PromptContext:
    num_keep: int  # KEEP_ALL: stock behaviour
    prefix_ids: list[int]
    suffix_ids: list[int]

    def pack(self) -> torch.Tensor:
        return torch.tensor(
            [self.num_keep, len(self.prefix_ids), *self.prefix_ids, *self.suffix_ids],
            dtype=torch.int64,
        )

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> "PromptContext":
        values = packed.reshape(-1).tolist()
        num_keep, num_prefix = values[0], values[1]
        return cls(num_keep, values[2 : 2 + num_prefix], values[2 + num_prefix :])


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
