"""Differentiable copies of the proxy's weights, taken from a loaded vLLM Llama-family model.

vLLM fuses q/k/v and gate/up projections; the proxy wants them apart. On CPU the engine
repacks linear weights into oneDNN handles after loading and leaves empty tensors behind, so
the snapshot must be taken before that (see `weights.py`) and must own its memory;
on accelerators views of the engine's parameters suffice.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..algorithm.decoder import DecoderLayerWeights, DecoderShape, ProxyWeights


def _rope_theta(text_config) -> float:
    params = getattr(text_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(text_config, "rope_theta", None) or 10000.0)


def _mrope_params(text_config) -> dict:
    """The rope parameters that carry multimodal rotary sections (Qwen-VL families), or {}."""
    for params in (getattr(text_config, "rope_parameters", None), getattr(text_config, "rope_scaling", None)):
        if isinstance(params, dict) and params.get("mrope_section"):
            return params
    return {}


def _mrope_section(text_config) -> tuple[int, ...] | None:
    """The language model's multimodal rotary sections, None for plain rotary."""
    section = _mrope_params(text_config).get("mrope_section")
    return tuple(int(s) for s in section) if section else None


def decoder_shape(text_config) -> DecoderShape:
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return DecoderShape(
        hidden_size=text_config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=getattr(text_config, "rms_norm_eps", 1e-5),
        rope_theta=_rope_theta(text_config),
        mrope_section=_mrope_section(text_config),
        mrope_interleaved=bool(_mrope_params(text_config).get("mrope_interleaved", False)),
    )


def _take(t: torch.Tensor, copy: bool) -> torch.Tensor:
    t = t.detach()
    return t.clone() if copy else t


def _norm_weight(attn: nn.Module, name: str, copy: bool) -> torch.Tensor | None:
    """A per-head query/key norm's weight (Qwen3 attention), None where the layer has none."""
    norm = getattr(attn, name, None)
    return None if norm is None else _take(norm.weight, copy)


def _gather_vocab(weight: torch.Tensor, vocab_size: int, group) -> torch.Tensor:
    """The whole LM head from its vocabulary-parallel shards (padding rows dropped)."""
    shards = [torch.empty_like(weight) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(shards, weight.contiguous(), group=group)
    return torch.cat(shards)[:vocab_size]


def snapshot_proxy_weights(
    language_model: nn.Module, text_config, num_layers: int, *, copy: bool, tp_group=None
) -> ProxyWeights:
    """The first `num_layers` decoder layers, the final norm and the LM head of a vLLM
    LlamaForCausalLM-style module (`.model.layers`, `.model.norm`, `.lm_head`).

    Under tensor parallelism (`tp_group` given) the layers are this rank's shards, as the
    engine holds them, and the LM head is gathered whole on every rank.
    """
    shape = decoder_shape(text_config)
    first_attn = language_model.model.layers[0].self_attn
    shape = dataclasses.replace(shape, num_heads=first_attn.num_heads, num_kv_heads=first_attn.num_kv_heads,
                                head_dim=first_attn.head_dim)
    q_size = shape.num_heads * shape.head_dim
    kv_size = shape.num_kv_heads * shape.head_dim
    layers = []
    with torch.inference_mode(False), torch.no_grad():
        for layer in language_model.model.layers[:num_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _take(attn.qkv_proj.weight, copy)
            q, k, v = qkv.split([q_size, kv_size, kv_size])
            qkv_bias = getattr(attn.qkv_proj, "bias", None)
            qb = kb = vb = None
            if qkv_bias is not None:
                qkv_bias = _take(qkv_bias, copy)
                qb, kb, vb = qkv_bias.split([q_size, kv_size, kv_size])
            gate, up = _take(mlp.gate_up_proj.weight, copy).chunk(2)
            layers.append(
                DecoderLayerWeights(
                    input_norm=_take(layer.input_layernorm.weight, copy),
                    q_proj=q, k_proj=k, v_proj=v,
                    o_proj=_take(attn.o_proj.weight, copy),
                    post_norm=_take(layer.post_attention_layernorm.weight, copy),
                    gate_proj=gate, up_proj=up,
                    down_proj=_take(mlp.down_proj.weight, copy),
                    q_bias=qb, k_bias=kb, v_bias=vb,
                    q_norm=_norm_weight(attn, "q_norm", copy), k_norm=_norm_weight(attn, "k_norm", copy),
                    qkv_proj=qkv, qkv_bias=qkv_bias,
                )
            )
        lm_head = language_model.lm_head.weight
        if tp_group is not None:
            lm_head = _gather_vocab(lm_head, text_config.vocab_size, tp_group)
        return ProxyWeights(
            shape=shape,
            layers=layers,
            final_norm=_take(language_model.model.norm.weight, copy),
            lm_head=_take(lm_head, copy),
            tp_group=tp_group,
        )
