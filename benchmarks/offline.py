"""Prefill and throughput with the offline engine (no HTTP), per visual_keep.

    python -m benchmarks.offline --checkpoint checkpoints/small --load-format dummy --requests 16

For each keep: single-request prefill latency (max_tokens=1, median of --repeats, fresh
images each time) and batch throughput (all requests submitted at once, max_tokens=--max-tokens).
Prefix caching is off; images are never repeated, so the encoder cache never answers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from pio_fvlm_vllm.images import synthetic_image

from .common import BenchmarkParser, progress, write_result
from .serving import SIZES


def main(argv=None):
    p = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/small")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5, 0.222, 0.111])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--name", default="cpu_small")
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.checkpoint, load_format=args.load_format, dtype=args.dtype, max_model_len=4096,
              enable_prefix_caching=False, seed=0)
    seed = [0]

    def prompts(n):
        out = []
        for i in range(n):
            seed[0] += 1
            out.append({"prompt": "USER: <image>\nWhat is shown in this image? ASSISTANT:",
                        "multi_modal_data": {"image": synthetic_image(*SIZES[i % len(SIZES)], seed=seed[0])}})
        return out

    def params(keep, max_tokens):
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                              extra_args={"visual_keep": keep})

    llm.generate(prompts(1), params(1.0, 1), use_tqdm=False)  # warm-up
    rows = []
    for keep in args.keeps:
        progress(f"keep={keep}: prefill latency")
        lat, tokens = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            (out,) = llm.generate(prompts(1), params(keep, 1), use_tqdm=False)
            lat.append(time.perf_counter() - start)
            tokens.append(len(out.prompt_token_ids))
        progress(f"keep={keep}: throughput, {args.requests} requests")
        start = time.perf_counter()
        outs = llm.generate(prompts(args.requests), params(keep, args.max_tokens), use_tqdm=False)
        wall = time.perf_counter() - start
        rows.append((keep, statistics.median(lat), statistics.mean(tokens), len(outs) / wall,
                     sum(len(o.outputs[0].token_ids) for o in outs) / wall))
    base = rows[0]
    lines = [f"Offline engine, `{args.checkpoint}` ({args.load_format} weights, {args.dtype}), "
             f"prefix caching off, {args.requests} requests per throughput run, max_tokens={args.max_tokens}.", "",
             "| visual_keep | prefill latency s (1 request) | prompt tokens | requests/s | output tok/s | "
             "prefill speed-up vs first row | throughput vs first row |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for keep, lat, tok, rps, tps in rows:
        lines.append(f"| {keep} | {lat:.3f} | {tok:.0f} | {rps:.3f} | {tps:.1f} | {base[1] / lat:.2f}x | "
                     f"{rps / base[3]:.2f}x |")
    body = "\n".join(lines)
    print(body)
    write_result(f"offline_{args.name}.md", "Offline engine: prefill and throughput", body)


if __name__ == "__main__":
    main()
