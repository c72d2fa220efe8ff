"""Accuracy through `vllm serve`, the plugin against its baselines in one run, for any family.

    python -m benchmarks.quality.served --checkpoint benchmarks/quality/checkpoint --name quality_served_llava_next
    python -m benchmarks.quality.served --checkpoint benchmarks/quality/checkpoint_qwen2_5_vl \
        --name quality_served_qwen2_5_vl

One server per configuration, each asked every scene at every keep ratio (first answer token,
greedy), the same scenes for all:

- pio_fvlm: the plugin as served by default (hand-off after layer K, the paper's pruning point);
- pio_fvlm, hand-off after layer K - 1 (the default before; what moving it to K adds);
- pio_fvlm, no hand-off (original positions only);
- random and uniform stride (original positions; they run no proxy, so no hand-off).

Scenes: `--split test` is the held-out split the trainers report (seeds 10^8..10^8+399);
`--split fresh` draws seeds from 7 * 10^8 on, which no split uses. The noise is binomial:
one standard error is sqrt(p (1 - p) / scenes), about 1.4 points at 90% on 400 scenes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pio_fvlm_vllm.settings import PioFvlmSettings

from ..common import BenchmarkParser, progress, results_dir, write_result
from .evaluate import evaluate_server
from .task import TEST_SEEDS

KEEPS = [1.0, 0.222, 0.111, 0.05]
FRESH_START = 7 * 10**8
PLUGIN = "pio_fvlm (hand-off after layer K, default)"


def configurations(proxy_layer: int) -> dict[str, PioFvlmSettings]:
    base = PioFvlmSettings(proxy_layer=proxy_layer)
    return {
        PLUGIN: base,
        "pio_fvlm, hand-off after layer K - 1": base.model_copy(update={"handoff_layer": proxy_layer - 1}),
        "pio_fvlm, no hand-off": base.model_copy(update={"handoff_layer": 0}),
        "random (original positions)": base.model_copy(update={"selector": "random"}),
        "uniform stride (original positions)": base.model_copy(update={"selector": "uniform"}),
    }


def report(runs: dict[str, dict], keeps: list[float], scenes: int, checkpoint: Path, split: str) -> str:
    full = runs[PLUGIN][1.0]["correct"] / runs[PLUGIN][1.0]["n"]
    pruned = [k for k in keeps if k < 1.0]
    lines = [f"{scenes} scenes of the `{split}` split, checkpoint `{checkpoint}`, first answer token through "
             f"`vllm serve`; all tokens: **{full:.1%}**. Cells: accuracy (share of the all-token accuracy) / "
             f"top-1 agreement with the all-token answer. One standard error: about "
             f"{(full * (1 - full) / scenes) ** 0.5:.1%} at the all-token accuracy.", "",
             "| configuration | " + " | ".join(f"keep {k}" for k in pruned) + " |",
             "|---|" + "---:|" * len(pruned)]
    for label, per_keep in runs.items():
        cells = []
        for k in pruned:
            acc = per_keep[k]["correct"] / per_keep[k]["n"]
            cells.append(f"{acc:.1%} ({acc / full:.0%}) / {per_keep[k]['agree'] / per_keep[k]['n']:.0%}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, dict], keeps: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pruned = [k for k in keeps if k < 1.0]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, per_keep in runs.items():
        acc = [per_keep[k]["correct"] / per_keep[k]["n"] for k in pruned]
        err = [(a * (1 - a) / per_keep[k]["n"]) ** 0.5 for a, k in zip(acc, pruned)]
        ax.errorbar(pruned, acc, yerr=err, fmt="o-", capsize=3, label=label)
    full = runs[PLUGIN][1.0]
    ax.axhline(full["correct"] / full["n"], color="grey", lw=0.8, ls=":", label="all tokens")
    ax.set(xscale="log", xlabel="visual_keep", ylabel="accuracy (± 1 s.e.)", title=title)
    ax.set_xticks(pruned, [str(k) for k in pruned])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    progress(f"wrote {path}")


def main(argv=None):
    p = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path(__file__).parent / "checkpoint")
    p.add_argument("--scenes", type=int, default=400)
    p.add_argument("--split", choices=["test", "fresh"], default="test")
    p.add_argument("--keeps", type=float, nargs="+", default=KEEPS)
    p.add_argument("--proxy-layer", type=int, default=2, help="K (the quality checkpoints ground in layer 2)")
    p.add_argument("--only", nargs="+", help="run these configurations only (labels as in the table)")
    p.add_argument("--name", default="quality_served")
    args = p.parse_args(argv)
    if args.split == "test" and not 1 <= args.scenes <= len(TEST_SEEDS):
        p.error(f"--scenes must be in [1, {len(TEST_SEEDS)}] for the test split, got {args.scenes}")
    if args.scenes < 1:
        p.error(f"--scenes must be at least 1, got {args.scenes}")
    keeps = sorted({1.0, *args.keeps}, reverse=True)
    first = TEST_SEEDS.start if args.split == "test" else FRESH_START
    scenes = list(range(first, first + args.scenes))
    configs = configurations(args.proxy_layer)
    unknown = set(args.only or ()) - set(configs)
    if unknown:
        p.error(f"--only: unknown configuration(s) {sorted(unknown)}; known: {sorted(configs)}")
    runs = {}
    for label, settings in configs.items():
        if args.only and label not in args.only and label != PLUGIN:
            continue
        # Keep 1.0 prunes nothing: every configuration serves it alike, so it runs once.
        asked = keeps if label == PLUGIN else [k for k in keeps if k < 1.0]
        progress(f"{label}: {len(scenes)} scenes x keeps {asked}")
        full = runs[PLUGIN][1.0]["answers"] if label != PLUGIN else None
        runs[label] = evaluate_server(args.checkpoint, scenes, asked, settings, None, full_answers=full)
    body = report(runs, keeps, len(scenes), args.checkpoint, args.split)
    print(body)
    write_result(f"{args.name}.md", f"Accuracy through vllm serve, baselines in the same run ({args.checkpoint.name})",
                 body + f"\n\n![accuracy]({args.name}.png)\n")
    (results_dir() / f"{args.name}.json").write_text(json.dumps(
        {label: {str(k): v for k, v in r.items()} for label, r in runs.items()}, indent=1))
    plot(runs, keeps, results_dir() / f"{args.name}.png", f"{args.checkpoint.name}, {len(scenes)} scenes")


if __name__ == "__main__":
    main()
