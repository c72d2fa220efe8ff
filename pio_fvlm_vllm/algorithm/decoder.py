"""A differentiable Llama-family decoder layer in plain PyTorch.

The serving engine's own layers cannot be differentiated (fused kernels without a backward,
and on CPU the linear weights are repacked into opaque handles), so the proxy pass runs its
own copy of the math over weight tensors it is handed. Only standard ops are used: F.linear,
RMSNorm, rotary embeddings, SiLU-gated MLP and causal attention through flash-attn (CUDA, when
importable) or PyTorch SDPA. Attention weights are never materialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DecoderShape:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Multimodal rotary (Qwen2-VL, Qwen2.5-VL): the head_dim / 2 frequencies in sections read
    # positions (temporal, height, width); None: plain 1-D rotary.
    mrope_section: tuple[int, ...] | None = None
    # Qwen3-VL interleaves the sections (t, h, w, t, h, w, ...) instead of laying them end to end.
    mrope_interleaved: bool = False


@dataclass
class DecoderLayerWeights:
    """Weights of one Llama/Mistral/Qwen2-style decoder layer, in Hugging Face layout."""

    input_norm: torch.Tensor  # (D,)
    q_proj: torch.Tensor  # (H*Dh, D)
    k_proj: torch.Tensor  # (Hkv*Dh, D)
    v_proj: torch.Tensor  # (Hkv*Dh, D)
    o_proj: torch.Tensor  # (D, H*Dh)
    post_norm: torch.Tensor  # (D,)
    gate_proj: torch.Tensor  # (I, D)
    up_proj: torch.Tensor  # (I, D)
    down_proj: torch.Tensor  # (D, I)
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    # Qwen3: RMSNorm over each head's query and key before the rotary, (Dh,)
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


@dataclass
class ProxyWeights:
    """What the proxy pass needs: the first K decoder layers and the output head.

    Under tensor parallelism each rank holds its shard of every layer (its attention heads,
    its slice of the MLP, as the engine shards them; `shape` counts this rank's heads) and the
    whole LM head; `tp_group` is the process group the row-parallel outputs are summed over.
    """

    shape: DecoderShape
    layers: list[DecoderLayerWeights]
    final_norm: torch.Tensor  # (D,)
    lm_head: torch.Tensor  # (V, D)
    tp_group: object | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32: reductions in half precision lose the small differences we score."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = upcast(x)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype == dtype and _in_place_ok(x32, weight):
        return x32.to(dtype).mul_(weight)
    return weight * x32.to(dtype)


def _in_place_ok(*tensors: torch.Tensor) -> bool:
    """Without autograd, fresh intermediates can be overwritten: fewer large allocations, which
    on a CPU cost page faults on every call, and fewer passes over memory."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


@lru_cache(maxsize=8)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
    mrope_section: tuple[int, ...] | None = None, mrope_interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: (B, L), or (B, 3, L) with `mrope_section` -> cos, sin: (B, 1, L, Dh) in the
    rotate-half (neox) layout.

    Multimodal rotary: every position row gives its own angles. Frequency section i (of
    `mrope_section`) takes them from row i, the sections end to end as Qwen2-VL lays them, or
    interleaved (frequency j from row j % 3 while that row's section lasts) as Qwen3-VL does.
    """
    freqs = positions.float()[..., None] * _inv_freq(head_dim, theta, positions.device)  # (B, L, Dh/2) or (B, 3, L, Dh/2)
    if mrope_section is not None:
        if positions.ndim != 3 or 2 * sum(mrope_section) != head_dim:
            raise ValueError(f"multimodal rotary needs (B, 3, L) positions and sections summing to "
                             f"head_dim / 2 = {head_dim // 2}, got {tuple(positions.shape)} and {mrope_section}")
        freqs = freqs.gather(1, _mrope_rows(tuple(mrope_section), mrope_interleaved, positions.device)
                             .expand(freqs.shape[0], 1, freqs.shape[2], -1)).squeeze(1)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, Dh)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@lru_cache(maxsize=8)
def _mrope_rows(section: tuple[int, ...], interleaved: bool, device: torch.device) -> torch.Tensor:
    """(1, 1, 1, Dh/2): which position row each rotary frequency reads."""
    if interleaved:
        j = torch.arange(sum(section))
        rows = torch.zeros_like(j)
        for r in (1, 2):
            rows[(j % 3 == r) & (j < 3 * section[r])] = r
    else:
        rows = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(section)])
    return rows.to(device).view(1, 1, 1, -1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if _in_place_ok(x, cos, sin):
        return _rotate_half(x).mul_(sin).add_(x * cos)
    return x * cos + _rotate_half(x) * sin


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except ImportError:
        return None
    return flash_attn_func


_FLASH_ATTN = _flash_attn_func()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: (B, H, L, Dh), k/v: (B, Hkv, L, Dh) -> (B, H, L, Dh), causal.

    Sequences in a batch are right-padded: under a causal mask a real token only sees earlier,
    real tokens, so padding needs no mask of its own.
    """
    if _FLASH_ATTN is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = _FLASH_ATTN(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; the backward sums the column-parallel shards' input gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Sums the row-parallel shards' partial outputs; the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _CopyToTensorParallel.apply(x, group)


def _reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _ReduceFromTensorParallel.apply(x, group)


def decoder_layer(
    x: torch.Tensor,
    w: DecoderLayerWeights,
    shape: DecoderShape,
    cos: torch.Tensor,
    sin: torch.Tensor,
    tp_group=None,
) -> torch.Tensor:
    """x: (B, L, D) -> (B, L, D); one pre-norm decoder layer (this rank's shard under TP)."""
    bsz, seq, _ = x.shape
    h = _copy_to_tp(rms_norm(x, w.input_norm, shape.rms_norm_eps), tp_group)
    q = _head_norm(F.linear(h, w.q_proj, w.q_bias).view(bsz, seq, shape.num_heads, shape.head_dim), w.q_norm, shape)
    k = _head_norm(F.linear(h, w.k_proj, w.k_bias).view(bsz, seq, shape.num_kv_heads, shape.head_dim), w.k_norm, shape)
    v = F.linear(h, w.v_proj, w.v_bias).view(bsz, seq, shape.num_kv_heads, shape.head_dim)
    q = apply_rotary(q.transpose(1, 2), cos, sin)
    k = apply_rotary(k.transpose(1, 2), cos, sin)
    attn = causal_attention(q, k, v.transpose(1, 2))  # (B, H, L, Dh)
    x = _residual(x, _reduce_from_tp(F.linear(attn.transpose(1, 2).reshape(bsz, seq, -1), w.o_proj), tp_group))
    h = _copy_to_tp(rms_norm(x, w.post_norm, shape.rms_norm_eps), tp_group)
    return _residual(x, _reduce_from_tp(_mlp(h, w), tp_group))


def _head_norm(x: torch.Tensor, weight: torch.Tensor | None, shape: DecoderShape) -> torch.Tensor:
    """x: (..., heads, Dh); per-head RMSNorm where the layer has one (Qwen3), else x."""
    return x if weight is None else rms_norm(x, weight, shape.rms_norm_eps)


def _mlp(h: torch.Tensor, w: DecoderLayerWeights) -> torch.Tensor:
    gate = F.linear(h, w.gate_proj)
    if _in_place_ok(h, gate):
        return F.linear(F.silu(gate, inplace=True).mul_(F.linear(h, w.up_proj)), w.down_proj)
    return F.linear(F.silu(gate) * F.linear(h, w.up_proj), w.down_proj)


def _residual(x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """x + update; `update` is a fresh tensor, so without autograd it takes the sum."""
    if _in_place_ok(x, update):
        return update.add_(x)
    return x + update


def decoder_layer_at(
    x: torch.Tensor,
    w: DecoderLayerWeights,
    shape: DecoderShape,
    cos: torch.Tensor,
    sin: torch.Tensor,
    at: torch.Tensor,
    tp_group=None,
    normed: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (B, L, D), at: (B, P) positions -> (B, P, D): the layer's output at those positions only.
    `normed`: rms_norm(x, w.input_norm), when the caller holds it (a gradient leaf, say).

    Exactly `decoder_layer(...)[b, at[b]]` up to rounding, at a fraction of the cost: every
    position still contributes its key, but only P queries attend and P tokens run the MLP.
    Values are never projected: a query's attention output for head h is
    W_v[h] (sum_i p_hi * h_i) + b_v[h], so the P attention distributions pool the normed
    inputs first and the (P, D) pools are projected instead of all L rows. Forward and
    backward then cost one (L, D) x (D, Hkv*Dh) product each, for the keys. This is all the
    proxy loss needs from the last proxy layer.
    """
    bsz, seq, _ = x.shape
    num = at.shape[1]
    heads, kv_heads, head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
    groups = heads // kv_heads
    rows = torch.arange(bsz, device=x.device)[:, None]
    if normed is None:
        normed = rms_norm(x, w.input_norm, shape.rms_norm_eps)
    h = _copy_to_tp(normed, tp_group)  # (B, L, D)
    q = _head_norm(F.linear(h[rows, at], w.q_proj, w.q_bias).view(bsz, num, heads, head_dim), w.q_norm,
                   shape).transpose(1, 2)
    k = _head_norm(F.linear(h, w.k_proj, w.k_bias).view(bsz, seq, kv_heads, head_dim), w.k_norm, shape).transpose(1, 2)
    # cos/sin: (B, 1, L, Dh) -> the queries' rows (B, 1, P, Dh)
    q = apply_rotary(q, cos[rows, 0, at][:, None], sin[rows, 0, at][:, None])
    k = apply_rotary(k, cos, sin)  # (B, Hkv, L, Dh)
    q = q.reshape(bsz, kv_heads, groups * num, head_dim)  # query heads grouped under their KV head
    logits = (q @ k.transpose(-1, -2)).view(bsz, heads, num, seq) * head_dim**-0.5
    visible = torch.arange(seq, device=x.device)[None, :] <= at[:, :, None]  # (B, P, L)
    probs = upcast(logits).masked_fill(~visible[:, None], float("-inf")).softmax(-1).to(h.dtype)
    # Grouped under their KV head, so each group's pools meet its own W_v shard without copies.
    pooled = probs.view(bsz, kv_heads, groups * num, seq) @ h[:, None]  # (B, Hkv, G*P, D)
    attn = torch.einsum("bkqd,ked->bkqe", pooled, w.v_proj.view(kv_heads, head_dim, -1))  # (B, Hkv, G*P, Dh)
    if w.v_bias is not None:
        attn = attn + w.v_bias.view(kv_heads, 1, head_dim)
    attn = attn.reshape(bsz, heads, num, head_dim)  # (P rows only: small)
    out = x[rows, at] + _reduce_from_tp(F.linear(attn.transpose(1, 2).reshape(bsz, num, -1), w.o_proj), tp_group)
    h = _copy_to_tp(rms_norm(out, w.post_norm, shape.rms_norm_eps), tp_group)
    return _residual(out, _reduce_from_tp(_mlp(h, w), tp_group))
