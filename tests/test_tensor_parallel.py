"""The proxy's backward through tensor-parallel shards, on 2 gloo processes."""

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pio_fvlm_vllm.algorithm import DecoderLayerWeights, DecoderShape, ProxyWeights, gradient_saliency

from .conftest import random_proxy
from .test_algorithm import _context

WORLD = 2


def shard(full: ProxyWeights, rank: int, world: int, group) -> ProxyWeights:
    """Megatron-style shards, as vLLM cuts them: heads and MLP columns per rank, o/down rows."""
    s = full.shape
    hd, h_per, kv_per = s.head_dim, s.num_heads // world, s.num_kv_heads // world
    inter_per = full.layers[0].gate_proj.shape[0] // world

    def rows(t, per):
        return t[rank * per:(rank + 1) * per]

    def cols(t, per):
        return t[:, rank * per:(rank + 1) * per]

    layers = [DecoderLayerWeights(
        input_norm=w.input_norm, post_norm=w.post_norm,
        q_proj=rows(w.q_proj, h_per * hd), k_proj=rows(w.k_proj, kv_per * hd), v_proj=rows(w.v_proj, kv_per * hd),
        o_proj=cols(w.o_proj, h_per * hd), gate_proj=rows(w.gate_proj, inter_per),
        up_proj=rows(w.up_proj, inter_per), down_proj=cols(w.down_proj, inter_per),
        q_norm=w.q_norm, k_norm=w.k_norm) for w in full.layers]  # per-head norms: every rank holds them whole
    shape = dataclasses.replace(s, num_heads=h_per, num_kv_heads=kv_per)
    return ProxyWeights(shape, layers, full.final_norm, full.lm_head, tp_group=group)


def _qwen3_proxy() -> ProxyWeights:
    """random_proxy with Qwen3-VL's pieces: per-head query/key norms, interleaved multimodal rotary."""
    base = random_proxy()
    g = torch.Generator().manual_seed(3)
    layers = [dataclasses.replace(w, q_norm=1 + 0.1 * torch.randn(8, generator=g, dtype=torch.float64),
                                  k_norm=1 + 0.1 * torch.randn(8, generator=g, dtype=torch.float64))
              for w in base.layers]
    shape = dataclasses.replace(base.shape, mrope_section=(2, 1, 1), mrope_interleaved=True)
    return ProxyWeights(shape, layers, base.final_norm, base.lm_head)


def _qwen3_context(n: int, grid, seed: int):
    ctx = _context(n=n, seed=seed)
    deepstack = torch.randn(3, n, ctx.image_embeds.shape[1], generator=torch.Generator().manual_seed(seed),
                            dtype=ctx.image_embeds.dtype)
    return dataclasses.replace(ctx, grid=grid, deepstack=deepstack)


FAMILIES = {
    "llama": (random_proxy, lambda: [_context(seed=7), _context(n=9, seed=8)]),
    "qwen3-vl": (_qwen3_proxy, lambda: [_qwen3_context(12, (1, 3, 4), 7), _qwen3_context(9, (1, 3, 3), 8)]),
}


_HANDOFF_ROWS = torch.tensor([2, 4, 7, 10])


def _reduction(backprop_layers: int) -> str:
    # The default (gradient at layer K's normed input) is layer-local only.
    return "grad_x_normed" if backprop_layers == 1 else "grad_x_input"


def _worker(rank, port, backprop_layers, family, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        make_proxy, make_contexts = FAMILIES[family]
        proxy = shard(make_proxy(), rank, WORLD, dist.group.WORLD)
        sal = gradient_saliency(proxy, make_contexts(), backprop_layers=backprop_layers,
                                reduction=_reduction(backprop_layers), handoff_layer=proxy.num_layers
                                - backprop_layers + 1)
        handoff = [h.output_at(proxy, _HANDOFF_ROWS).tolist() for h in sal.handoff_inputs]
        # Plain values: a tensor would travel by a file descriptor this process may close first.
        queue.put((rank, (sal.scores.tolist(), handoff)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backprop_layers, family", [(1, "llama"), (2, "llama"), (1, "qwen3-vl")])
def test_sharded_saliency_equals_single_process(backprop_layers, family):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, backprop_layers, family, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    make_proxy, make_contexts = FAMILIES[family]
    proxy = make_proxy()
    sal = gradient_saliency(proxy, make_contexts(), backprop_layers=backprop_layers,
                            reduction=_reduction(backprop_layers), handoff_layer=proxy.num_layers - backprop_layers + 1)
    expected = sal.scores
    for rank in range(WORLD):
        scores, handoff = results[rank]
        torch.testing.assert_close(torch.tensor(scores, dtype=expected.dtype), expected, rtol=1e-9, atol=1e-12)
        # The hand-off layer's output at the handed-off rows, from each rank's shards.
        for states, h in zip(handoff, sal.handoff_inputs):
            torch.testing.assert_close(torch.tensor(states, dtype=expected.dtype), h.output_at(proxy, _HANDOFF_ROWS),
                                       rtol=1e-9, atol=1e-12)


def _agreement_worker(rank, port, failing_rank, phase, queue):
    """Rank `failing_rank` fails alone: its inputs (`prepare`), its budgets (`budget`), both
    before the proxy's collectives, or its NMS (`nms`), after them."""
    import sys

    from pio_fvlm_vllm.algorithm import Selection, select_on_every_rank, uniform_stride
    from pio_fvlm_vllm.settings import PioFvlmSettings

    if rank == failing_rank and phase == "nms":
        def broken_nms(*args, **kwargs):
            raise RuntimeError("this rank's NMS failed")

        sys.modules["pio_fvlm_vllm.algorithm.select"].nms_select = broken_nms

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        proxy = shard(random_proxy(), rank, WORLD, dist.group.WORLD)
        contexts = [_context(seed=7), _context(n=9, seed=8)]
        budgets = [3, 2]

        def prepare():
            if rank == failing_rank and phase == "prepare":
                raise RuntimeError("this rank's inputs failed")
            return contexts

        settings = PioFvlmSettings()
        if rank == failing_rank and phase == "budget":
            budgets = [3, 99]  # more than the image has
        selection, failed = select_on_every_rank(
            proxy, prepare, budgets, settings,
            fallback=lambda: Selection([uniform_stride(c.num_image_tokens, k) for c, k in zip(contexts, [3, 2])],
                                       [None, None]))
        queue.put((rank, failed, [k.tolist() for k in selection.kept]))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("failing_rank, phase", [(None, None), (1, "prepare"), (0, "budget"), (1, "nms")])
def test_a_failure_on_one_rank_sends_every_rank_to_the_fallback(failing_rank, phase):
    """No rank is left waiting in a collective, and all ranks serve the same tokens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_agreement_worker, args=(r, port, failing_rank, phase, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = dict((r, (f, k)) for r, f, k in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    failed, kept = results[0]
    assert failed == (failing_rank is not None)
    if failed:
        assert kept == [[0, 6, 11], [0, 8]]  # the fallback's uniform stride over 12 and 9 tokens
