"""Feature-space non-maximum suppression over a saliency order (PIO-FVLM step 3).

Greedy NMS keeps a token iff no more salient *kept* token is similar to it, so a token's fate
depends only on the tokens ranked above it. The greedy therefore walks the saliency order in
chunks: one matrix product compares a chunk with the tokens kept so far and with itself, and
the short walk through the chunk (which of its tokens a kept chunk-mate suppresses) runs on
the host over the chunk's boolean matrix. The cost is a few tensor ops per chunk, not per
kept token (on a GPU, a handful of kernel launches and one copy to the host per chunk), and
the similarities computed are only those among the tokens the greedy actually reaches.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# A chunk holds at least 1/MAX_CHUNKS of an image's tokens, so a call runs at most MAX_CHUNKS
# chunks per image, however much is suppressed.
MAX_CHUNKS = 8


def nms_select(
    scores: torch.Tensor,  # (B, N) float, -inf marks padding
    features: torch.Tensor,  # (B, N, D)
    num_keep: list[int],
    threshold: float,
    inclusive: bool = False,
) -> list[torch.Tensor]:
    """Greedy NMS: take the most salient token left, suppress tokens whose cosine similarity to
    it exceeds `threshold` (or equals it, when `inclusive`), repeat until each row has its
    budget. When every token is kept or suppressed before the budget is met, suppressed tokens
    fill it in saliency order (ties broken by index), so exactly `num_keep[b]` indices come
    back, ascending (the tokens' original order).
    """
    bsz, n = scores.shape
    if len(num_keep) != bsz:
        raise ValueError(f"num_keep has {len(num_keep)} entries for a batch of {bsz}")
    num_valid = torch.isfinite(scores).sum(-1).tolist()
    for b, (k, n_valid) in enumerate(zip(num_keep, num_valid)):
        if not 0 <= k <= n_valid:
            raise ValueError(f"num_keep[{b}]={k} is outside [0, {n_valid}]")
    # Padding (-inf) sorts after every real token.
    order = scores.argsort(dim=-1, descending=True, stable=True)  # (B, N)
    if threshold > 1.0 or (threshold == 1.0 and not inclusive):
        # Nothing can be suppressed: NMS is plain top-k by saliency.
        return [order[b, :k].sort().values for b, k in enumerate(num_keep)]
    unit = F.normalize(features.float(), dim=-1)
    return [
        _greedy(unit[b], order[b, :n_valid], k, threshold, inclusive)
        for b, (k, n_valid) in enumerate(zip(num_keep, num_valid))
    ]


def _greedy(
    unit: torch.Tensor,  # (N, D) unit-norm features
    ranked: torch.Tensor,  # (n,) token indices, most salient first
    num_keep: int,
    threshold: float,
    inclusive: bool,
) -> torch.Tensor:
    n = ranked.numel()
    if num_keep == 0:
        return ranked[:0]
    min_chunk = -(-n // MAX_CHUNKS)
    kept_rank: list[int] = []  # ranks of the kept tokens, ascending
    kept_unit = unit.new_empty(num_keep, unit.shape[1])  # (k, D)
    start = 0
    while len(kept_rank) < num_keep and start < n:
        need = num_keep - len(kept_rank)
        size = min(n - start, max(need + need // 2, min_chunk))
        chunk = unit[ranked[start : start + size]]  # (C, D)
        within = chunk @ chunk.T  # (C, C)
        if kept_rank:
            before = chunk @ kept_unit[: len(kept_rank)].T  # (C, kept)
            within = torch.cat([within, before.amax(-1, keepdim=True)], dim=-1)
        similar = (within >= threshold if inclusive else within > threshold).cpu().numpy()
        suppressed = similar[:, size] if kept_rank else np.zeros(size, dtype=bool)
        taken = _walk(similar[:, :size], suppressed.copy(), need)
        if taken:
            kept_unit[len(kept_rank) : len(kept_rank) + len(taken)] = chunk[torch.tensor(taken, device=unit.device)]
            kept_rank += [start + i for i in taken]
        start += size
    if len(kept_rank) < num_keep:
        # Every token was kept or suppressed: the suppressed ones fill in saliency order.
        is_kept = np.zeros(n, dtype=bool)
        is_kept[kept_rank] = True
        kept_rank += np.flatnonzero(~is_kept)[: num_keep - len(kept_rank)].tolist()
    return ranked[torch.tensor(kept_rank, device=ranked.device)].sort().values


def _walk(similar: np.ndarray, suppressed: np.ndarray, need: int) -> list[int]:
    """The greedy through one chunk: similar (C, C) bool, suppressed (C,) by earlier chunks.

    Returns the chunk positions kept, at most `need`, in order.
    """
    taken = []
    for i in range(similar.shape[0]):
        if suppressed[i]:
            continue
        taken.append(i)
        if len(taken) == need:
            break
        suppressed[i + 1 :] |= similar[i, i + 1 :]
    return taken
