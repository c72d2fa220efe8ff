"""Feature-space non-maximum suppression over a saliency order (PIO-FVLM step 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nms_select(
    scores: torch.Tensor,  # (B, N) float, -inf marks padding
    features: torch.Tensor,  # (B, N, D)
    num_keep: list[int],
    threshold: float,
    inclusive: bool = False,
) -> list[torch.Tensor]:
    """Greedy NMS: take the most salient token left, suppress tokens whose cosine similarity to
    it exceeds `threshold` (or equals it, when `inclusive`), repeat until each row has its budget. When every token is kept or
    suppressed before the budget is met, suppressed tokens fill it in saliency order, so exactly
    `num_keep[b]` indices come back, ascending (the tokens' original order).

    The loop runs max(num_keep) steps of batched tensor ops with no host synchronisation.
    """
    bsz, n = scores.shape
    if len(num_keep) != bsz:
        raise ValueError(f"num_keep has {len(num_keep)} entries for a batch of {bsz}")
    valid = torch.isfinite(scores)
    for b, k in enumerate(num_keep):
        n_valid = int(valid[b].sum())
        if not 0 <= k <= n_valid:
            raise ValueError(f"num_keep[{b}]={k} is outside [0, {n_valid}]")
    k_max = max(num_keep)
    if k_max == 0:
        return [torch.empty(0, dtype=torch.long, device=scores.device) for _ in num_keep]
    if threshold > 1.0 or (threshold == 1.0 and not inclusive):
        # Nothing can be suppressed: NMS is plain top-k by saliency.
        order = scores.argsort(dim=-1, descending=True, stable=True)
        return [order[b, :k].sort().values for b, k in enumerate(num_keep)]

    # Rank-based priority: unsuppressed tokens by saliency, then suppressed ones by saliency.
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=scores.device).expand(bsz, n))
    priority = torch.where(valid, -rank.to(torch.float32), float("-inf"))
    unit = F.normalize(features.float(), dim=-1)
    suppressed = torch.zeros_like(valid)
    rows = torch.arange(bsz, device=scores.device)
    picked = torch.empty(bsz, k_max, dtype=torch.long, device=scores.device)
    for t in range(k_max):
        idx = priority.argmax(dim=-1)  # (B,)
        picked[:, t] = idx
        similarity = torch.einsum("bnd,bd->bn", unit, unit[rows, idx])
        above = similarity >= threshold if inclusive else similarity > threshold
        newly = above & ~suppressed & valid
        priority = torch.where(newly, priority - n, priority)
        suppressed |= newly
        priority[rows, idx] = float("-inf")
    return [picked[b, :k].sort().values for b, k in enumerate(num_keep)]
