"""The encoder-side stage of encoder-involved PIO-FVLM, in the style of VisionZip.

Dominant tokens are the ones the vision tower's CLS token attends to most; the rest are merged
into a few contextual tokens (each the mean of a group of similar tokens). The gradient stage
then selects from [dominant tokens, contextual tokens]. The CLS attention row is computed
from the layer's query/key projections directly, so no attention map is ever requested from
an attention kernel (the tower itself can keep running flash or SDPA attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cls_attention(
    hidden: torch.Tensor,  # (C, 1 + P, Dv): a vision layer's input, CLS first
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor,
    num_heads: int,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the CLS query over the patch tokens, averaged over heads: (C, P); and the
    patch keys, heads concatenated: (C, P, Dv), which VisionZip uses for merging."""
    h = F.layer_norm(hidden, hidden.shape[-1:], norm_weight, norm_bias, eps)
    crops, length, dim = h.shape
    head_dim = dim // num_heads
    q = F.linear(h[:, :1], q_weight, q_bias).view(crops, 1, num_heads, head_dim)
    k = F.linear(h, k_weight, k_bias).view(crops, length, num_heads, head_dim)
    logits = torch.einsum("cqhd,clhd->chl", q, k) * head_dim**-0.5  # (C, heads, 1+P)
    attn = logits.float().softmax(dim=-1).mean(dim=1)[:, 1:]
    return attn, k[:, 1:].reshape(crops, length - 1, dim)


@dataclass
class VisionZipResult:
    dominant: torch.Tensor  # (M,) ascending indices into the input tokens
    embeds: torch.Tensor  # (M + C, D): dominant tokens in order, then contextual tokens


def visionzip_compress(
    embeds: torch.Tensor,  # (N, D) tokens as the LLM will see them
    importance: torch.Tensor,  # (N,) CLS attention (or any encoder-side score)
    keys: torch.Tensor,  # (N, Dk) features for grouping the remainder
    num_dominant: int,
    num_contextual: int,
) -> VisionZipResult:
    n = embeds.shape[0]
    if not 1 <= num_dominant <= n:
        raise ValueError(f"num_dominant must be in [1, {n}], got {num_dominant}")
    dominant = importance.topk(num_dominant).indices.sort().values
    rest_mask = torch.ones(n, dtype=torch.bool, device=embeds.device)
    rest_mask[dominant] = False
    rest = rest_mask.nonzero().squeeze(-1)
    num_contextual = min(num_contextual, rest.numel())
    if num_contextual == 0:
        return VisionZipResult(dominant=dominant, embeds=embeds[dominant])
    # Evenly spaced remainder tokens are the group centres; every other one joins its most
    # similar centre and the group is averaged.
    centre_pos = torch.linspace(0, rest.numel() - 1, num_contextual, device=embeds.device).round().long()
    unit = F.normalize(keys[rest].float(), dim=-1)
    group = (unit @ unit[centre_pos].T).argmax(dim=-1)  # (R,)
    group[centre_pos] = torch.arange(num_contextual, device=embeds.device)
    sums = torch.zeros(num_contextual, embeds.shape[-1], dtype=torch.float32, device=embeds.device)
    sums.index_add_(0, group, embeds[rest].float())
    counts = torch.bincount(group, minlength=num_contextual).clamp_min(1)
    contextual = (sums / counts[:, None]).to(embeds.dtype)
    return VisionZipResult(dominant=dominant, embeds=torch.cat([embeds[dominant], contextual]))
