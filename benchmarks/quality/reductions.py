"""Saliency reductions compared: accuracy in the served placement, and how much of each score
survives reduced precision.

For each `saliency` setting: accuracy of the plugin's placement (pruned before layer 0,
original positions, hand-off) at each keep on a validation split (scenes neither trained on nor
in the test split) and on the test split, and the rank correlation of the scores computed in
float32 and bfloat16 with the same scores in float64 (the proxy on a GPU runs in the model's
dtype, usually bfloat16); accuracy is given with the proxy in float32 and in bfloat16 (the
served forward stays float32).

    .venv/bin/python -m benchmarks.quality.reductions --scenes 200
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from pio_fvlm_vllm.algorithm import ImageContext
from pio_fvlm_vllm.algorithm.decoder import DecoderLayerWeights, ProxyWeights
from pio_fvlm_vllm.algorithm.saliency import gradient_saliency
from pio_fvlm_vllm.reference.hf import HFReference
from pio_fvlm_vllm.settings import PioFvlmSettings

from ..common import BenchmarkParser, progress, write_result
from .evaluate import Methods, answer_token_ids, prompt
from .task import TEST_SEEDS, make_example

VALIDATION_SEEDS = range(TEST_SEEDS.stop, TEST_SEEDS.stop + 400)  # above the training draws, after the test split
REDUCTIONS = ("grad_x_normed", "grad_x_input", "grad_norm")
DTYPES = (torch.float32, torch.bfloat16)  # the proxy's; a GPU runs it in the model's dtype


def _cast(weights: ProxyWeights, dtype: torch.dtype) -> ProxyWeights:
    def layer(w: DecoderLayerWeights) -> DecoderLayerWeights:
        return DecoderLayerWeights(**{f.name: None if getattr(w, f.name) is None else getattr(w, f.name).to(dtype)
                                      for f in dataclasses.fields(w)})

    return ProxyWeights(weights.shape, [layer(w) for w in weights.layers], weights.final_norm.to(dtype),
                        weights.lm_head.to(dtype))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([_ranks(a), _ranks(b)]))[0, 1])


def image_context(p) -> ImageContext:
    (start, end), = p.image_spans
    return ImageContext(p.embeds[start:end], p.embeds[:start], p.embeds[end:])


def main() -> None:
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    ap = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path(__file__).parent / "checkpoint")
    ap.add_argument("--scenes", type=int, default=400)
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.111, 0.05])
    ap.add_argument("--precision-scenes", type=int, default=50,
                    help="validation scenes whose scores are also computed in float64 and bfloat16")
    ap.add_argument("--proxy-layer", type=int, default=2)
    ap.add_argument("--name", default="saliency_reductions")
    args = ap.parse_args()
    model = LlavaNextForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(args.checkpoint)
    ids = answer_token_ids(processor.tokenizer)
    refs = {}
    for r in REDUCTIONS:
        for dtype in DTYPES:
            ref = HFReference(model, processor, PioFvlmSettings(proxy_layer=args.proxy_layer, saliency=r))
            ref.proxy = _cast(ref.proxy, dtype)  # the proxy alone; the served forward stays float32
            refs[r, dtype] = ref
    proxy = refs[REDUCTIONS[0], torch.float32].proxy
    low = {torch.float64: _cast(proxy, torch.float64), torch.bfloat16: _cast(proxy, torch.bfloat16)}
    splits = {"validation": list(VALIDATION_SEEDS)[: args.scenes], "test": list(TEST_SEEDS)[: args.scenes]}
    variants = [(r, d) for r in REDUCTIONS for d in DTYPES]
    correct = {(s, v, k): 0 for s in splits for v in variants for k in args.keeps}
    full_correct = {s: 0 for s in splits}
    rho = {(r, d): [] for r in REDUCTIONS for d in ("float32", "bfloat16")}
    start = time.perf_counter()
    for split, seeds in splits.items():
        for i, seed in enumerate(seeds):
            ex = make_example(seed)
            base = refs[REDUCTIONS[0], torch.float32]
            p = base.prepare(prompt(ex.question), [ex.image], add_special_tokens=False)
            full_correct[split] += int(base.last_logits(p, None).argmax()) == ids[ex.answer]
            for v in variants:
                methods = Methods(refs[v])
                for keep in args.keeps:
                    correct[split, v, keep] += int(methods.pio_fvlm_served(p, keep).argmax()) == ids[ex.answer]
            for r in REDUCTIONS:
                if split == "validation" and i < args.precision_scenes:
                    ctx = image_context(p)
                    exact = gradient_saliency(low[torch.float64], [_as(ctx, torch.float64)], reduction=r).scores[0]
                    f32 = gradient_saliency(proxy, [ctx], reduction=r).scores[0]
                    bf16 = gradient_saliency(low[torch.bfloat16], [_as(ctx, torch.bfloat16)], reduction=r).scores[0]
                    rho[r, "float32"].append(spearman(f32.double(), exact))
                    rho[r, "bfloat16"].append(spearman(bf16.double(), exact))
            if (i + 1) % 50 == 0:
                progress(f"{split}: {i + 1}/{len(seeds)} scenes ({time.perf_counter() - start:.0f}s)")
    n = args.scenes
    rows = [f"| {r} | {str(d).removeprefix('torch.')} | "
            + " | ".join(f"{100 * correct[s, (r, d), k] / n:.1f}%" for s in splits for k in args.keeps)
            + (f" | {_mean(rho[r, 'float32']):.3f} | {_mean(rho[r, 'bfloat16']):.3f} |" if d == torch.float32
               else " | | |") for r, d in variants]
    head = " | ".join(f"{s} keep {k}" for s in splits for k in args.keeps)
    body = "\n".join([
        f"The quality harness's checkpoint, K = {args.proxy_layer}, the plugin's placement (pruned before layer 0, "
        f"original positions, hand-off after layer 1), {n} scenes per split: validation (seeds "
        f"{VALIDATION_SEEDS.start}+, neither trained on nor in the test split) and test (the held-out split of "
        f"`evaluate.py`). Full-token accuracy: validation {100 * full_correct['validation'] / n:.1f}%, test "
        f"{100 * full_correct['test'] / n:.1f}%. One cell's binomial standard error is about {100 * (0.9 * 0.1 / n) ** 0.5:.1f}% at 90% accuracy. Last two "
        f"columns: mean Spearman correlation, over the first {min(args.precision_scenes, n)} validation scenes, "
        "between the scores computed in that dtype and the same scores in float64.",
        "",
        f"| saliency | proxy dtype | {head} | rank corr. float32 vs float64 | rank corr. bfloat16 vs float64 |",
        "|---|---|" + "---:|" * (len(splits) * len(args.keeps) + 2),
        *rows,
        "",
    ])
    write_result(f"{args.name}.md", "Saliency reductions", body)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _as(ctx: ImageContext, dtype: torch.dtype) -> ImageContext:
    return ImageContext(ctx.image_embeds.to(dtype), ctx.prefix_embeds.to(dtype), ctx.suffix_embeds.to(dtype))


if __name__ == "__main__":
    main()
