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
  quantity output invariance asks about. grad_norm is the authors' ||dL/dx_i||.

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

from .decoder import ProxyWeights, decoder_layer, decoder_layer_at, rms_norm, rotary_cos_sin, upcast

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
class Saliency:
    scores: torch.Tensor  # (B, Nmax) at least float32, -inf past each image's N
    features: torch.Tensor  # (B, Nmax, D) hidden states of the image tokens where scored
    num_tokens: list[int]
    # Per context (L_b, D): the residual stream after `handoff_layer` decoder layers over the
    # whole sequence [prefix, image, suffix]; None when no hand-off layer was asked for.
    handoff_states: list[torch.Tensor] | None = None


def _pack(contexts: list[ImageContext], dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """Right-pads the sequences into (B, Lmax, D); returns it and each sequence's length."""
    lengths = [c.length for c in contexts]
    dim = contexts[0].image_embeds.shape[-1]
    device = contexts[0].image_embeds.device
    x = torch.zeros(len(contexts), max(lengths), dim, dtype=dtype, device=device)
    for b, c in enumerate(contexts):
        x[b, : c.length] = torch.cat([c.prefix_embeds, c.image_embeds, c.suffix_embeds]).to(dtype)
    return x, lengths


def _pack_deepstack(contexts: list[ImageContext], seq: int, dtype: torch.dtype, max_levels: int) -> list[torch.Tensor]:
    """Per deepstack level up to `max_levels`, (B, seq, D) zeros with each context's level at
    its image rows."""
    levels = min(max((c.deepstack.shape[0] for c in contexts if c.deepstack is not None), default=0), max_levels)
    if levels == 0:
        return []
    dim, device = contexts[0].image_embeds.shape[-1], contexts[0].image_embeds.device
    packed = torch.zeros(levels, len(contexts), seq, dim, dtype=dtype, device=device)
    for b, c in enumerate(contexts):
        if c.deepstack is not None:
            start = c.prefix_embeds.shape[0]
            own = c.deepstack[:levels]
            packed[: own.shape[0], b, start : start + c.num_image_tokens] = own.to(dtype)
    return list(packed)


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
) -> Saliency:
    """Scores the image tokens of every context by the gradient of the layer-K proxy loss.

    K is `weights.num_layers`. The first K - backprop_layers layers run without autograd; the
    gradient is taken at the input of the remaining ones. With `handoff_layer` h > 0 (at most
    K - backprop_layers, so it costs no extra layer) the full-sequence states after layer h
    are returned too: the served prefill takes them over for the kept rows.
    """
    if not contexts:
        raise ValueError("gradient_saliency needs at least one image context")
    num_layers = weights.num_layers
    if not 1 <= backprop_layers <= num_layers:
        raise ValueError(f"backprop_layers must be in [1, {num_layers}], got {backprop_layers}")
    if reduction == "grad_x_normed" and backprop_layers != 1:
        raise ValueError(f"saliency grad_x_normed needs backprop_layers 1 (layer-local), got {backprop_layers}")
    if not 0 <= handoff_layer <= num_layers - backprop_layers:
        raise ValueError(
            f"handoff_layer must be in [0, {num_layers - backprop_layers}] (K - backprop_layers), "
            f"got {handoff_layer}"
        )
    shape = weights.shape
    dtype = weights.lm_head.dtype
    handoff = None
    with torch.inference_mode(False), torch.enable_grad():
        x, lengths = _pack(contexts, dtype)
        bsz, seq, _ = x.shape
        cos, sin = rotary_cos_sin(_positions(contexts, seq, shape.mrope_section is not None), shape.head_dim,
                                  shape.rope_theta, dtype, shape.mrope_section, shape.mrope_interleaved)
        deepstack = _pack_deepstack(contexts, seq, dtype, num_layers - 1)  # layer K reads text rows only

        def layer(i: int, x: torch.Tensor) -> torch.Tensor:
            x = decoder_layer(x, weights.layers[i], shape, cos, sin, weights.tp_group)
            return x + deepstack[i] if i < len(deepstack) else x

        first_grad_layer = num_layers - backprop_layers
        with torch.no_grad():
            for i in range(first_grad_layer):
                x = layer(i, x)
                if i + 1 == handoff_layer:
                    handoff = [x[b, :n] for b, n in enumerate(lengths)]
        x_in = x.detach().requires_grad_(True)
        x = x_in
        for i in range(first_grad_layer, num_layers - 1):
            x = layer(i, x)
        # The loss reads a few positions of layer K only: that layer runs for them alone (text
        # positions: no deepstack is added there).
        at = loss_rows(lengths, loss_positions, x.device)
        last = weights.layers[-1]
        leaf, normed = x_in, None
        if reduction == "grad_x_normed":
            normed = rms_norm(x_in.detach(), last.input_norm, shape.rms_norm_eps).detach().requires_grad_(True)
            leaf = normed
        states = decoder_layer_at(x, last, shape, cos, sin, at, weights.tp_group, normed=normed)
        loss = proxy_loss(states.flatten(0, 1), weights, loss_kind) / at.shape[1]
        (grad,) = torch.autograd.grad(loss, leaf)

    n_max = max(c.num_image_tokens for c in contexts)
    score_dtype = torch.promote_types(dtype, torch.float32)
    scores = torch.full((bsz, n_max), float("-inf"), dtype=score_dtype, device=x_in.device)
    features = torch.zeros(bsz, n_max, x_in.shape[-1], dtype=dtype, device=x_in.device)
    for b, c in enumerate(contexts):
        start, n = c.prefix_embeds.shape[0], c.num_image_tokens
        g = upcast(grad[b, start : start + n])
        h = x_in[b, start : start + n].detach()
        if reduction in ("grad_x_normed", "grad_x_input"):
            scores[b, :n] = (g * upcast(leaf[b, start : start + n].detach())).sum(-1).abs()
        elif reduction == "grad_norm":
            scores[b, :n] = g.norm(dim=-1)
        else:
            raise ValueError(f"saliency must be 'grad_x_normed', 'grad_x_input' or 'grad_norm', got {reduction!r}")
        features[b, :n] = h
    return Saliency(scores=scores, features=features, num_tokens=[c.num_image_tokens for c in contexts],
                    handoff_states=handoff)
