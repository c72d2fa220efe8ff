"""FLOPs and KV-cache bytes of a LLaVA-NeXT prefill, computed from the model's shape, with and
without PIO-FVLM at each keep, the selection pass included.

    python -m benchmarks.cost_model --shape 7b --image-tokens 2880 --text-tokens 64

Counting: a multiply-add is 2 FLOPs; per decoder layer and token the projections cost
2*(D*(Dq + 2*Dkv) + Dq*D + 3*D*I) and causal attention 2*2*Dq*(position+1) summed over
positions; the LM head runs for the last token only. KV bytes = 2 (K and V) * layers * Dkv *
bytes per value * tokens. The selection pass: K-1 full layers over all tokens, the K-th layer's
keys/values over all tokens plus one query token, its backward (~2x its forward), the LM head
once (logit lens). The vision tower runs in both cases and is excluded.
"""

from __future__ import annotations

import argparse

from pio_fvlm_vllm.budget import budget

from .common import BenchmarkParser, write_result
from .selection_cost import SHAPES


def layer_flops(tokens: int, d: int, dq: int, dkv: int, inter: int) -> float:
    proj = 2 * (d * (dq + 2 * dkv) + dq * d + 3 * d * inter) * tokens
    attn = 2 * 2 * dq * tokens * (tokens + 1) / 2
    return proj + attn


def prefill_flops(tokens: int, shape) -> float:
    d, heads, kv, inter, layers, vocab = shape
    dq, dkv = d, d // heads * kv
    return layers * layer_flops(tokens, d, dq, dkv, inter) + 2 * d * vocab


def selection_flops(tokens: int, shape, k_layers: int) -> float:
    d, heads, kv, inter, _, vocab = shape
    dq, dkv = d, d // heads * kv
    full = (k_layers - 1) * layer_flops(tokens, d, dq, dkv, inter)
    last = 2 * d * 2 * dkv * tokens + 2 * 2 * dq * tokens + 2 * (d * dq + dq * d + 3 * d * inter)
    return full + 3 * last + 3 * 2 * d * vocab


def main(argv=None):
    p = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--image-tokens", type=int, default=2880)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5, 0.222, 0.111, 0.05])
    p.add_argument("--proxy-layer", type=int, default=2)
    p.add_argument("--bytes-per-value", type=int, default=2, help="2 for bf16/fp16 KV cache")
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    d, heads, kv, _, layers, _ = shape
    kv_per_token = 2 * layers * (d // heads * kv) * args.bytes_per_value
    n, t = args.image_tokens, args.text_tokens
    full_tokens = n + t
    base_flops = prefill_flops(full_tokens, shape)
    base_kv = kv_per_token * full_tokens
    lines = [f"Shape `{args.shape}` ({layers} layers, hidden {d}), {n} image + {t} text tokens, proxy layer "
             f"K={args.proxy_layer}, KV cache {8 * args.bytes_per_value}-bit. KV per token: "
             f"{kv_per_token / 2**10:.0f} KiB.", "",
             "| visual_keep | kept | prompt tokens | prefill TFLOPs | selection TFLOPs | total vs stock | "
             "FLOPs reduction | KV cache MiB | KV reduction |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for keep in args.keeps:
        k = budget(n, keep)
        tokens = k + t
        pre = prefill_flops(tokens, shape)
        sel = 0.0 if keep == 1.0 else selection_flops(full_tokens, shape, args.proxy_layer)
        kv_bytes = kv_per_token * tokens
        lines.append(f"| {keep} | {k} | {tokens} | {pre / 1e12:.2f} | {sel / 1e12:.2f} | "
                     f"{(pre + sel) / base_flops:.1%} | {base_flops / (pre + sel):.2f}x | "
                     f"{kv_bytes / 2**20:.0f} | {base_kv / kv_bytes:.2f}x |")
    body = "\n".join(lines)
    print(body)
    write_result(f"cost_model_{args.shape}.md", "Prefill FLOPs and KV cache, computed", body)


if __name__ == "__main__":
    main()
