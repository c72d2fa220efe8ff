"""Multimodal rotary in the proxy (Qwen2-VL / Qwen2.5-VL decoder layers): the positions of an
image context and one proxy layer agree with Hugging Face's Qwen2.5-VL text decoder."""

import pytest
import torch

from pio_fvlm_vllm.algorithm import DecoderLayerWeights, DecoderShape, ImageContext, ProxyWeights
from pio_fvlm_vllm.algorithm.decoder import decoder_layer, rotary_cos_sin
from pio_fvlm_vllm.algorithm.saliency import gradient_saliency

pytestmark = pytest.mark.vllm_seams

SECTION = (2, 3, 3)  # head_dim 16


def _hf_text_config():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

    config = Qwen2_5_VLTextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=50, rms_norm_eps=1e-6,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "mrope_section": list(SECTION)})
    config._attn_implementation = "eager"
    return config


def _context(g, grid=(1, 3, 4)):
    n = grid[0] * grid[1] * grid[2]
    return ImageContext(torch.randn(n, 64, generator=g, dtype=torch.float64),
                        torch.randn(5, 64, generator=g, dtype=torch.float64),
                        torch.randn(4, 64, generator=g, dtype=torch.float64), grid=grid)


def test_context_positions_number_text_image_cells_and_the_text_after():
    ctx = _context(torch.Generator().manual_seed(0), grid=(1, 3, 4))
    pos = ctx.mrope_positions()
    assert pos.shape == (3, 5 + 12 + 4)
    assert pos[:, :5].tolist() == [list(range(5))] * 3
    image = pos[:, 5:17]
    assert image[0].tolist() == [5] * 12  # one frame
    assert image[1].tolist() == [5 + r for r in range(3) for _ in range(4)]
    assert image[2].tolist() == [5 + c for _ in range(3) for c in range(4)]
    assert pos[:, 17:].tolist() == [list(range(9, 13))] * 3  # after the largest extent, 4
    with pytest.raises(ValueError, match="grid"):
        ImageContext(ctx.image_embeds, ctx.prefix_embeds, ctx.suffix_embeds, grid=(1, 2, 2)).mrope_positions()


def test_one_proxy_layer_equals_hugging_faces_qwen2_5_vl_decoder_layer():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLRotaryEmbedding

    torch.manual_seed(0)
    config = _hf_text_config()
    layer = Qwen2_5_VLDecoderLayer(config, 0).double().eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ctx = _context(torch.Generator().manual_seed(1))
    x = torch.cat([ctx.prefix_embeds, ctx.image_embeds, ctx.suffix_embeds])[None]
    positions = ctx.mrope_positions()  # (3, L)
    seq = x.shape[1]
    mask = torch.full((seq, seq), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    cos_hf, sin_hf = Qwen2_5_VLRotaryEmbedding(config)(x, positions[:, None])
    expected = layer(x, attention_mask=mask, position_embeddings=(cos_hf, sin_hf))

    attn, mlp = layer.self_attn, layer.mlp
    weights = DecoderLayerWeights(
        input_norm=layer.input_layernorm.weight, q_proj=attn.q_proj.weight, k_proj=attn.k_proj.weight,
        v_proj=attn.v_proj.weight, o_proj=attn.o_proj.weight, post_norm=layer.post_attention_layernorm.weight,
        gate_proj=mlp.gate_proj.weight, up_proj=mlp.up_proj.weight, down_proj=mlp.down_proj.weight,
        q_bias=attn.q_proj.bias, k_bias=attn.k_proj.bias, v_bias=attn.v_proj.bias)
    shape = DecoderShape(64, 4, 2, 16, 1e-6, 10000.0, mrope_section=SECTION)
    cos, sin = rotary_cos_sin(positions[None], 16, 10000.0, torch.float64, SECTION)
    assert torch.allclose(cos[:, 0], cos_hf) and torch.allclose(sin[:, 0], sin_hf)
    with torch.no_grad():
        ours = decoder_layer(x, weights, shape, cos, sin)
    assert (ours - expected).abs().max() < 1e-6, (ours - expected).abs().max()

    # The whole proxy runs on multimodal positions: the scores change with them.
    proxy = ProxyWeights(shape, [weights, weights], layer.post_attention_layernorm.weight.detach(),
                         torch.randn(50, 64, dtype=torch.float64))
    with torch.no_grad():
        plain = ProxyWeights(DecoderShape(64, 4, 2, 16, 1e-6, 10000.0), proxy.layers, proxy.final_norm, proxy.lm_head)
        multimodal = gradient_saliency(proxy, [ctx]).scores
        one_d = gradient_saliency(plain, [ctx]).scores
    assert multimodal.shape == one_d.shape == (1, 12) and not torch.allclose(multimodal, one_d, rtol=1e-3, atol=0)


def test_batched_contexts_of_different_lengths_score_as_alone():
    g = torch.Generator().manual_seed(2)
    from tests.conftest import random_proxy

    base = random_proxy(hidden=64, heads=4, kv_heads=2, bias=True)
    proxy = ProxyWeights(DecoderShape(64, 4, 2, 16, 1e-6, 10000.0, mrope_section=SECTION), base.layers,
                         base.final_norm, base.lm_head)
    a, b = _context(g, grid=(1, 3, 4)), _context(g, grid=(1, 2, 2))
    together = gradient_saliency(proxy, [a, b]).scores
    assert torch.allclose(together[0, :12], gradient_saliency(proxy, [a]).scores[0])
    assert torch.allclose(together[1, :4], gradient_saliency(proxy, [b]).scores[0, :4])


def test_the_proxy_shape_reads_the_sections_of_a_qwen_config_and_none_of_a_llama_one():
    from transformers import LlamaConfig

    from pio_fvlm_vllm.vllm_ext.proxy_weights import decoder_shape

    assert decoder_shape(_hf_text_config()).mrope_section == SECTION
    assert decoder_shape(LlamaConfig(hidden_size=64, num_attention_heads=4)).mrope_section is None


def _stock_qwen_positions(num_tokens, images):
    """vLLM's own Qwen2.5-VL `get_mrope_input_positions` for unpruned images [(offset, (t, H, W))]."""
    from types import SimpleNamespace

    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as Qwen

    features = [SimpleNamespace(mm_position=SimpleNamespace(offset=offset), modality="image",
                                data={"image_grid_thw": SimpleNamespace(data=torch.tensor(thw))})
                for offset, thw in images]
    model = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2,
                                                                                 tokens_per_second=2)))
    model.iter_mm_grid_thw = lambda feats: Qwen.iter_mm_grid_thw(model, feats)
    return Qwen.get_mrope_input_positions(model, list(range(num_tokens)), features)


