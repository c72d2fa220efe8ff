"""The states a pruned prompt's rows take over from the unpruned one after decoder layer h.

The paper prunes inside the language model: layers 1..K see every image token and the layers
after K see the kept ones. A serving engine sizes a request's KV cache from its prompt, so the
plugin prunes before layer 0 and, after layer h, lets the rows that matter (the kept image
tokens and the text after the image) continue from the states the unpruned prompt gives them.
With h = K that is the paper's placement for those rows.

The proxy pass already holds the input of layer h (the residual stream after h - 1 layers over
the whole unpruned sequence, h <= K): layer h's output at R rows costs their queries against
the sequence's keys and values and the MLP on R rows, a fraction of one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoder import ProxyWeights, decoder_layer_at, rotary_cos_sin


@dataclass
class HandoffInput:
    """One context's input of the hand-off layer, as the proxy pass left it."""

    states: torch.Tensor  # (L, D) the residual stream entering decoder layer `layer` (0-based)
    positions: torch.Tensor  # (L,) or (3, L) multimodal rotary positions of the sequence
    layer: int  # 0-based: the hand-off comes after layer `layer` + 1 in 1-based counting

    def output_at(self, weights: ProxyWeights, rows: torch.Tensor) -> torch.Tensor:
        """(R,) rows of the sequence -> (R, D) layer `layer`'s output there, as the engine's
        layer returns it: Qwen3-VL's deepstack level for this layer is added by the model after
        the layer, to image rows, so it is not in these states."""
        return layer_output_at(weights, self.layer, self.states, self.positions, rows)


def layer_output_at(weights: ProxyWeights, layer: int, states: torch.Tensor, positions: torch.Tensor,
                    rows: torch.Tensor) -> torch.Tensor:
    """states: (L, D) input of decoder layer `layer` over a whole sequence; positions: (L,) or
    (3, L); rows: (R,) -> (R, D) the layer's output at those rows (causal: row r attends to rows
    <= r of the whole sequence)."""
    shape = weights.shape
    if not 0 <= layer < weights.num_layers:
        raise ValueError(f"layer must be in [0, {weights.num_layers - 1}] (the proxy's layers), got {layer}")
    if rows.numel() == 0:
        return states.new_zeros(0, states.shape[-1])
    with torch.no_grad():
        cos, sin = rotary_cos_sin(positions[None].to(states.device), shape.head_dim, shape.rope_theta, states.dtype,
                                  shape.mrope_section, shape.mrope_interleaved)
        out = decoder_layer_at(states[None], weights.layers[layer], shape, cos, sin,
                               rows.to(states.device)[None], weights.tp_group)
    return out[0]
