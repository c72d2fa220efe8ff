"""Layer-local proxy loss and token-level gradient saliency (PIO-FVLM steps 1 and 2).

The proxy runs the first K decoder layers over [text before the image, image tokens, text
after the image] for each image, reads the last prompt token's state at layer K (the position
whose state becomes the answer), and scores every image token by how strongly that state
depends on it: the gradient of a loss on the layer-K state with respect to the image tokens'
hidden states at the input of the layers it flows back through.

Choices where the paper leaves room (each one a setting, see `PioFvlmSettings`):
- the loss (`proxy_loss`): the logit lens of the layer-K state (final norm + LM head) scored
  against its own top-1 token, a stand-in for "the final result" that needs no later layer;
- where the gradient is taken (`backprop_layers`): at the input of layer K only by default,
  so the backward costs about one layer (layer-local);
- the reduction to a scalar (`saliency`): grad_x_normed, |<g_i, n_i>| with n_i the token's
  normed input to layer K (what its key and value are read from) and g_i the gradient there:
  the first-order change of the loss when token i leaves layer K's attention, which is the
  quantity output invariance asks about. It is computed in closed form from layer K's
  attention over the few loss positions (`normed_input_saliency_at`), so layer K costs one key
  projection over the sequence and no backward over it: the selection then costs about the
  K - 1 full layers before it. Where the keys pass a per-head norm of their own (Qwen3), that
  norm is scale invariant too, so the key path adds almost nothing and the score reads the
  value path. grad_norm is the authors' ||dL/dx_i||.

  grad_x_input, |<dL/dx_i, x_i>| at the residual-stream input, is kept for comparison only: a
  token reaches layer K's attention only through an RMSNorm, which is scale invariant, so that
  product is zero but for the norm's epsilon (about eps / mean(x_i^2) of ||g_i|| ||x_i||, 1e-6
  on the quality harness) and what survives is largely rounding: its rank correlation with the
  same scores in float64 is 0.8, in bfloat16 0.74.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .decoder import (ProxyWeights, decoder_layer, decoder_layer_at, decoder_layer_kv, normed_input_saliency_at, rms_norm,
                      rotary_cos_sin, upcast)
from .handoff import HandoffInput

LossPositions = Literal["last", "four_before_last"]


def loss_rows(lengths: list[int], which: LossPositions, device) -> torch.Tensor:
    """(B, P) positions whose layer-K states the proxy loss reads.

    last: the last prompt token (its state becomes the first answer token). four_before_last:
    the four positions before it, S-5..S-2, as the authors' code reads them (clamped at 0)."""
    if which == "last":
        return torch.tensor([[n - 1] for n in lengths], device=device)
    if which == "four_before_last":
        return torch.tensor([[max(n - o, 0) for o in (5, 4, 3, 2)] for n in lengths], device=device)
    raise ValueError(f"loss_positions must be 'last' or 'four_before_last', got {which!r}")


@dataclass
class ImageContext:
    """One image and the text it is asked about, as input embeddings."""

    image_embeds: torch.Tensor  # (N, D)
    prefix_embeds: torch.Tensor  # (P, D) prompt text before the image
    suffix_embeds: torch.Tensor  # (S, D) prompt text after the image, ends at the last prompt token
    # (t, h, w) with t * h * w = N: the image's token grid, for multimodal rotary positions.
    grid: tuple[int, int, int] | None = None
    # (levels, N, D) Qwen3-VL's deepstack features: level i is added to the image tokens'
    # states after decoder layer i, as the served model does.
    deepstack: torch.Tensor | None = None

    def mrope_positions(self) -> torch.Tensor:
        """(3, L) multimodal rotary positions of [prefix, image, suffix], as Qwen2-VL numbers
        them: text advances all three rows together, the image's tokens sit at their
        (t, h, w) cell offset by the prefix, and the suffix continues after the largest."""
        if self.grid is None or self.grid[0] * self.grid[1] * self.grid[2] != self.num_image_tokens:
            raise ValueError(f"an image of {self.num_image_tokens} tokens needs its (t, h, w) grid for "
                             f"multimodal rotary positions, got {self.grid}")
        device = self.image_embeds.device
        num_prefix, num_suffix = self.prefix_embeds.shape[0], self.suffix_embeds.shape[0]
        t, h, w = self.grid
        cells = torch.stack(torch.meshgrid(torch.arange(t, device=device), torch.arange(h, device=device),
                                           torch.arange(w, device=device), indexing="ij")).reshape(3, -1)
        after = num_prefix + max(t, h, w)
        return torch.cat([torch.arange(num_prefix, device=device).expand(3, -1), num_prefix + cells,
                          (after + torch.arange(num_suffix, device=device)).expand(3, -1)], dim=1)

    @property
    def num_image_tokens(self) -> int:
        return self.image_embeds.shape[0]

    @property
    def length(self) -> int:
        return self.prefix_embeds.shape[0] + self.image_embeds.shape[0] + self.suffix_embeds.shape[0]