def test_layout_equals_vllms_qwen_positions_unpruned_and_keeps_them_when_pruned():
    from pio_fvlm_vllm.positions import GridSpan, mrope_layout

    length = 5 + 24 + 3 + 30 + 7
    stock, stock_delta = _stock_qwen_positions(length, [(5, (1, 8, 12)), (32, (1, 20, 6))])
    ours, bases, delta = mrope_layout(length, [GridSpan(5, 24, (1, 4, 6)), GridSpan(32, 30, (1, 10, 3))])
    assert torch.equal(ours, stock) and delta == stock_delta and bases == [5, 14]
    # The first image keeps 5 of its 24 tokens: every text token keeps its position, the
    # second image its base, and decode continues where the unpruned prompt's would.
    pruned, pruned_bases, pruned_delta = mrope_layout(length - 19, [GridSpan(5, 5, (1, 4, 6)),
                                                                    GridSpan(13, 30, (1, 10, 3))])
    served = torch.cat([torch.arange(5), torch.arange(5, 10), torch.arange(29, length)])
    text = torch.cat([torch.arange(5), torch.arange(10, length - 19)])
    assert torch.equal(pruned[:, text], stock[:, served[text]])
    assert pruned_bases == bases and (length - 19) + pruned_delta == length + stock_delta


def test_hook_rows_carry_kept_cells_and_recompute_restores_them_in_any_dtype():
    from pio_fvlm_vllm.positions import GridSpan, mrope_layout
    from pio_fvlm_vllm.vllm_ext.context import PromptContext
    from pio_fvlm_vllm.vllm_ext.families.qwen_vl import MultimodalRotaryHook

    grid, kept = (1, 4, 6), torch.tensor([0, 7, 23])
    positions, bases, _ = mrope_layout(20, [GridSpan(5, 3, grid)])
    ctx = PromptContext(3, 24, 5, bases[0], -1, [1] * 5, [2] * 12)
    hook = MultimodalRotaryHook(hidden_size=8, merge_size=2)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rows = hook.rows(torch.zeros(3, 8, dtype=dtype), kept, ctx, None, grid)
        (stripped,), fixed, delta = hook.recompute([rows], positions)
        assert stripped.shape == (3, 8)
        assert fixed[:, 5:8].tolist() == [[5, 5, 5], [5, 6, 8], [5, 6, 10]]  # base + (t, h, w) cells
        assert torch.equal(fixed[:, :5], positions[:, :5]) and torch.equal(fixed[:, 8:], positions[:, 8:])
        assert delta == int(positions.max()) + 1 - 20
