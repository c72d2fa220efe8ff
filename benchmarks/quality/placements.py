"""Which hand-off from the proxy into the served prefill recovers the paper's accuracy.

    python -m benchmarks.quality.placements --checkpoint benchmarks/quality/checkpoint --scenes 400

Every candidate uses the same kept indices (PIO-FVLM's selection with K proxy layers and the
given scoring) and answers through the Hugging Face reference forward:

- renumbered: kept tokens only from layer 0, positions renumbered (the plugin before);
- original positions: kept tokens only from layer 0, at their unpruned positions;
- image hN: as original positions, and after layer N the kept image rows take the states the
  unpruned prompt gives them there;
- image+text hN: the same for the kept image rows and every text row after the image (what the
  plugin serves, with N = the hand-off layer);
- layer K (paper): every token through layers 1..K, the kept ones after.

Full tokens are the reference; cells are accuracy on held-out scenes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pio_fvlm_vllm.reference import HFReference
from pio_fvlm_vllm.settings import PioFvlmSettings

from ..common import BenchmarkParser, progress, results_dir, write_result
from .task import TEST_SEEDS, make_example
from .train import answer_token_ids, prompt

CANDIDATES = {
    "renumbered": dict(placement="input"),
    "original positions": dict(placement="input_positions"),
    "image h1": dict(placement="handoff", handoff_layer=1, handoff_text=False),
    "image+text h1 (served)": dict(placement="handoff", handoff_layer=1),
    "image+text h2": dict(placement="handoff", handoff_layer=2),
    "layer K (paper)": dict(placement="layer_k"),
}


def evaluate(checkpoint: Path, scenes: list[int], keeps: list[float], layers: list[int], scorings: list[str]) -> dict:
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(checkpoint)
    ids = answer_token_ids(processor.tokenizer)
    refs = {(scoring, k): HFReference(model, processor, PioFvlmSettings(proxy_layer=k, scoring=scoring))
            for scoring in scorings for k in layers}
    any_ref = next(iter(refs.values()))
    cells = {f"{scoring} K={k}": {name: {keep: 0 for keep in keeps} for name in CANDIDATES}
             for scoring in scorings for k in layers}
    full_correct = 0
    for i, seed in enumerate(scenes):
        ex = make_example(seed)
        p = any_ref.prepare(prompt(ex.question), [ex.image], add_special_tokens=False)
        full_correct += int(any_ref.last_logits(p, None).argmax()) == ids[ex.answer]
        for (scoring, k), ref in refs.items():
            for keep in keeps:
                kept = ref.select(p, keep)
                for name, how in CANDIDATES.items():
                    cells[f"{scoring} K={k}"][name][keep] += int(ref.last_logits(p, kept, **how).argmax()) == ids[ex.answer]
        if (i + 1) % 25 == 0:
            progress(f"{i + 1}/{len(scenes)} scenes")
    n = len(scenes)
    return {"scenes": n, "full_accuracy": full_correct / n,
            "cells": {row: {name: {keep: c / n for keep, c in per.items()} for name, per in table.items()}
                      for row, table in cells.items()}}


def report(result: dict, keeps: list[float]) -> str:
    full = result["full_accuracy"]
    n = result["scenes"]
    noise = (full * (1 - full) / n) ** 0.5
    lines = [f"{n} held-out scenes; full-token accuracy {full:.1%} (binomial standard error of one cell "
             f"about {noise:.1%} at that accuracy). Cells: accuracy (share of full).", "",
             "| scoring, K | keep | " + " | ".join(CANDIDATES) + " |", "|---|---|" + "---:|" * len(CANDIDATES)]
    for row, table in result["cells"].items():
        for keep in keeps:
            cells = [f"{table[name][keep]:.1%} ({table[name][keep] / full:.0%})" for name in CANDIDATES]
            lines.append(f"| {row} | {keep} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path(__file__).parent / "checkpoint")
    p.add_argument("--scenes", type=int, default=400)
    p.add_argument("--keeps", type=float, nargs="+", default=[0.222, 0.111, 0.05])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="proxy layers K to compare")
    p.add_argument("--scorings", nargs="+", default=["project", "official"], choices=["project", "official"])
    p.add_argument("--name", default="placements")
    args = p.parse_args(argv)
    if not 1 <= args.scenes <= len(TEST_SEEDS):
        p.error(f"--scenes must be in [1, {len(TEST_SEEDS)}] (the held-out split), got {args.scenes}")
    for keep in args.keeps:
        if not 0 < keep < 1:
            p.error(f"--keeps must be in (0, 1), got {keep}")
    torch.manual_seed(0)
    result = evaluate(args.checkpoint, list(TEST_SEEDS)[: args.scenes], args.keeps, args.layers, args.scorings)
    body = report(result, args.keeps)
    print(body)
    write_result(f"{args.name}.md", "Quality: hand-off candidates and scorings", body)
    (results_dir() / f"{args.name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