@dataclass
class ProxyPast:
    """What a proxy pass leaves for one that continues the same sequence (a later turn's
    question after an earlier one's): over the sequence's first `length` rows, the rotated keys
    and values of the layers that run in full, and the states after each of them. Attention
    is causal, so those rows' states do not depend on anything after them."""

    length: int
    keys: list[torch.Tensor]  # per full layer: (Hkv, length, Dh)
    values: list[torch.Tensor]  # per full layer: (Hkv, length, Dh)
    states: list[torch.Tensor]  # per full layer: (length, D), its output

    def to(self, device) -> "ProxyPast":
        move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        return ProxyPast(self.length, move(self.keys), move(self.values), move(self.states))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, *self.states))


@dataclass
class Saliency:
    scores: torch.Tensor  # (B, Nmax) at least float32, -inf past each image's N
    features: torch.Tensor  # (B, Nmax, D) hidden states of the image tokens where scored
    num_tokens: list[int]
    # Per context: the input of decoder layer `handoff_layer` (1-based) over the whole sequence
    # [prefix, image, suffix], from which that layer's output at the handed-off rows is computed
    # once the kept tokens are known; None when no hand-off layer was asked for.
    handoff_inputs: list[HandoffInput] | None = None
    # Per context: its pass's `ProxyPast` over its whole sequence, when asked for.
    pasts: list[ProxyPast] | None = None


