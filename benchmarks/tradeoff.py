"""Choosing a keep ratio: served accuracy and serving speed-up against keep, in one picture.

    python -m benchmarks.tradeoff [--update-results]

Reads the committed results of two commands (their files say command, machine and date):
- accuracy: `benchmarks/results/quality.json` (`python -m benchmarks.quality.evaluate --server`,
  400 held-out scenes through `vllm serve`, with the random and uniform baselines served the
  same way);
- speed: `benchmarks/results/serving_cpu_small_keeps.json` (`python -m benchmarks.serving`,
  every keep and stock vLLM side by side in one run).
It adds the no-image baseline of the same scenes (the quality checkpoint answering the
question without the image: what the image is worth), computed here with the Hugging Face
model, and writes `tradeoff.md` and `tradeoff.png`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .common import RESULTS, BenchmarkParser, progress, results_dir, write_result
from .quality.task import TEST_SEEDS, make_example
from .quality.train import answer_token_ids

QUALITY = RESULTS / "quality.json"
SERVING = RESULTS / "serving_cpu_small_keeps.json"
CHECKPOINT = Path(__file__).parent / "quality" / "checkpoint"


def no_image_accuracy(checkpoint: Path, scenes: list[int]) -> float:
    """Accuracy of the checkpoint asked each held-out question with no image in the prompt."""
    from transformers import AutoTokenizer, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = answer_token_ids(tokenizer)
    correct = 0
    with torch.no_grad():
        for seed in scenes:
            ex = make_example(seed)
            tokens = tokenizer(f"USER: {ex.question} ASSISTANT:", add_special_tokens=False, return_tensors="pt")
            correct += int(model(**tokens).logits[0, -1].argmax()) == ids[ex.answer]
    return correct / len(scenes)


def served_accuracy(quality: dict) -> dict[str, dict[float, tuple[float, int]]]:
    """(accuracy, scenes) per keep for every method served through `vllm serve`."""
    return {label: {float(k): (r["correct"] / r["n"], r["n"]) for k, r in runs.items()}
            for label, runs in quality["server"].items()}


def ttft_speedup(serving: list[dict], concurrency: int = 1) -> dict[float, float]:
    """Stock TTFT over the plugin's at each keep, from one run."""
    rows = [r for r in serving if r["concurrency"] == concurrency]
    stock = next(r["ttft_p50"] for r in rows if r["config"] == "stock")
    return {float(r["keep"]): stock / r["ttft_p50"] for r in rows if r["config"].startswith("plugin")}


def plot(accuracy, speedup, full: float, no_image: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5))
    keeps = sorted({k for runs in accuracy.values() for k in runs} | set(speedup), reverse=True)
    for label, runs in accuracy.items():
        ks = sorted(runs, reverse=True)
        acc = [runs[k][0] for k in ks]
        err = [(a * (1 - a) / runs[k][1]) ** 0.5 for a, k in zip(acc, ks)]  # binomial standard error
        ax.errorbar(ks, acc, yerr=err, fmt="o-" if "pio_fvlm" in label else "s:", capsize=3,
                    label=f"{label} (± 1 s.e.)")
    ax.axhline(full, color="grey", lw=0.8, ls="--", label="all image tokens")
    ax.axhline(no_image, color="black", lw=0.8, ls=":", label="no image (question only)")
    ax.set(xscale="log", xlabel="visual_keep (share of image tokens kept)", ylabel="accuracy, via vllm serve",
           ylim=(0, 1))
    ax.set_xticks(keeps, [str(k) for k in keeps])
    ax.minorticks_off()
    right = ax.twinx()
    ks = sorted(speedup, reverse=True)
    right.plot(ks, [speedup[k] for k in ks], "D-", color="tab:red", label="TTFT speed-up vs stock (right axis)")
    right.set_ylabel("TTFT speed-up vs stock vLLM (x)", color="tab:red")
    right.set_ylim(0, max(speedup.values()) * 1.15)
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=7, loc="lower left")
    ax.set_title("Choosing visual_keep: accuracy (400 held-out scenes) and TTFT (one request at a time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    progress(f"wrote {path}")


def main(argv=None):
    p = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=400)
    args = p.parse_args(argv)
    quality = json.loads(QUALITY.read_text())
    serving = json.loads(SERVING.read_text())
    scenes = TEST_SEEDS[: args.scenes]
    progress(f"no-image baseline over {len(scenes)} scenes")
    no_image = no_image_accuracy(CHECKPOINT, scenes)
    accuracy = served_accuracy(quality)
    speedup = ttft_speedup(serving)
    full = quality["hf"]["full_accuracy"]
    keeps = sorted({k for runs in accuracy.values() for k in runs} | set(speedup), reverse=True)
    lines = [f"Accuracy from `{QUALITY.name}` ({len(scenes)} held-out scenes through `vllm serve`; one standard "
             f"error is about 1.5 points), TTFT speed-up from `{SERVING.name}` (one request at a time, stock vLLM "
             f"in the same run). All image tokens: {full:.1%}. No image (question only): {no_image:.1%}.", "",
             "| keep | " + " | ".join(accuracy) + " | TTFT speed-up vs stock |",
             "|---:|" + "---:|" * (len(accuracy) + 1)]
    for k in keeps:
        cells = [f"{runs[k][0]:.1%}" if k in runs else "-" for runs in accuracy.values()]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {speedup[k]:.2f}x |" if k in speedup else
                     f"| {k} | " + " | ".join(cells) + " | - |")
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    plot(accuracy, speedup, full, no_image, out / "tradeoff.png")
    write_result("tradeoff.md", "Choosing a keep ratio", "\n".join(lines) + "\n\n![tradeoff](tradeoff.png)\n")
    (out / "tradeoff.json").write_text(json.dumps({"no_image_accuracy": no_image, "full_accuracy": full,
                                                   "ttft_speedup": speedup}, indent=1))


if __name__ == "__main__":
    main()
