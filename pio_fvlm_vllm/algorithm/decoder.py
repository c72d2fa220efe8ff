"""A differentiable Llama-family decoder layer in plain PyTorch.

The serving engine's own layers cannot be differentiated (fused kernels without a backward,
and on CPU the linear weights are repacked into opaque handles), so the proxy pass runs its
own copy of the math over weight tensors it is handed. Only standard ops are used: F.linear,
RMSNorm, rotary embeddings, SiLU-gated MLP and causal attention through flash-attn (CUDA, when
importable) or PyTorch SDPA. Attention weights are never materialised.
"""

from __future__ import annotations

from collections.abc import Callable
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
    # q/k/v_proj (and their biases) stacked, ((H + 2 Hkv) * Dh, D), where the caller holds them
    # so (vLLM's qkv_proj): one product over a long sequence instead of three.
    qkv_proj: torch.Tensor | None = None
    qkv_bias: torch.Tensor | None = None


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
    return decoder_layer_kv(x, w, shape, cos, sin, tp_group)[0]


def decoder_layer_kv(
    x: torch.Tensor,
    w: DecoderLayerWeights,
    shape: DecoderShape,
    cos: torch.Tensor,
    sin: torch.Tensor,
    tp_group=None,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`decoder_layer` over rows that continue a sequence whose first rows' rotated keys and
    values are `past` ((B, Hkv, L0, Dh) each; cos/sin: the new rows' positions only).

    Returns the new rows' outputs (B, L, D) and the whole sequence's rotated keys and values
    (B, Hkv, L0 + L, Dh): what a later continuation needs as its `past`.
    """
    bsz, seq, _ = x.shape
    h = _copy_to_tp(rms_norm(x, w.input_norm, shape.rms_norm_eps), tp_group)
    q, k, v = _project_qkv(h, w, shape)
    q = _head_norm(q.view(bsz, seq, shape.num_heads, shape.head_dim), w.q_norm, shape)
    k = _head_norm(k.view(bsz, seq, shape.num_kv_heads, shape.head_dim), w.k_norm, shape)
    v = v.view(bsz, seq, shape.num_kv_heads, shape.head_dim).transpose(1, 2)
    q = apply_rotary(q.transpose(1, 2), cos, sin)
    k = apply_rotary(k.transpose(1, 2), cos, sin)
    if past is None:
        attn = causal_attention(q, k, v)  # (B, H, L, Dh)
    else:
        k, v = torch.cat([past[0].to(k.dtype), k], dim=2), torch.cat([past[1].to(v.dtype), v], dim=2)
        attn = _continued_attention(q, k, v)
    x = _residual(x, _reduce_from_tp(F.linear(attn.transpose(1, 2).reshape(bsz, seq, -1), w.o_proj), tp_group))
    h = _copy_to_tp(rms_norm(x, w.post_norm, shape.rms_norm_eps), tp_group)
    return _residual(x, _reduce_from_tp(_mlp(h, w), tp_group)), k, v


def _continued_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: (B, H, L, Dh) the last L rows of a sequence whose keys/values k, v (B, Hkv, L0 + L, Dh)
    are all there: each new row sees every earlier row and itself."""
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    num_new, total = q.shape[2], k.shape[2]
    mask = torch.ones(num_new, total, dtype=torch.bool, device=q.device).tril(total - num_new)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _project_qkv(h: torch.Tensor, w: DecoderLayerWeights,
                 shape: DecoderShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h: (B, L, D) -> queries (B, L, H*Dh), keys and values (B, L, Hkv*Dh)."""
    if w.qkv_proj is None:
        return F.linear(h, w.q_proj, w.q_bias), F.linear(h, w.k_proj, w.k_bias), F.linear(h, w.v_proj, w.v_bias)
    kv_size = shape.num_kv_heads * shape.head_dim
    return F.linear(h, w.qkv_proj, w.qkv_bias).split([shape.num_heads * shape.head_dim, kv_size, kv_size], dim=-1)


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
    inputs first and the (P, D) pools are projected instead of all L rows.
    """
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    if normed is None:
        normed = rms_norm(x, w.input_norm, shape.rms_norm_eps)
    h = _copy_to_tp(normed, tp_group)  # (B, L, D)
    keys, _ = _keys(h, w, shape, cos, sin)
    logits = _queries_at(h[rows, at], w, shape, cos, sin, rows, at) @ keys.transpose(-1, -2)
    probs = _causal_softmax(logits * shape.head_dim**-0.5, at, h.dtype)
    return _layer_tail(x[rows, at], _pooled_values(probs, h, w, shape), w, shape, tp_group)


def normed_input_saliency_at(
    x: torch.Tensor,
    w: DecoderLayerWeights,
    shape: DecoderShape,
    cos: torch.Tensor,
    sin: torch.Tensor,
    at: torch.Tensor,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    tp_group=None,
) -> torch.Tensor:
    """x: (B, L, D), at: (B, P) -> (B, L) float32: <dL/dn_i, n_i> for every position i, where
    n = rms_norm(x, w.input_norm) and L = loss_of(decoder_layer_at(x, ..., at)) (a scalar).

    The same numbers as autograd through `decoder_layer_at` with n as the leaf, without the
    backward over all L rows. A token i reaches the P queries through its key and its value
    only (and its query, where i is one of `at`); its inner product with the gradient splits
    along those paths:
    - value: attention pools n_i with weight p_hi, so the term is sum_h p_hi <dL/dpool_h, n_i>
      = sum_h p_hi dL/dp_hi;
    - key: sum_h dL/ds_hi <ds_hi/dk_i, dk_i/dt>, with s the scaled logits and dk_i/dt the key's
      change as n_i is scaled (the key itself when the key map is linear; its norm's and
      bias's share removed otherwise), which is a logit read through that tangent;
    - query: autograd over the P query rows.
    Autograd only runs over what the P queries touch: their projections, the (P, L) logits and
    the tail of the layer. Under tensor parallelism each rank sums its heads, then the ranks'.
    """
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    scale = shape.head_dim**-0.5
    with torch.no_grad():
        h = rms_norm(x, w.input_norm, shape.rms_norm_eps)  # (B, L, D)
        keys, tangent = _keys(h, w, shape, cos, sin, with_tangent=True)  # (B, Hkv, L, Dh) each
    leaf = h[rows, at].detach().requires_grad_(True)  # (B, P, D)
    with torch.enable_grad():
        q = _queries_at(_copy_to_tp(leaf, tp_group), w, shape, cos, sin, rows, at)  # (B, Hkv, G*P, Dh)
        logits = (q @ keys.transpose(-1, -2)) * scale  # (B, Hkv, G*P, L)
        probs = _causal_softmax(logits, at, h.dtype)
        states = _layer_tail(x[rows, at], _pooled_values(probs, h, w, shape), w, shape, tp_group)
        d_logits, d_probs, d_leaf = torch.autograd.grad(loss_of(states), [logits, probs, leaf])
    with torch.no_grad():
        along_key = logits if tangent is None else (q @ tangent.transpose(-1, -2)) * scale
        scores = (upcast(probs) * upcast(d_probs) + upcast(d_logits) * upcast(along_key)).sum((1, 2))
        if tp_group is not None:
            torch.distributed.all_reduce(scores, group=tp_group)
        # d_leaf is already summed over the ranks (the copy's backward)
        return scores.index_put_((rows.expand_as(at), at), upcast(d_leaf * leaf).sum(-1), accumulate=True)


def _queries_at(h_at: torch.Tensor, w: DecoderLayerWeights, shape: DecoderShape, cos: torch.Tensor,
                sin: torch.Tensor, rows: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """h_at: (B, P, D) normed inputs at `at` -> (B, Hkv, G*P, Dh) rotated queries, each KV
    head's query heads grouped under it."""
    bsz, num, _ = h_at.shape
    q = _head_norm(F.linear(h_at, w.q_proj, w.q_bias).view(bsz, num, shape.num_heads, shape.head_dim), w.q_norm,
                   shape).transpose(1, 2)
    # cos/sin: (B, 1, L, Dh) -> the queries' rows (B, 1, P, Dh)
    q = apply_rotary(q, cos[rows, 0, at][:, None], sin[rows, 0, at][:, None])
    return q.reshape(bsz, shape.num_kv_heads, -1, shape.head_dim)


def _keys(h: torch.Tensor, w: DecoderLayerWeights, shape: DecoderShape, cos: torch.Tensor, sin: torch.Tensor,
          with_tangent: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h: (B, L, D) -> rotated keys (B, Hkv, L, Dh), and with `with_tangent` their derivative
    along each row's own input, d/dt key(h_i (1 + t)) at 0 (rotated), or None where it is the
    key itself (no bias, no key norm)."""
    bsz, seq, _ = h.shape
    linear = F.linear(h, w.k_proj).view(bsz, seq, shape.num_kv_heads, shape.head_dim)
    pre = linear if w.k_bias is None else linear + w.k_bias.view(shape.num_kv_heads, shape.head_dim)
    keys = apply_rotary(_head_norm(pre, w.k_norm, shape).transpose(1, 2), cos, sin)
    if not with_tangent or (w.k_bias is None and w.k_norm is None):
        return keys, None
    tangent = linear if w.k_norm is None else _rms_norm_tangent(pre, linear, w.k_norm, shape.rms_norm_eps)
    return keys, apply_rotary(tangent.transpose(1, 2), cos, sin)


def _rms_norm_tangent(u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """d/dt rms_norm(u + t v, weight) at t = 0, over the last dimension."""
    u32, v32 = upcast(u), upcast(v)
    inv = torch.rsqrt(u32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * (v32 * inv - u32 * ((u32 * v32).mean(-1, keepdim=True) * inv.pow(3)))).to(u.dtype)


def _causal_softmax(logits: torch.Tensor, at: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """logits: (B, Hkv, G*P, L) of the queries at `at` (B, P) -> attention probabilities, each
    query seeing positions up to its own, softmax in at least float32."""
    bsz, kv_heads, rows, seq = logits.shape
    visible = torch.arange(seq, device=logits.device)[None, :] <= at[:, :, None]  # (B, P, L)
    masked = upcast(logits).view(bsz, kv_heads, rows // at.shape[1], at.shape[1], seq)
    return masked.masked_fill(~visible[:, None, None], float("-inf")).softmax(-1).to(dtype).view_as(logits)


def _pooled_values(probs: torch.Tensor, h: torch.Tensor, w: DecoderLayerWeights, shape: DecoderShape) -> torch.Tensor:
    """probs: (B, Hkv, G*P, L), h: (B, L, D) -> attention output (B, H, P, Dh): each head's
    distribution pools the normed inputs, one (B, H*P, L) x (B, L, D) product, and the pools
    meet their KV head's W_v."""
    bsz, kv_heads, rows, seq = probs.shape
    pooled = torch.bmm(probs.reshape(bsz, kv_heads * rows, seq), h).view(bsz, kv_heads, rows, -1)  # (B, Hkv, G*P, D)
    attn = torch.einsum("bkqd,ked->bkqe", pooled, w.v_proj.view(kv_heads, shape.head_dim, -1))  # (B, Hkv, G*P, Dh)
    if w.v_bias is not None:
        attn = attn + w.v_bias.view(kv_heads, 1, shape.head_dim)
    return attn.reshape(bsz, shape.num_heads, -1, shape.head_dim)


def _layer_tail(x_at: torch.Tensor, attn: torch.Tensor, w: DecoderLayerWeights, shape: DecoderShape,
                tp_group) -> torch.Tensor:
    """x_at: (B, P, D) residual, attn: (B, H, P, Dh) -> (B, P, D): output projection, residual,
    MLP."""
    bsz, _, num, _ = attn.shape
    out = x_at + _reduce_from_tp(F.linear(attn.transpose(1, 2).reshape(bsz, num, -1), w.o_proj), tp_group)
    h = _copy_to_tp(rms_norm(out, w.post_norm, shape.rms_norm_eps), tp_group)
    return _residual(out, _reduce_from_tp(_mlp(h, w), tp_group))