def _pack(contexts: list[ImageContext], dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """Right-pads the sequences into (B, Lmax, D); returns it and each sequence's length."""
    lengths = [c.length for c in contexts]
    dim = contexts[0].image_embeds.shape[-1]
    device = contexts[0].image_embeds.device
    x = torch.zeros(len(contexts), max(lengths), dim, dtype=dtype, device=device)
    for b, c in enumerate(contexts):
        start, end = c.prefix_embeds.shape[0], c.prefix_embeds.shape[0] + c.num_image_tokens
        x[b, :start] = c.prefix_embeds
        x[b, start:end] = c.image_embeds  # copied in place, cast to the proxy's dtype
        x[b, end : c.length] = c.suffix_embeds
    return x, lengths


def _add_deepstack(x: torch.Tensor, contexts: list[ImageContext], level: int) -> torch.Tensor:
    """x: (B, L, D) states after decoder layer `level`; adds each context's deepstack level
    there at its image rows, in place (x is that layer's fresh output)."""
    for b, c in enumerate(contexts):
        if c.deepstack is not None and level < c.deepstack.shape[0]:
            start = c.prefix_embeds.shape[0]
            x[b, start : start + c.num_image_tokens] += c.deepstack[level].to(x.dtype)
    return x


def _positions(contexts: list[ImageContext], seq: int, multimodal: bool) -> torch.Tensor:
    """(B, seq), or (B, 3, seq) for multimodal rotary; padding rows continue the count."""
    device = contexts[0].image_embeds.device
    if not multimodal:
        return torch.arange(seq, device=device).expand(len(contexts), seq)
    rows = torch.empty(len(contexts), 3, seq, dtype=torch.long, device=device)
    for b, c in enumerate(contexts):
        own = c.mrope_positions()
        rows[b, :, : c.length] = own
        rows[b, :, c.length :] = own[:, -1:] + 1 + torch.arange(seq - c.length, device=device)
    return rows


def proxy_loss(
    last_states: torch.Tensor,  # (B, D)
    weights: ProxyWeights,
    kind: Literal["logit_lens", "state"],
) -> torch.Tensor:
    """Scalar loss summed over the batch; each term depends only on its own sequence."""
    if kind == "logit_lens":
        h = rms_norm(last_states, weights.final_norm, weights.shape.rms_norm_eps)
        logits = upcast(F.linear(h, weights.lm_head))  # (B, V)
        return F.cross_entropy(logits, logits.argmax(-1).detach(), reduction="sum")
    if kind == "state":
        direction = F.normalize(upcast(last_states.detach()), dim=-1)
        return (upcast(last_states) * direction).sum()
    raise ValueError(f"proxy_loss must be 'logit_lens' or 'state', got {kind!r}")


def gradient_saliency(
    weights: ProxyWeights,
    contexts: list[ImageContext],
    *,
    backprop_layers: int = 1,
    loss_kind: Literal["logit_lens", "state"] = "logit_lens",
    reduction: Literal["grad_x_normed", "grad_x_input", "grad_norm"] = "grad_x_normed",
    handoff_layer: int = 0,
    loss_positions: LossPositions = "last",
    past: ProxyPast | None = None,
    keep_past: bool = False,
) -> Saliency:
    """Scores the image tokens of every context by the gradient of the layer-K proxy loss.

    K is `weights.num_layers`. The first K - backprop_layers layers run without autograd; the
    gradient is taken at the input of the remaining ones. With `handoff_layer` h > 0 (at most
    K - backprop_layers + 1: its input is a by-product of the layers that run in full) the
    full-sequence input of layer h is returned too, from which `HandoffInput.output_at` gives
    layer h's output at the rows the served prefill hands off.

    `past` (one context; grad_x_normed): an earlier pass over this context's first rows, so
    the full layers run over the rows after them only. `keep_past`: return each context's
    `ProxyPast` (grad_x_normed, where the gradient layer needs no past of its own).
    """
    if not contexts:
        raise ValueError("gradient_saliency needs at least one image context")
    num_layers = weights.num_layers
    if not 1 <= backprop_layers <= num_layers:
        raise ValueError(f"backprop_layers must be in [1, {num_layers}], got {backprop_layers}")
    if reduction not in ("grad_x_normed", "grad_x_input", "grad_norm"):
        raise ValueError(f"saliency must be 'grad_x_normed', 'grad_x_input' or 'grad_norm', got {reduction!r}")
    if reduction == "grad_x_normed" and backprop_layers != 1:
        raise ValueError(f"saliency grad_x_normed needs backprop_layers 1 (layer-local), got {backprop_layers}")
    if not 0 <= handoff_layer <= num_layers - backprop_layers + 1:
        raise ValueError(
            f"handoff_layer must be in [0, {num_layers - backprop_layers + 1}] (K - backprop_layers + 1), "
            f"got {handoff_layer}"
        )
    if (past is not None or keep_past) and reduction != "grad_x_normed":
        raise ValueError("a proxy past needs saliency grad_x_normed (the gradient layer keeps no past)")
    if past is not None and len(contexts) != 1:
        raise ValueError(f"a proxy past continues one context, got {len(contexts)}")
    shape = weights.shape
    dtype = weights.lm_head.dtype
    handoff = None
    pasts = None
    with torch.inference_mode(False), torch.enable_grad():
        x, lengths = _pack(contexts, dtype)
        bsz, seq, _ = x.shape
        positions = _positions(contexts, seq, shape.mrope_section is not None)
        cos, sin = rotary_cos_sin(positions, shape.head_dim, shape.rope_theta, dtype, shape.mrope_section,
                                  shape.mrope_interleaved)
        first_grad_layer = num_layers - backprop_layers
        handoff_in = x if handoff_layer == 1 else None  # the input of layer h (1-based)
        with torch.no_grad():
            if past is not None or keep_past:
                x, states, pasts = _full_layers(weights, contexts, x, lengths, cos, sin, first_grad_layer, past)
                if handoff_layer > 1:
                    handoff_in = states[handoff_layer - 2]
            else:
                for i in range(first_grad_layer):
                    x = _add_deepstack(decoder_layer(x, weights.layers[i], shape, cos, sin, weights.tp_group),
                                       contexts, i)
                    if i + 2 == handoff_layer:
                        handoff_in = x
        if handoff_layer:
            handoff = [HandoffInput(handoff_in[b, :n].detach(), positions[b, ..., :n], handoff_layer - 1)
                       for b, n in enumerate(lengths)]

        def layer(i: int, x: torch.Tensor) -> torch.Tensor:
            return _add_deepstack(decoder_layer(x, weights.layers[i], shape, cos, sin, weights.tp_group), contexts, i)

        x_in = x.detach().requires_grad_(True)
        x = x_in
        for i in range(first_grad_layer, num_layers - 1):
            x = layer(i, x)
        # The loss reads a few positions of layer K only: that layer runs for them alone (text
        # positions: no deepstack is added there).
        at = loss_rows(lengths, loss_positions, x.device)
        last = weights.layers[-1]

        def loss_of(states: torch.Tensor) -> torch.Tensor:  # (B, P, D) -> scalar
            return proxy_loss(states.flatten(0, 1), weights, loss_kind) / at.shape[1]

        if reduction == "grad_x_normed":
            # Layer-local: the products themselves, without a backward over every row.
            products = normed_input_saliency_at(x_in.detach(), last, shape, cos, sin, at, loss_of, weights.tp_group)
        else:
            (grad,) = torch.autograd.grad(loss_of(decoder_layer_at(x, last, shape, cos, sin, at, weights.tp_group)),
                                          x_in)

    n_max = max(c.num_image_tokens for c in contexts)
    score_dtype = torch.promote_types(dtype, torch.float32)
    scores = torch.full((bsz, n_max), float("-inf"), dtype=score_dtype, device=x_in.device)
    features = torch.zeros(bsz, n_max, x_in.shape[-1], dtype=dtype, device=x_in.device)
    for b, c in enumerate(contexts):
        start, n = c.prefix_embeds.shape[0], c.num_image_tokens
        if reduction == "grad_x_normed":
            scores[b, :n] = products[b, start : start + n].abs()
        elif reduction == "grad_x_input":
            scores[b, :n] = (upcast(grad[b, start : start + n]) * upcast(x_in[b, start : start + n].detach())).sum(-1).abs()
        else:
            scores[b, :n] = upcast(grad[b, start : start + n]).norm(dim=-1)
        features[b, :n] = x_in[b, start : start + n].detach()
    return Saliency(scores=scores, features=features, num_tokens=[c.num_image_tokens for c in contexts],
                    handoff_inputs=handoff, pasts=pasts if keep_past else None)


def _full_layers(weights: ProxyWeights, contexts: list[ImageContext], x: torch.Tensor, lengths: list[int],
                 cos: torch.Tensor, sin: torch.Tensor, num_full: int, past: ProxyPast | None
                 ) -> tuple[torch.Tensor, list[torch.Tensor], list[ProxyPast]]:
    """The layers before the gradient layer, over the rows after `past` (all rows without it),
    keeping each layer's keys, values and output over the whole sequence.

    Returns the states entering the gradient layer (B, L, D), each full layer's output
    (B, L, D), and each context's `ProxyPast`."""
    start = 0 if past is None else past.length
    if past is not None and not 0 < start < lengths[0]:
        raise ValueError(f"a proxy past of {start} rows cannot continue a sequence of {lengths[0]}")
    new = x[:, start:]
    keys, values, outputs = [], [], []
    for i in range(num_full):
        layer_past = None if past is None else (past.keys[i][None], past.values[i][None])
        new, k, v = decoder_layer_kv(new, weights.layers[i], weights.shape, cos[..., start:, :], sin[..., start:, :],
                                     weights.tp_group, layer_past)
        if past is None:
            new = _add_deepstack(new, contexts, i)  # the rows after a past are text: no deepstack there
        whole = new if past is None else torch.cat([past.states[i][None].to(new.dtype), new], dim=1)
        keys.append(k)
        values.append(v)
        outputs.append(whole)
    pasts = [ProxyPast(n, [k[b, :, :n] for k in keys], [v[b, :, :n] for v in values],
                       [o[b, :n] for o in outputs]) for b, n in enumerate(lengths)]
    return (outputs[-1] if outputs else x), outputs, pasts
