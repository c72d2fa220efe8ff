"""Cost of the PIO-FVLM selection pass against a full prefill, at the algorithm level.

    python -m benchmarks.selection_cost --shape small --n 576 1152 2880 --k 1 2 4
    python -m benchmarks.selection_cost --shape 7b --n 2880 --k 2 --device cuda --dtype bfloat16

Random weights of the chosen shape; the prefill runs the same pure-PyTorch decoder layers
(SDPA or flash-attn) without autograd over [image tokens + text], the selection is the real
`select_tokens` (proxy forward through K layers, layer-local backward, NMS), also split into
its saliency and NMS parts, with the number of tensor ops one NMS call issues (each one a
kernel launch on a GPU). The configurations are timed in turn within each repeat, so a
machine whose speed drifts slows them alike; each gets its best time. One full layer (the full
prefill over the depth) is the selection's floor at K = 2: layer K's scores read, and the
hand-off takes, the states after the first layer at every position of the prompt. With
`--layers-measured M`, the full prefill is M layers timed and scaled to the model's depth
(for shapes too slow to run whole on a CPU); the table says which.
"""

from __future__ import annotations

import argparse
import time

import torch

from torch.utils._python_dispatch import TorchDispatchMode

from pio_fvlm_vllm.algorithm import (DecoderLayerWeights, DecoderShape, ImageContext, ProxyWeights, gradient_saliency,
                                     nms_select, select_tokens)
from pio_fvlm_vllm.algorithm.decoder import decoder_layer, rotary_cos_sin
from pio_fvlm_vllm.budget import budget
from pio_fvlm_vllm.settings import PioFvlmSettings

from .common import BenchmarkParser, progress, write_result

SHAPES = {
    # hidden, heads, kv heads, intermediate, layers, vocab
    "7b": (4096, 32, 32, 11008, 32, 32064),
    "small": (512, 8, 8, 1376, 32, 4032),
}


