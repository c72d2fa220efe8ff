"""Accuracy retained at low keep ratios, PIO-FVLM against baselines, on the trained checkpoint.

    python -m benchmarks.quality.evaluate --checkpoint benchmarks/quality/checkpoint --scenes 400

Every method gets the same per-image budget k = budget(N, keep) and answers through the
Hugging Face reference forward (`pio_fvlm_vllm.reference`):

- pio_fvlm (input): the plugin's method and placement: gradient saliency + NMS, every layer
  sees the k kept tokens;
- pio_fvlm (input, original positions): as the plugin, but the kept tokens keep their
  original positions instead of being renumbered as the served, shorter prompt is;
- pio_fvlm (layer K): the paper's placement: all tokens up to layer K, the kept ones after;
- pio_fvlm + visionzip: encoder-involved: VisionZip stage, then the gradient stage;
- random, uniform stride, visionzip (CLS attention: k-c dominant + c merged contextual
  tokens), downsampled (each image's feature grid area-pooled in 2-D to k tokens: the
  image at a lower resolution, as the vision tower's tiles are fixed in size).

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

from pio_fvlm_vllm.algorithm import uniform_stride
from pio_fvlm_vllm.budget import budget
from pio_fvlm_vllm.reference import HFReference
from pio_fvlm_vllm.settings import ENV_PREFIX, PioFvlmSettings

from ..common import BenchmarkParser, progress, results_dir, write_result
from .task import TEST_SEEDS, make_example
from .train import answer_token_ids, prompt

KEEPS = [1.0, 0.5, 0.222, 0.111, 0.05]


def token_layout(config, image_hw: tuple[int, int]) -> torch.Tensor:
    """(N, 3) per image token of the packed LLaVA-NeXT layout: (view, row, col); view 0 = the
    base (downscaled) image, 1 = the high-resolution grid, -1 = a newline token."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape, image_size_to_num_patches, unpad_image)

    tile, side = config.vision_config.image_size, config.vision_config.image_size // config.vision_config.patch_size
    tiles_h, tiles_w = get_anyres_image_grid_shape(list(image_hw), config.image_grid_pinpoints, tile)
    assert image_size_to_num_patches(list(image_hw), config.image_grid_pinpoints, tile) == 1 + tiles_h * tiles_w
    rows = torch.arange(tiles_h * side)[:, None].expand(-1, tiles_w * side)
    cols = torch.arange(tiles_w * side)[None].expand(tiles_h * side, -1)
    grid = torch.stack([torch.ones_like(rows), rows, cols]).float()  # (3, H, W)
    grid = unpad_image(grid, torch.tensor(image_hw))
    grid = torch.cat([grid, torch.full((3, grid.shape[1], 1), -1.0)], dim=-1)  # newline per row
    r, c = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    base = torch.stack([torch.zeros_like(r), r, c], -1).float()
    return torch.cat([base, grid.flatten(1).T]).long()


