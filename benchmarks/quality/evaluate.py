"""Accuracy retained at low keep ratios, PIO-FVLM against baselines, on the trained checkpoint.

    python -m benchmarks.quality.evaluate --checkpoint benchmarks/quality/checkpoint --scenes 400

Every method gets the same per-image budget k = budget(N, keep) and answers through the
Hugging Face reference forward (`pio_fvlm_vllm.reference`):

- pio_fvlm (input): the plugin's method and placement: gradient saliency + NMS, every layer
  sees the k kept tokens;
- pio_fvlm (layer K): the paper's placement: all tokens up to layer K, the kept ones after;
- pio_fvlm + visionzip: encoder-involved: VisionZip stage, then the gradient stage;
- random, uniform stride, visionzip (CLS attention: k-c dominant + c merged contextual
  tokens), pooled (the image's token sequence average-pooled down to k tokens).

Also measured: agreement of the top-1 answer with the full-token model and the mean KL
divergence KL(full || pruned) of the first answer token. With `--server`, PIO-FVLM is also
run through a real `vllm serve` with the plugin (accuracy and agreement).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from pio_fvlm_vllm.budget import budget
from pio_fvlm_vllm.reference import HFReference
from pio_fvlm_vllm.settings import PioFvlmSettings

from ..common import RESULTS, progress, write_result
from .task import ANSWERS, TEST_SEEDS, make_example
from .train import prompt

KEEPS = [1.0, 0.5, 0.222, 0.111, 0.05]


def _uniform(n, k):
    return torch.linspace(0, n - 1, k).round().long() if k > 1 else torch.tensor([n // 2])


def _pool(tokens: torch.Tensor, k: int) -> torch.Tensor:
    return F.adaptive_avg_pool1d(tokens.T[None].float(), k)[0].T.to(tokens.dtype)


class Methods:
    """Each method maps (prepared prompt, keep) to next-token logits."""

    def __init__(self, ref: HFReference, seed: int = 0):
        self.ref = ref
        self.gen = torch.Generator().manual_seed(seed)

    def full(self, p, keep):
        return self.ref.last_logits(p, None)

    def pio_fvlm_input(self, p, keep):
        return self.ref.last_logits(p, self.ref.select(p, keep), "input")

    def pio_fvlm_layer_k(self, p, keep):
        return self.ref.last_logits(p, self.ref.select(p, keep), "layer_k")

    def pio_fvlm_visionzip(self, p, keep):
        stage1, budgets = self.ref.visionzip_stage(p, keep)
        return self.ref.last_logits(stage1, self.ref.select(stage1, keep, budgets), "input")

    def random(self, p, keep):
        kept = [torch.randperm(e - s, generator=self.gen)[: budget(e - s, keep)].sort().values
                for s, e in p.image_spans]
        return self.ref.last_logits(p, kept, "input")

    def uniform(self, p, keep):
        return self.ref.last_logits(p, [_uniform(e - s, budget(e - s, keep)) for s, e in p.image_spans], "input")

    def visionzip(self, p, keep):
        contextual = [max(1, budget(e - s, keep) // 8) if budget(e - s, keep) > 1 else 0 for s, e in p.image_spans]
        stage1, _ = self.ref.visionzip_stage(p, keep, num_contextual=contextual)
        return self.ref.last_logits(stage1, None)

    def pooled(self, p, keep):
        images = [_pool(p.embeds[s:e], budget(e - s, keep)) for s, e in p.image_spans]
        return self.ref.last_logits(self.ref.with_image_tokens(p, images), None)


METHODS = {
    "pio_fvlm (input, = plugin)": "pio_fvlm_input",
    "pio_fvlm (layer K, paper)": "pio_fvlm_layer_k",
    "pio_fvlm + visionzip": "pio_fvlm_visionzip",
    "random": "random",
    "uniform stride": "uniform",
    "visionzip (CLS attention)": "visionzip",
    "pooled": "pooled",
}


def answer_ids(tokenizer):
    return {w: tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in ANSWERS}


def evaluate_hf(checkpoint: Path, scenes: list[int], keeps: list[float]) -> dict:
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(checkpoint)
    ref = HFReference(model, processor, PioFvlmSettings())
    methods = Methods(ref)
    ids = answer_ids(processor.tokenizer)
    stats = {name: {k: {"correct": 0, "agree": 0, "kl": 0.0, "n": 0} for k in keeps} for name in METHODS}
    full_correct = 0
    for i, seed in enumerate(scenes):
        ex = make_example(seed)
        p = ref.prepare(prompt(ex.question), [ex.image], with_importance=True, add_special_tokens=False)
        full = methods.full(p, 1.0).double()
        full_logp = full.log_softmax(-1)
        full_top = int(full.argmax())
        full_correct += full_top == ids[ex.answer]
        for name, attr in METHODS.items():
            for keep in keeps:
                logits = full if keep == 1.0 else getattr(methods, attr)(p, keep).double()
                s = stats[name][keep]
                top = int(logits.argmax())
                s["correct"] += top == ids[ex.answer]
                s["agree"] += top == full_top
                s["kl"] += float((full_logp.exp() * (full_logp - logits.log_softmax(-1))).sum())
                s["n"] += 1
        if (i + 1) % 25 == 0:
            progress(f"HF path: {i + 1}/{len(scenes)} scenes")
    return {"full_accuracy": full_correct / len(scenes), "methods": stats}


def evaluate_server(checkpoint: Path, scenes: list[int], keeps: list[float]) -> dict:
    from openai import OpenAI

    from pio_fvlm_vllm.images import data_url
    from pio_fvlm_vllm.serving import VllmServer

    out = {k: {"correct": 0, "agree": 0, "n": 0} for k in keeps}
    with VllmServer(checkpoint, args=["--dtype", "float32", "--max-model-len", "2048"]) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        for i, seed in enumerate(scenes):
            ex = make_example(seed)
            msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(ex.image)}},
                                                 {"type": "text", "text": ex.question}]}]
            answers = {}
            for keep in keeps:
                reply = client.chat.completions.create(model=str(checkpoint), messages=msgs, max_tokens=1,
                                                       temperature=0.0, extra_body={"visual_keep": keep})
                answers[keep] = (reply.choices[0].message.content or "").strip()
            for keep in keeps:
                out[keep]["correct"] += answers[keep] == ex.answer
                out[keep]["agree"] += answers[keep] == answers[1.0]
                out[keep]["n"] += 1
            if (i + 1) % 50 == 0:
                progress(f"server path: {i + 1}/{len(scenes)} scenes")
    return out


def report(hf: dict, server: dict | None, keeps: list[float], scenes: int, checkpoint: Path) -> str:
    lines = [f"{scenes} held-out scenes of `benchmarks/quality/task.py`, checkpoint `{checkpoint}`; full-token "
             f"accuracy {hf['full_accuracy']:.1%}. Cells: accuracy / top-1 agreement with full tokens / mean "
             "KL(full || pruned) of the first answer token.", "",
             "| method | " + " | ".join(f"keep {k}" for k in keeps) + " |",
             "|---|" + "---:|" * len(keeps)]
    for name, per_keep in hf["methods"].items():
        cells = [f"{s['correct'] / s['n']:.1%} / {s['agree'] / s['n']:.0%} / {s['kl'] / s['n']:.3f}"
                 for s in (per_keep[k] for k in keeps)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if server:
        cells = [f"{server[k]['correct'] / server[k]['n']:.1%} / {server[k]['agree'] / server[k]['n']:.0%} / -"
                 for k in keeps]
        lines.append("| pio_fvlm via `vllm serve` (plugin) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(hf: dict, server: dict | None, keeps: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, per_keep in hf["methods"].items():
        ax.plot(keeps, [per_keep[k]["correct"] / per_keep[k]["n"] for k in keeps], "o-", label=name)
    if server:
        ax.plot(keeps, [server[k]["correct"] / server[k]["n"] for k in keeps], "k*--", label="plugin via vllm serve")
    ax.set(xscale="log", xlabel="visual_keep (share of image tokens kept)", ylabel="accuracy",
           title="Synthetic VQA accuracy vs keep ratio")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    progress(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path(__file__).parent / "checkpoint")
    p.add_argument("--scenes", type=int, default=400)
    p.add_argument("--keeps", type=float, nargs="+", default=KEEPS)
    p.add_argument("--server", action="store_true", help="also run PIO-FVLM through vllm serve")
    p.add_argument("--name", default="quality")
    args = p.parse_args(argv)
    if 1.0 not in args.keeps:
        args.keeps = [1.0, *args.keeps]
    scenes = list(TEST_SEEDS)[: args.scenes]
    torch.manual_seed(0)
    hf = evaluate_hf(args.checkpoint, scenes, args.keeps)
    server = evaluate_server(args.checkpoint, scenes, args.keeps) if args.server else None
    body = report(hf, server, args.keeps, len(scenes), args.checkpoint)
    print(body)
    write_result(f"{args.name}.md", "Quality: accuracy vs keep ratio", body + f"\n\n![quality]({args.name}.png)\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"hf": hf, "server": server}, indent=1, default=str))
    plot(hf, server, args.keeps, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