def random_weights(shape_name: str, num_layers: int, device, dtype) -> ProxyWeights:
    hidden, heads, kv, inter, _, vocab = SHAPES[shape_name]
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(device, dtype)

    hd = hidden // heads

    def layer() -> DecoderLayerWeights:
        qkv = r((heads + 2 * kv) * hd, hidden)  # stacked, as vLLM holds it
        q, k, v = qkv.split([heads * hd, kv * hd, kv * hd])
        return DecoderLayerWeights(
            input_norm=torch.ones(hidden, device=device, dtype=dtype), q_proj=q, k_proj=k, v_proj=v,
            o_proj=r(hidden, heads * hd), post_norm=torch.ones(hidden, device=device, dtype=dtype),
            gate_proj=r(inter, hidden), up_proj=r(inter, hidden), down_proj=r(hidden, inter), qkv_proj=qkv)

    layers = [layer() for _ in range(num_layers)]
    return ProxyWeights(DecoderShape(hidden, heads, kv, hd), layers,
                        torch.ones(hidden, device=device, dtype=dtype), r(vocab, hidden))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_in_turn(fns: dict, device, repeats) -> dict:
    """Best time of each callable, running them in turn within every repeat."""
    for fn in fns.values():
        fn()  # warm-up
    _sync(device)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the context (each is a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def prefill(weights: ProxyWeights, x: torch.Tensor, layers: int) -> torch.Tensor:
    cos, sin = rotary_cos_sin(torch.arange(x.shape[1], device=x.device)[None], weights.shape.head_dim,
                              weights.shape.rope_theta, x.dtype)
    for i in range(layers):
        x = decoder_layer(x, weights.layers[i % weights.num_layers], weights.shape, cos, sin)
    return x


def main(argv=None):
    p = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--n", type=int, nargs="+", default=[576, 1152, 2880], help="image tokens")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="proxy layers K")
    p.add_argument("--keep", type=float, default=0.111)
    p.add_argument("--text", type=int, default=64, help="text tokens around the image")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers-measured", type=int, default=None,
                   help="time this many prefill layers and scale to the full depth")
    p.add_argument("--mixed", type=int, nargs="*", default=[2340, 2328, 2928, 2376, 2340, 2340, 2328, 2928],
                   help="image tokens of one engine step's images (default: the serving benchmark's sizes "
                        "at concurrency 8), selected together at K = the default proxy layer")
    p.add_argument("--out", default=None, help="results file name in benchmarks/results/")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    depth = SHAPES[args.shape][4]
    measured = args.layers_measured or depth
    weights = random_weights(args.shape, max(max(args.k), min(measured, depth)), device, dtype)
    hidden = SHAPES[args.shape][0]

    results = []
    settings = PioFvlmSettings()
    for n in args.n:
        g = torch.Generator(device="cpu").manual_seed(n)
        image = torch.randn(n, hidden, generator=g).to(device, dtype)
        text = torch.randn(args.text, hidden, generator=g).to(device, dtype)
        ctx = ImageContext(image, text[: args.text // 4], text[args.text // 4:])
        k_keep = budget(n, args.keep)
        full_x = torch.cat([ctx.prefix_embeds, image, ctx.suffix_embeds])[None]
        pruned_x = torch.cat([ctx.prefix_embeds, image[:k_keep], ctx.suffix_embeds])[None]
        for k in args.k:
            proxy = ProxyWeights(weights.shape, weights.layers[:k], weights.final_norm, weights.lm_head)
            sal = gradient_saliency(proxy, [ctx], backprop_layers=settings.backprop_layers)

            def nms():
                return nms_select(sal.scores, sal.features, [k_keep], settings.nms_threshold,
                                  inclusive=settings.nms_inclusive)

            # The hand-off after layer K: layer K's output at the kept rows and the text after
            # the image, from the input the proxy pass leaves (what the served model takes over).
            handoff = gradient_saliency(proxy, [ctx], backprop_layers=settings.backprop_layers,
                                        handoff_layer=k).handoff_inputs[0]
            start = ctx.prefix_embeds.shape[0]
            rows = torch.cat([start + torch.arange(k_keep) * (n // k_keep),
                              torch.arange(start + n, ctx.length)])

            with OpCounter() as ops:
                nms()
            progress(f"n={n} K={k}: prefills ({measured} of {depth} layers), selection, saliency, NMS")
            t = timed_in_turn({
                "full": lambda: prefill(weights, full_x, measured),
                "pruned": lambda: prefill(weights, pruned_x, measured),
                "selection": lambda: select_tokens(proxy, [ctx], [k_keep], settings),
                "saliency": lambda: gradient_saliency(proxy, [ctx], backprop_layers=settings.backprop_layers),
                "nms": nms,
                "handoff": lambda: handoff.output_at(proxy, rows),
            }, device, args.repeats)
            scale = depth / measured
            results.append((n, k, k_keep, t["full"] * scale, t["pruned"] * scale, t["selection"], t["saliency"],
                            t["nms"], ops.count, t["handoff"]))

    mixed_lines = _mixed_batch(args, weights, hidden, device, dtype, settings) if args.mixed else []

    scaled = "" if measured == depth else f" (each prefill: {measured} layers timed, scaled to {depth})"
    lines = [f"Shape `{args.shape}` ({depth} layers, hidden {hidden}), {args.dtype} on {args.device}, "
             f"{args.text} text tokens, keep {args.keep}; best of {args.repeats}{scaled}.", "",
             "| image tokens n | K | kept | full prefill s | pruned prefill s | selection s | saliency s | "
             "NMS s | NMS tensor ops | NMS / selection | selection / full | selection / pruned | "
             "one full layer / pruned | selection / one full layer | "
             "(pruned + selection) speed-up | free-selection speed-up | hand-off after layer K s | "
             "hand-off / selection |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, k, kept, tf, tp, ts, tsal, tnms, ops, th in results:
        lines.append(f"| {n} | {k} | {kept} | {tf:.3f} | {tp:.3f} | {ts:.3f} | {tsal:.3f} | {tnms * 1e3:.1f} ms | "
                     f"{ops} | {tnms / ts:.1%} | {ts / tf:.1%} | {ts / tp:.1%} | {tf / depth / tp:.1%} | "
                     f"{ts / (tf / depth):.2f}x | {tf / (tp + ts):.2f}x | "
                     f"{tf / tp:.2f}x | {th:.4f} | {th / ts:.1%} |")
    body = "\n".join(lines + mixed_lines)
    print(body)
    write_result(args.out or f"selection_cost_{args.shape}_{args.device}.md", "Selection cost vs prefill", body)


def _mixed_batch(args, weights: ProxyWeights, hidden: int, device, dtype, settings) -> list[str]:
    """One engine step's images of different sizes: one padded proxy batch, length batches
    (what `select` forms on an accelerator), and one image at a time (what it does on a CPU)."""
    from pio_fvlm_vllm.algorithm.select import length_batches
    from pio_fvlm_vllm.settings import default_proxy_layer

    k = default_proxy_layer(SHAPES[args.shape][4])
    proxy = ProxyWeights(weights.shape, weights.layers[:k], weights.final_norm, weights.lm_head)
    g = torch.Generator(device="cpu").manual_seed(0)
    contexts = [ImageContext(torch.randn(n, hidden, generator=g).to(device, dtype),
                             torch.randn(args.text // 4, hidden, generator=g).to(device, dtype),
                             torch.randn(args.text - args.text // 4, hidden, generator=g).to(device, dtype))
                for n in args.mixed]
    budgets = [budget(n, args.keep) for n in args.mixed]

    def padded():
        sal = gradient_saliency(proxy, contexts, backprop_layers=settings.backprop_layers,
                                reduction=settings.saliency)
        return nms_select(sal.scores, sal.features, budgets, settings.nms_threshold, inclusive=settings.nms_inclusive)

    progress(f"{len(contexts)} images of {sorted(set(args.mixed))} tokens: padded, length batches, one at a time")
    groups = length_batches([c.length for c in contexts])

    def batches():
        for group in groups:
            sub = [contexts[i] for i in group]
            sal = gradient_saliency(proxy, sub, backprop_layers=settings.backprop_layers, reduction=settings.saliency)
            nms_select(sal.scores, sal.features, [budgets[i] for i in group], settings.nms_threshold,
                       inclusive=settings.nms_inclusive)

    t = timed_in_turn({
        "padded": padded,
        "batches": batches,
        "single": lambda: [select_tokens(proxy, [c], [b], settings) for c, b in zip(contexts, budgets)],
    }, device, args.repeats)
    return ["", f"One engine step's images selected together (K = {k}; image tokens {args.mixed}): one batch padded "
            f"to the longest, length batches of at most 10% padding ({len(groups)} batches: "
            f"{[[args.mixed[i] for i in b] for b in groups]}; what `select` forms on an accelerator), and one "
            "image at a time (what `select` does on a CPU).", "",
            "| images | one padded batch s | length batches s | one at a time s | length batches vs padded | "
            "one at a time vs padded |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {len(contexts)} | {t['padded']:.3f} | {t['batches']:.3f} | {t['single']:.3f} | "
            f"{t['padded'] / t['batches']:.2f}x | {t['padded'] / t['single']:.2f}x |"]


if __name__ == "__main__":
    main()