def area_pool(grid: torch.Tensor, k: int) -> torch.Tensor:
    """(R, C, D) feature grid -> (k, D): row bands, each averaged and pooled along columns, with
    the k tokens spread over the bands so the result keeps the grid's aspect ratio."""
    rows, cols = grid.shape[:2]
    bands = min(rows, k, max(round((k * rows / cols) ** 0.5), -(-k // cols), 1))
    edges = torch.linspace(0, rows, bands + 1).round().long().tolist()
    out = []
    for i in range(bands):
        band = grid[edges[i]:edges[i + 1]].float().mean(0)  # (C, D)
        width = k // bands + (i < k % bands)
        out.append(F.adaptive_avg_pool1d(band.T[None], width)[0].T)
    return torch.cat(out).to(grid.dtype)


def downsample(tokens: torch.Tensor, layout: torch.Tensor, k: int) -> torch.Tensor:
    """The image at a lower resolution, in feature space: the base view and the high-resolution
    grid each area-pooled in 2-D, sharing the k tokens in proportion to their sizes."""
    views = [layout[:, 0] == v for v in (0, 1)]
    sizes = [int(m.sum()) for m in views]
    if not 1 <= k <= sum(sizes):
        raise ValueError(f"k must be in [1, {sum(sizes)}] (the image's non-newline tokens), got {k}")
    k_base = min(sizes[0], round(k * sizes[0] / sum(sizes)))
    k_grid = min(sizes[1], k - k_base)
    k_base = k - k_grid
    out = []
    for m, kv in zip(views, (k_base, k_grid)):
        if kv:
            rows, cols = layout[m, 1], layout[m, 2]
            shape = (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1)
            out.append(area_pool(tokens[m].reshape(*shape, -1), kv))
    return torch.cat(out)


class Methods:
    """Each method maps (prepared prompt, keep) to next-token logits."""

    def __init__(self, ref: HFReference, seed: int = 0):
        self.ref = ref
        self.gen = torch.Generator().manual_seed(seed)

    def full(self, p, keep):
        return self.ref.last_logits(p, None)

    def pio_fvlm_served(self, p, keep):
        return self.ref.last_logits(p, self.ref.select(p, keep), "handoff")

    def pio_fvlm_input(self, p, keep):
        return self.ref.last_logits(p, self.ref.select(p, keep), "input")

    def pio_fvlm_input_positions(self, p, keep):
        return self.ref.last_logits(p, self.ref.select(p, keep), "input_positions")

    def pio_fvlm_layer_k(self, p, keep):
        return self.ref.last_logits(p, self.ref.select(p, keep), "layer_k")

    def pio_fvlm_visionzip(self, p, keep):
        stage1, budgets = self.ref.visionzip_stage(p, keep)
        return self.ref.last_logits(stage1, self.ref.select(stage1, keep, budgets), "input")

    def _random_kept(self, p, keep):
        return [torch.randperm(e - s, generator=self.gen)[: budget(e - s, keep)].sort().values
                for s, e in p.image_spans]

    def random(self, p, keep):
        return self.ref.last_logits(p, self._random_kept(p, keep), "input_positions")

    def random_handoff(self, p, keep):
        return self.ref.last_logits(p, self._random_kept(p, keep), "handoff")

    def uniform(self, p, keep):
        kept = [uniform_stride(e - s, budget(e - s, keep)) for s, e in p.image_spans]
        return self.ref.last_logits(p, kept, "input_positions")

    def visionzip(self, p, keep):
        contextual = [max(1, budget(e - s, keep) // 8) if budget(e - s, keep) > 1 else 0 for s, e in p.image_spans]
        stage1, _ = self.ref.visionzip_stage(p, keep, num_contextual=contextual)
        return self.ref.last_logits(stage1, None)

    def downsampled(self, p, keep):
        images = [downsample(p.embeds[s:e], token_layout(self.ref.model.config, hw), budget(e - s, keep))
                  for (s, e), hw in zip(p.image_spans, p.image_sizes)]
        return self.ref.last_logits(self.ref.with_image_tokens(p, images), None)


PLUGIN = "pio_fvlm (plugin)"
# The plugin's placement: pruned before layer 0, original positions, hand-off after layer h.
SERVED = "pio_fvlm_served"
SERVED_NAME = "pio_fvlm (= plugin: original positions + hand-off)"
METHODS = {
    SERVED_NAME: SERVED,
    "pio_fvlm (original positions, no hand-off)": "pio_fvlm_input_positions",
    "pio_fvlm (renumbered positions, the plugin before)": "pio_fvlm_input",
    "pio_fvlm (layer K, paper)": "pio_fvlm_layer_k",
    "pio_fvlm + visionzip": "pio_fvlm_visionzip",
    "random (original positions)": "random",
    "random + hand-off (ablation)": "random_handoff",
    "uniform stride (original positions)": "uniform",
    "visionzip (CLS attention)": "visionzip",
    "downsampled (2-D pooling)": "downsampled",
}


def evaluate_hf(checkpoint: Path, scenes: list[int], keeps: list[float], settings: PioFvlmSettings) -> dict:
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(checkpoint)
    ref = HFReference(model, processor, settings)
    methods = Methods(ref)
    ids = answer_token_ids(processor.tokenizer)
    # The plugin-placement answers, word by word, to compare with what `vllm serve` answers.
    served_like = {k: [] for k in keeps}
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
                if attr == SERVED:
                    served_like[keep].append(processor.tokenizer.decode([top]).strip())
        if (i + 1) % 25 == 0:
            progress(f"HF path: {i + 1}/{len(scenes)} scenes")
    return {"full_accuracy": full_correct / len(scenes), "methods": stats, "plugin_answers": served_like}


def settings_env(settings: PioFvlmSettings) -> dict[str, str]:
    """The `PIO_FVLM_*` variables that give a server these settings."""
    return {ENV_PREFIX + name.upper(): str(value).lower() if isinstance(value, bool) else str(value)
            for name, value in settings.model_dump(exclude_defaults=True).items()}


def evaluate_server(checkpoint: Path, scenes: list[int], keeps: list[float], settings: PioFvlmSettings,
                    reference_answers: dict[float, list[str]] | None, concurrency: int = 8,
                    full_answers: list[str] | None = None) -> dict:
    """Accuracy and agreement through `vllm serve`, and how often the served answer is the HF
    reference's answer with the same (plugin) placement. Agreement is with this server's
    answers at keep 1.0, or with `full_answers` when keep 1.0 is not asked; each keep's
    answers come back under "answers"."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from pio_fvlm_vllm.images import data_url
    from pio_fvlm_vllm.serving import VllmServer

    out = {k: {"correct": 0, "agree": 0, "same_as_reference": 0, "n": 0, "answers": []} for k in keeps}
    env = settings_env(settings)
    progress(f"server with {env or 'default settings'}")
    with VllmServer(checkpoint, args=["--dtype", "float32", "--max-model-len", "2048"], env=env) as server, \
            ThreadPoolExecutor(concurrency) as pool:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)

        def answer(ex, keep):
            msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(ex.image)}},
                                                 {"type": "text", "text": ex.question}]}]
            reply = client.chat.completions.create(model=str(checkpoint), messages=msgs, max_tokens=1,
                                                   temperature=0.0, extra_body={"visual_keep": keep})
            return (reply.choices[0].message.content or "").strip()

        examples = [make_example(seed) for seed in scenes]
        futures = [{keep: pool.submit(answer, ex, keep) for keep in keeps} for ex in examples]
        for i, (ex, per_keep) in enumerate(zip(examples, futures)):
            answers = {keep: f.result() for keep, f in per_keep.items()}
            full = answers[1.0] if 1.0 in answers else full_answers[i]
            for keep in keeps:
                out[keep]["answers"].append(answers[keep])
                out[keep]["correct"] += answers[keep] == ex.answer
                out[keep]["agree"] += answers[keep] == full
                if reference_answers is not None:
                    out[keep]["same_as_reference"] += answers[keep] == reference_answers[keep][i]
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
    for label, runs in (server or {}).items():
        cells = [f"{runs[k]['correct'] / runs[k]['n']:.1%} / {runs[k]['agree'] / runs[k]['n']:.0%} / -" for k in keeps]
        lines.append(f"| {label} via `vllm serve` | " + " | ".join(cells) + " |")
    if server and PLUGIN in server and hf["methods"]:
        runs = server[PLUGIN]
        cells = [f"{runs[k]['same_as_reference'] / runs[k]['n']:.1%}" for k in keeps]
        lines.append("| `vllm serve` answer == HF reference answer, plugin placement | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(hf: dict, server: dict | None, keeps: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5))
    for name, per_keep in hf["methods"].items():
        ax.plot(keeps, [per_keep[k]["correct"] / per_keep[k]["n"] for k in keeps], "o-", label=name, alpha=0.8)
    for label, runs in (server or {}).items():
        acc = [runs[k]["correct"] / runs[k]["n"] for k in keeps]
        err = [(a * (1 - a) / runs[k]["n"]) ** 0.5 for a, k in zip(acc, keeps)]  # binomial standard error
        ax.errorbar(keeps, acc, yerr=err, fmt="*--", capsize=3, label=f"{label} via vllm serve (± 1 s.e.)")
    ax.axhline(hf["full_accuracy"], color="grey", lw=0.8, ls=":", label="all tokens")
    ax.set(xscale="log", xlabel="visual_keep (share of image tokens kept)", ylabel="accuracy",
           title="Synthetic VQA accuracy vs keep ratio (400 held-out scenes)")
    ax.set_xticks(keeps, [str(k) for k in keeps])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    progress(f"wrote {path}")


def main(argv=None):
    p = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path(__file__).parent / "checkpoint")
    p.add_argument("--scenes", type=int, default=400)
    p.add_argument("--keeps", type=float, nargs="+", default=KEEPS)
    p.add_argument("--server", action="store_true",
                   help="also serve PIO-FVLM, and random and uniform selection, through vllm serve")
    p.add_argument("--server-only", action="store_true",
                   help="serve PIO-FVLM through vllm serve only (no Hugging Face methods, no baselines)")
    p.add_argument("--scoring", choices=["project", "official"], default="project",
                   help="PIO-FVLM's scoring (see PIO_FVLM_SCORING)")
    p.add_argument("--name", default="quality")
    p.add_argument("--proxy-layer", type=int, default=2,
                   help="K for PIO-FVLM; the checkpoint grounds the question in decoder layer 2 of 4")
    p.add_argument("--from-json", type=Path, help="redraw the plot from a results JSON this script wrote, "
                   "without evaluating")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        keys = lambda d: {float(k): v for k, v in d.items()}  # noqa: E731 (JSON keys are strings)
        hf = {**saved["hf"], "methods": {n: keys(m) for n, m in saved["hf"]["methods"].items()}}
        server = {label: keys(runs) for label, runs in (saved["server"] or {}).items()} or None
        keeps = sorted(next(iter(hf["methods"].values())), reverse=True)
        plot(hf, server, keeps, results_dir() / f"{args.name}.png")
        return
    if not 1 <= args.scenes <= len(TEST_SEEDS):
        p.error(f"--scenes must be in [1, {len(TEST_SEEDS)}] (the held-out split), got {args.scenes}")
    if 1.0 not in args.keeps:
        args.keeps = [1.0, *args.keeps]
    scenes = list(TEST_SEEDS)[: args.scenes]
    torch.manual_seed(0)
    settings = PioFvlmSettings(proxy_layer=args.proxy_layer, scoring=args.scoring)
    if args.server_only:
        served = evaluate_server(args.checkpoint, scenes, args.keeps, settings, None)
        hf = {"full_accuracy": served[1.0]["correct"] / served[1.0]["n"], "methods": {}}
        body = report(hf, {PLUGIN: served}, args.keeps, len(scenes), args.checkpoint).replace(
            "full-token accuracy", "full-token accuracy through `vllm serve`")
        print(body)
        write_result(f"{args.name}.md", "Quality: accuracy vs keep ratio, served", body)
        (results_dir() / f"{args.name}.json").write_text(json.dumps({"server": {PLUGIN: served}}, indent=1))
        return
    hf = evaluate_hf(args.checkpoint, scenes, args.keeps, settings)
    server = None
    if args.server:
        server = {PLUGIN: evaluate_server(args.checkpoint, scenes, args.keeps, settings, hf["plugin_answers"])}
        for selector in ("random", "uniform"):
            baseline = settings.model_copy(update={"selector": selector})
            server[f"{selector} (original positions)"] = evaluate_server(args.checkpoint, scenes, args.keeps,
                                                                         baseline, None)
    body = report(hf, server, args.keeps, len(scenes), args.checkpoint)
    print(body)
    write_result(f"{args.name}.md", "Quality: accuracy vs keep ratio", body + f"\n\n![quality]({args.name}.png)\n")
    (results_dir() / f"{args.name}.json").write_text(json.dumps({"hf": hf, "server": server}, indent=1, default=str))
    plot(hf, server, args.keeps, results_dir() / f"{args.name}.png")


if __name__ == "__main__":
    main()
