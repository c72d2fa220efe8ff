"""The mathematics of the selection, on real PyTorch autograd."""

import pytest
import torch

from pio_fvlm_vllm.algorithm import (
    ImageContext, gradient_saliency, nms_select, select_tokens, visionzip_compress,
)
from pio_fvlm_vllm.algorithm.decoder import decoder_layer, decoder_layer_at, rms_norm, rotary_cos_sin
from pio_fvlm_vllm.algorithm.saliency import proxy_loss
from pio_fvlm_vllm.settings import PioFvlmSettings



def _context(n=12, p=3, s=5, dim=32, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return ImageContext(
        image_embeds=torch.randn(n, dim, generator=g, dtype=dtype),
        prefix_embeds=torch.randn(p, dim, generator=g, dtype=dtype),
        suffix_embeds=torch.randn(s, dim, generator=g, dtype=dtype),
    )


def _loss_from_layer_input(proxy, ctx, h_in, loss_kind):
    """Loss as a function of the input of the last proxy layer (layer-local backward)."""
    seq = h_in.shape[1]
    cos, sin = rotary_cos_sin(torch.arange(seq)[None], proxy.shape.head_dim, proxy.shape.rope_theta, h_in.dtype)
    out = decoder_layer(h_in, proxy.layers[-1], proxy.shape, cos, sin)
    return proxy_loss(out[:, -1], proxy, loss_kind)


def _layer_input(proxy, ctx):
    x = torch.cat([ctx.prefix_embeds, ctx.image_embeds, ctx.suffix_embeds])[None]
    cos, sin = rotary_cos_sin(torch.arange(x.shape[1])[None], proxy.shape.head_dim, proxy.shape.rope_theta, x.dtype)
    for w in proxy.layers[:-1]:
        x = decoder_layer(x, w, proxy.shape, cos, sin)
    return x


def _loss_from_normed(proxy, ctx, h_in, normed, loss_kind):
    """Loss as a function of the last proxy layer's normed input (its keys' and values' source)."""
    seq = h_in.shape[1]
    cos, sin = rotary_cos_sin(torch.arange(seq)[None], proxy.shape.head_dim, proxy.shape.rope_theta, h_in.dtype)
    out = decoder_layer_at(h_in, proxy.layers[-1], proxy.shape, cos, sin, torch.tensor([[seq - 1]]), normed=normed)
    return proxy_loss(out[:, 0], proxy, loss_kind)


@pytest.mark.parametrize("loss_kind", ["logit_lens", "state"])
def test_grad_x_normed_matches_finite_differences(proxy, loss_kind):
    """|<dL/dn_i, n_i>|: the loss's rate of change as token i's normed input to layer K (what
    its key and value are read from) is scaled, d/dt L(n + t e_i n_i) at t = 0."""
    ctx = _context()
    sal = gradient_saliency(proxy, [ctx], loss_kind=loss_kind, reduction="grad_x_normed")
    h = _layer_input(proxy, ctx).detach()
    normed = rms_norm(h, proxy.layers[-1].input_norm, proxy.shape.rms_norm_eps)
    start = ctx.prefix_embeds.shape[0]
    eps = 1e-5
    for i in range(ctx.num_image_tokens):
        bump = torch.zeros_like(normed)
        bump[0, start + i] = normed[0, start + i]
        lp = _loss_from_normed(proxy, ctx, h, normed + eps * bump, loss_kind)
        lm = _loss_from_normed(proxy, ctx, h, normed - eps * bump, loss_kind)
        fd = ((lp - lm) / (2 * eps)).abs().item()
        assert fd > 1e-6
        assert sal.scores[0, i].item() == pytest.approx(fd, rel=1e-5)


def test_grad_x_input_is_only_the_rms_norm_epsilon():
    """A token reaches layer K's attention through a scale-invariant RMSNorm: |<dL/dx_i, x_i>|
    vanishes without the norm's epsilon, while the normed-input score does not."""
    import dataclasses

    from tests.conftest import random_proxy

    base = random_proxy()
    no_eps = type(base)(dataclasses.replace(base.shape, rms_norm_eps=0.0), base.layers, base.final_norm, base.lm_head)
    ctx = _context()
    size = gradient_saliency(no_eps, [ctx], reduction="grad_norm").scores[0] * _layer_input(no_eps, ctx)[
        0, 3:3 + ctx.num_image_tokens].norm(dim=-1)  # ||g_i|| ||x_i||
    assert (gradient_saliency(no_eps, [ctx], reduction="grad_x_input").scores[0] < 1e-12 * size).all()
    assert (gradient_saliency(no_eps, [ctx], reduction="grad_x_normed").scores[0] > 1e-6 * size).all()


def test_grad_norm_reduction_matches_autograd(proxy):
    ctx = _context()
    sal = gradient_saliency(proxy, [ctx], reduction="grad_norm")
    h = _layer_input(proxy, ctx).detach().requires_grad_(True)
    loss = _loss_from_layer_input(proxy, ctx, h, "logit_lens")
    (g,) = torch.autograd.grad(loss, h)
    start = ctx.prefix_embeds.shape[0]
    expected = g[0, start:start + ctx.num_image_tokens].norm(dim=-1)
    torch.testing.assert_close(sal.scores[0, :ctx.num_image_tokens], expected)


def test_batched_saliency_equals_one_at_a_time(proxy):
    contexts = [_context(n=12, p=3, s=5, seed=1), _context(n=7, p=1, s=9, seed=2), _context(n=20, p=6, s=2, seed=3)]
    batched = gradient_saliency(proxy, contexts)
    for b, ctx in enumerate(contexts):
        alone = gradient_saliency(proxy, [ctx])
        n = ctx.num_image_tokens
        torch.testing.assert_close(batched.scores[b, :n], alone.scores[0, :n], rtol=1e-9, atol=1e-12)
        assert torch.isinf(batched.scores[b, n:]).all()


def test_full_backprop_differs_from_layer_local(proxy):
    ctx = _context()
    local = gradient_saliency(proxy, [ctx], backprop_layers=1).scores
    full = gradient_saliency(proxy, [ctx], backprop_layers=2, reduction="grad_x_input").scores
    assert not torch.allclose(local, full)
    with pytest.raises(ValueError, match="backprop_layers must be in"):
        gradient_saliency(proxy, [ctx], backprop_layers=3)


def test_nms_drops_near_duplicates_that_topk_keeps():
    # Tokens 0 and 1 are near-identical and the two most salient; token 2 is distinct.
    features = torch.tensor([[[1.0, 0.0, 0.0], [0.999, 0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    scores = torch.tensor([[0.9, 0.8, 0.5, 0.1]])
    (topk,) = nms_select(scores, features, [2], threshold=1.0)
    (nms,) = nms_select(scores, features, [2], threshold=0.9)
    assert topk.tolist() == [0, 1]
    assert nms.tolist() == [0, 2]


def test_nms_fills_budget_from_suppressed_in_saliency_order():
    features = torch.ones(1, 5, 4)  # all identical: everything after the first is suppressed
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2]])
    (kept,) = nms_select(scores, features, [3], threshold=0.5)
    assert kept.tolist() == [1, 2, 3]


def test_nms_exact_count_sorted_and_padding_ignored():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 50, generator=g)
    scores[1, 30:] = float("-inf")
    features = torch.randn(3, 50, 8, generator=g)
    kept = nms_select(scores, features, [10, 30, 1], threshold=0.3)
    assert [k.numel() for k in kept] == [10, 30, 1]
    for k in kept:
        assert torch.equal(k, k.sort().values) and k.unique().numel() == k.numel()
    assert kept[1].max() < 30
    with pytest.raises(ValueError, match="outside"):
        nms_select(scores, features, [10, 31, 1], threshold=0.3)


def test_select_tokens_exact_ordered_deterministic(proxy):
    settings = PioFvlmSettings(nms_threshold=0.5)
    contexts = [_context(n=40, seed=4), _context(n=25, seed=5)]
    first = select_tokens(proxy, contexts, [5, 25], settings)
    second = select_tokens(proxy, contexts, [5, 25], settings)
    assert first[0].numel() == 5 and torch.equal(first[0], first[0].sort().values)
    assert torch.equal(first[1], torch.arange(25))  # keep all: no proxy, identity
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(ValueError, match="budget for image 0"):
        select_tokens(proxy, contexts, [0, 3], settings)


def test_single_token_image(proxy):
    ctx = _context(n=1)
    (kept,) = select_tokens(proxy, [ctx], [1], PioFvlmSettings())
    assert kept.tolist() == [0]


def test_different_questions_move_the_selection(proxy):
    base = _context(n=60, seed=6)
    g = torch.Generator().manual_seed(99)
    other = ImageContext(base.image_embeds, base.prefix_embeds,
                         torch.randn(5, 32, generator=g, dtype=torch.float64))
    settings = PioFvlmSettings(nms_threshold=1.0)
    (a,) = select_tokens(proxy, [base], [8], settings)
    (b,) = select_tokens(proxy, [other], [8], settings)
    assert not torch.equal(a, b)


def test_visionzip_dominant_and_contextual():
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(20, 6, generator=g)
    importance = torch.arange(20, dtype=torch.float32)
    out = visionzip_compress(embeds, importance, embeds, num_dominant=5, num_contextual=3)
    assert out.dominant.tolist() == [15, 16, 17, 18, 19]
    assert out.embeds.shape == (8, 6)
    torch.testing.assert_close(out.embeds[:5], embeds[15:])
    # With one contextual token, it is the mean of everything not kept as dominant.
    single = visionzip_compress(embeds, importance, embeds, num_dominant=5, num_contextual=1)
    torch.testing.assert_close(single.embeds[5], embeds[:15].mean(0))
    # Contextual tokens are means of disjoint groups of the remainder: never outside its hull.
    lo, hi = embeds[:15].min(0).values, embeds[:15].max(0).values
    assert ((out.embeds[5:] >= lo - 1e-6) & (out.embeds[5:] <= hi + 1e-6)).all()


@pytest.mark.parametrize("bias", [False, True])
def test_layer_at_several_positions_equals_full_layer_there(bias):
    """Values folded into attention-pooled inputs: same outputs and input gradients, GQA and biases."""
    from pio_fvlm_vllm.algorithm.decoder import decoder_layer_at
    from pio_fvlm_vllm.algorithm.saliency import _pack, loss_rows

    from .conftest import random_proxy

    proxy = random_proxy(bias=bias)
    contexts = [_context(n=12, seed=1), _context(n=5, p=1, s=2, seed=2)]
    x, lengths = _pack(contexts, torch.float64)
    cos, sin = rotary_cos_sin(torch.arange(x.shape[1]).expand(2, -1), proxy.shape.head_dim,
                              proxy.shape.rope_theta, x.dtype)
    at = loss_rows(lengths, "four_before_last", x.device)
    assert at.tolist() == [[15, 16, 17, 18], [3, 4, 5, 6]]
    x_full = x.clone().requires_grad_(True)
    full = decoder_layer(x_full, proxy.layers[0], proxy.shape, cos, sin)[torch.arange(2)[:, None], at]
    x_at = x.clone().requires_grad_(True)
    got = decoder_layer_at(x_at, proxy.layers[0], proxy.shape, cos, sin, at)
    torch.testing.assert_close(got, full)
    probe = torch.randn_like(full)
    (full * probe).sum().backward()
    (got * probe).sum().backward()
    torch.testing.assert_close(x_at.grad, x_full.grad)


def test_four_positions_loss_is_the_mean_over_those_positions(proxy):
    """The official loss: mean CE over S-5..S-2 of layer K, gradient at layer K's input."""
    ctx = _context()
    sal = gradient_saliency(proxy, [ctx], reduction="grad_norm", loss_positions="four_before_last")
    h = _layer_input(proxy, ctx).detach().requires_grad_(True)
    seq = h.shape[1]
    cos, sin = rotary_cos_sin(torch.arange(seq)[None], proxy.shape.head_dim, proxy.shape.rope_theta, h.dtype)
    out = decoder_layer(h, proxy.layers[-1], proxy.shape, cos, sin)
    loss = proxy_loss(out[0, seq - 5 : seq - 1], proxy, "logit_lens") / 4
    (g,) = torch.autograd.grad(loss, h)
    start = ctx.prefix_embeds.shape[0]
    torch.testing.assert_close(sal.scores[0, : ctx.num_image_tokens],
                               g[0, start : start + ctx.num_image_tokens].norm(dim=-1))


@pytest.mark.parametrize("layer", [1, 2])
def test_handoff_rows_take_the_full_sequence_state_after_layer_h(proxy, layer):
    """Layer h's output at a few rows, from the input the proxy left, is the unpruned
    sequence's state there after h layers (h = 2 = K: the layer the gradient flows through)."""
    ctxs = [_context(), _context(n=5, seed=3)]
    sal = gradient_saliency(proxy, ctxs, handoff_layer=layer)
    for ctx, handoff in zip(ctxs, sal.handoff_inputs):
        x = torch.cat([ctx.prefix_embeds, ctx.image_embeds, ctx.suffix_embeds])[None]
        cos, sin = rotary_cos_sin(torch.arange(x.shape[1])[None], proxy.shape.head_dim, proxy.shape.rope_theta,
                                  x.dtype)
        for w in proxy.layers[:layer]:
            x = decoder_layer(x, w, proxy.shape, cos, sin)
        rows = torch.tensor([3, 5, ctx.length - 2, ctx.length - 1])
        assert handoff.states.shape[0] == ctx.length and handoff.layer == layer - 1
        torch.testing.assert_close(handoff.output_at(proxy, rows), x[0, rows])
    with pytest.raises(ValueError, match=r"handoff_layer must be in \[0, 2\]"):
        gradient_saliency(proxy, ctxs[:1], handoff_layer=3)


def test_inclusive_nms_suppresses_at_exactly_the_threshold():
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    scores = torch.tensor([[3.0, 2.0, 1.0]])
    # Token 1 duplicates token 0 (similarity exactly 1.0): only >= suppresses it.
    assert nms_select(scores, features, [2], 1.0, inclusive=True)[0].tolist() == [0, 2]
    assert nms_select(scores, features, [2], 1.0)[0].tolist() == [0, 1]


def test_length_batches_cover_every_sequence_once_and_bound_the_padding():
    import random

    from pio_fvlm_vllm.algorithm.select import length_batches

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 3000) for _ in range(rng.randint(1, 12))]
        batches = length_batches(lengths, max_padding=0.1)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            longest = max(lengths[i] for i in b)
            assert len(b) == 1 or 1 - sum(lengths[i] for i in b) / (longest * len(b)) <= 0.1
    assert length_batches([2880, 2880, 1500, 2880]) == [[0, 1, 3], [2]]  # 12% padding with it
    assert length_batches([2880, 2880, 2160, 2880]) == [[0, 1, 3, 2]]  # 6%
    assert length_batches([100, 100, 100], max_padding=0.0) == [[0, 1, 2]]
    assert length_batches([100, 100, 100], max_batch=2) == [[0, 1], [2]]
    assert length_batches([100, 100, 100], max_batch=1) == [[0], [1], [2]]


