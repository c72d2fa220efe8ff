"""Qwen3-VL in the proxy: per-head query/key norms, interleaved multimodal rotary and deepstack
features. The proxy's scores equal the gradient saliency taken through Hugging Face's own
Qwen3-VL text model."""

import pytest
import torch
import torch.nn.functional as F

from pio_fvlm_vllm.algorithm import DecoderLayerWeights, ImageContext, ProxyWeights
from pio_fvlm_vllm.algorithm.decoder import rotary_cos_sin
from pio_fvlm_vllm.algorithm.saliency import gradient_saliency

SECTION = (4, 2, 2)  # head_dim 16; height and width sections shorter than the temporal one
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 4, 2, 16, 50


def _hf_text_model(num_layers: int):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    config = Qwen3VLTextConfig(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=num_layers,
                               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                               vocab_size=VOCAB, rms_norm_eps=1e-6,
                               rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                "mrope_section": list(SECTION), "mrope_interleaved": True})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen3VLTextModel(config).double().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, mean=1.0 if p.ndim == 1 else 0.0, std=0.1 if p.ndim == 1 else 0.15)
    return model


def _proxy_from(model, lm_head: torch.Tensor) -> ProxyWeights:
    from pio_fvlm_vllm.vllm_ext.proxy_weights import decoder_shape

    layers = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(DecoderLayerWeights(
            input_norm=layer.input_layernorm.weight, q_proj=attn.q_proj.weight, k_proj=attn.k_proj.weight,
            v_proj=attn.v_proj.weight, o_proj=attn.o_proj.weight, post_norm=layer.post_attention_layernorm.weight,
            gate_proj=mlp.gate_proj.weight, up_proj=mlp.up_proj.weight, down_proj=mlp.down_proj.weight,
            q_norm=attn.q_norm.weight, k_norm=attn.k_norm.weight))
    return ProxyWeights(decoder_shape(model.config), layers, model.norm.weight.detach(), lm_head)


def _context(g, grid=(1, 6, 5), levels=3):
    n = grid[0] * grid[1] * grid[2]
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return ImageContext(rand(n, HIDDEN), rand(5, HIDDEN), rand(4, HIDDEN), grid=grid,
                        deepstack=rand(levels, n, HIDDEN) if levels else None)


def test_the_shape_reads_interleaved_sections_from_a_qwen3_vl_config():
    shape = _proxy_from(_hf_text_model(1), torch.zeros(VOCAB, HIDDEN)).shape
    assert shape.mrope_section == SECTION and shape.mrope_interleaved
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)


def test_interleaved_rotary_equals_hugging_faces_and_differs_from_sections_end_to_end():
    model = _hf_text_model(1)
    positions = _context(torch.Generator().manual_seed(1)).mrope_positions()  # (3, L)
    x = torch.zeros(1, positions.shape[1], HIDDEN, dtype=torch.float64)
    cos_hf, sin_hf = model.rotary_emb(x, positions[:, None])
    cos, sin = rotary_cos_sin(positions[None], HEAD_DIM, 5e6, torch.float64, SECTION, mrope_interleaved=True)
    assert torch.allclose(cos[:, 0], cos_hf) and torch.allclose(sin[:, 0], sin_hf)
    end_to_end, _ = rotary_cos_sin(positions[None], HEAD_DIM, 5e6, torch.float64, SECTION)
    assert not torch.allclose(end_to_end, cos)


def _hf_saliency(model, lm_head: torch.Tensor, ctx: ImageContext, num_layers: int) -> torch.Tensor:
    """||dL/dx_i|| at the input of the last layer, through Hugging Face's forward."""
    x = torch.cat([ctx.prefix_embeds, ctx.image_embeds, ctx.suffix_embeds])[None]
    start, n = ctx.prefix_embeds.shape[0], ctx.num_image_tokens
    visual = torch.zeros(1, x.shape[1], dtype=torch.bool)
    visual[0, start:start + n] = True
    captured = {}

    def leaf_input(module, args, kwargs):
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        return ((captured["x"], *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": captured["x"]})

    handle = model.layers[num_layers - 1].register_forward_pre_hook(leaf_input, with_kwargs=True)
    try:
        out = model(inputs_embeds=x, position_ids=ctx.mrope_positions()[:, None], visual_pos_masks=visual,
                    deepstack_visual_embeds=list(ctx.deepstack) if ctx.deepstack is not None else None)
    finally:
        handle.remove()
    logits = F.linear(out.last_hidden_state[0, -1], lm_head)
    loss = F.cross_entropy(logits[None], logits.argmax()[None].detach())
    (grad,) = torch.autograd.grad(loss, captured["x"])
    return grad[0, start:start + n].norm(dim=-1)


@pytest.mark.parametrize("levels", [3, 1, 0])
def test_scores_equal_the_saliency_taken_through_hugging_faces_qwen3_vl_text_model(levels):
    num_layers = 3  # K = 3: deepstack levels 0 and 1 reach the layer the gradient is taken at
    model = _hf_text_model(num_layers)
    # Small enough that the loss is not saturated: the scores are then well above rounding.
    lm_head = 0.05 * torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ctx = _context(torch.Generator().manual_seed(2), levels=levels)
    ours = gradient_saliency(_proxy_from(model, lm_head), [ctx], reduction="grad_norm").scores[0]
    expected = _hf_saliency(model, lm_head, ctx, num_layers)
    assert expected.min() > 1e-4
    assert torch.allclose(ours, expected, rtol=1e-6, atol=0), (ours - expected).abs().max()


def test_deepstack_changes_the_scores_and_batched_contexts_score_as_alone():
    model = _hf_text_model(3)
    proxy = _proxy_from(model, torch.randn(VOCAB, HIDDEN, dtype=torch.float64))
    g = torch.Generator().manual_seed(4)
    a, b = _context(g, grid=(1, 6, 5)), _context(g, grid=(1, 2, 4), levels=2)
    without = ImageContext(a.image_embeds, a.prefix_embeds, a.suffix_embeds, grid=a.grid)

    def scores(contexts):
        return gradient_saliency(proxy, contexts, reduction="grad_norm").scores

    assert not torch.allclose(scores([a]), scores([without]), rtol=1e-3, atol=0)
    together = scores([a, b])
    assert torch.allclose(together[0], scores([a])[0])
    assert torch.allclose(together[1, :8], scores([b])[0])