def test_mixed_lengths_select_as_each_context_alone(proxy):
    from pio_fvlm_vllm.algorithm import ImageContext, select_tokens
    from pio_fvlm_vllm.settings import PioFvlmSettings

    g = torch.Generator().manual_seed(5)
    contexts = [ImageContext(torch.randn(n, 32, generator=g, dtype=torch.float64),
                             torch.randn(3, 32, generator=g, dtype=torch.float64),
                             torch.randn(4, 32, generator=g, dtype=torch.float64)) for n in (40, 12, 39, 25)]
    budgets = [5, 3, 6, 4]
    together = select_tokens(proxy, contexts, budgets, PioFvlmSettings())
    for ctx, k, kept in zip(contexts, budgets, together):
        assert torch.equal(kept, select_tokens(proxy, [ctx], [k], PioFvlmSettings())[0])


@pytest.mark.parametrize("variant", ["llama", "qkv_bias", "qk_norm_and_bias"])
@pytest.mark.parametrize("which", ["last", "four_before_last"])
def test_normed_input_products_equal_autograd_through_the_layer(variant, which):
    """The closed form of <dL/dn_i, n_i> (value, key and query paths) equals autograd through
    `decoder_layer_at` with the normed input as the leaf: GQA, q/k/v biases, per-head q/k norms,
    right-padded batches, and loss rows that fall on image tokens or repeat (a one-token prompt
    tail clamps four_before_last to position 0)."""
    import dataclasses

    from pio_fvlm_vllm.algorithm.decoder import normed_input_saliency_at
    from pio_fvlm_vllm.algorithm.saliency import _pack, loss_rows

    from .conftest import random_proxy

    proxy = random_proxy(bias=variant != "llama")
    layer = proxy.layers[-1]
    if variant == "qk_norm_and_bias":
        g = torch.Generator().manual_seed(7)
        head_dim = proxy.shape.head_dim
        layer = dataclasses.replace(layer, q_norm=1 + 0.3 * torch.randn(head_dim, generator=g, dtype=torch.float64),
                                    k_norm=1 + 0.3 * torch.randn(head_dim, generator=g, dtype=torch.float64))
    contexts = [_context(n=12, seed=1), _context(n=3, p=0, s=1, seed=2), _context(n=9, p=2, s=2, seed=3)]
    x, lengths = _pack(contexts, torch.float64)
    x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cos, sin = rotary_cos_sin(torch.arange(x.shape[1]).expand(len(contexts), -1), proxy.shape.head_dim,
                              proxy.shape.rope_theta, x.dtype)
    at = loss_rows(lengths, which, x.device)
    if which == "four_before_last":
        assert at[1].tolist() == [0, 0, 1, 2]  # a repeated row, and rows on the image

    def loss_of(states):
        return proxy_loss(states.flatten(0, 1), proxy, "logit_lens") / at.shape[1]

    got = normed_input_saliency_at(x, layer, proxy.shape, cos, sin, at, loss_of)
    normed = rms_norm(x, layer.input_norm, proxy.shape.rms_norm_eps).requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(decoder_layer_at(x, layer, proxy.shape, cos, sin, at, normed=normed)),
                                  normed)
    expected = (grad * normed.detach()).sum(-1)
    assert expected.abs().amax() > 1e-3
    for b, n in enumerate(lengths):  # padding rows: neither path reads them
        torch.testing.assert_close(got[b, :n], expected[b, :n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_stacked_qkv_projection_equals_the_three(bias):
    """vLLM holds q/k/v stacked; the layer then runs one product for the three."""
    import dataclasses

    from .conftest import random_proxy

    proxy = random_proxy(bias=bias)
    w = proxy.layers[0]
    # The separate projections zeroed: the layer must read the stacked ones.
    stacked = dataclasses.replace(w, q_proj=torch.zeros_like(w.q_proj), k_proj=torch.zeros_like(w.k_proj),
                                  v_proj=torch.zeros_like(w.v_proj),
                                  qkv_proj=torch.cat([w.q_proj, w.k_proj, w.v_proj]),
                                  qkv_bias=torch.cat([w.q_bias, w.k_bias, w.v_bias]) if bias else None)
    x = torch.randn(2, 9, proxy.shape.hidden_size, dtype=torch.float64)
    cos, sin = rotary_cos_sin(torch.arange(9).expand(2, -1), proxy.shape.head_dim, proxy.shape.rope_theta, x.dtype)
    torch.testing.assert_close(decoder_layer(x, stacked, proxy.shape, cos, sin),
                               decoder_layer(x, w, proxy.shape, cos, sin), rtol=1e-12, atol=1e-12)
