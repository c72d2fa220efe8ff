"""Trains a small LLaVA-NeXT on the synthetic task and writes it in the llava-hf layout.

    python -m benchmarks.quality.train --out benchmarks/quality/checkpoint --steps 1500

Seeded and deterministic for a given machine; minutes on 2 CPU cores, faster on CUDA. The
architecture is LLaVA-NeXT's (CLIP tower, 2-layer GELU projector, anyres tiles with
unpadding and newline tokens, Llama decoder), scaled down: 112-pixel tiles of 14-pixel
patches (64 tokens a tile), a 4-layer CLIP of width 96 and a 4-layer Llama of width 128.
Only the answer token is supervised.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from pio_fvlm_vllm.checkpoints import Preset, build_tokenizer, make_processor, preset_config, save_checkpoint

from ..common import progress
from .task import ANSWERS, KINDS, TEST_SEEDS, VOCABULARY, make_example

QUALITY_PRESET = Preset(
    vision=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4),
    vocab_size=700,
    description="trained on the synthetic visual task of benchmarks/quality/task.py",
    image_size=112,
    grid_pinpoints=[[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]],
)


def prompt(question: str) -> str:
    """What the checkpoint's chat template renders for one user turn with one image."""
    return f"USER: <image>\n{question} ASSISTANT:"


def tokenizer_corpus() -> list[str]:
    rng = random.Random(0)
    lines = [prompt(make_example(s).question) + " " + make_example(s).answer for s in range(300)]
    lines += [" ".join(rng.sample(VOCABULARY, len(VOCABULARY))) for _ in range(50)]
    return lines * 3


def answer_token_ids(tokenizer) -> dict[str, int]:
    ids = {}
    for word in ANSWERS:
        pieces = tokenizer(" " + word, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            raise RuntimeError(f"answer {word!r} is not one token: {pieces}")
        ids[word] = pieces[0]
    return ids


def batch_inputs(processor, examples, device):
    # As vLLM renders a chat: the template's text, no BOS added by the tokenizer.
    inputs = processor(text=[prompt(e.question) for e in examples], images=[e.image for e in examples],
                       return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in inputs.items()}


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask.sum(-1) - 1  # right padding


@torch.no_grad()
def evaluate(model, processor, answer_ids, seeds, device, batch=16) -> dict[str, float]:
    model.eval()
    correct = {k: [0, 0] for k in KINDS}
    for i in range(0, len(seeds), batch):
        exs = [make_example(s) for s in seeds[i:i + batch]]
        inputs = batch_inputs(processor, exs, device)
        logits = model(**inputs).logits
        pred = logits[torch.arange(len(exs)), last_positions(inputs["attention_mask"])].argmax(-1)
        for e, p in zip(exs, pred.tolist()):
            correct[e.kind][0] += int(p == answer_ids[e.answer])
            correct[e.kind][1] += 1
    model.train()
    acc = {k: c / n for k, (c, n) in correct.items()}
    acc["all"] = sum(c for c, _ in correct.values()) / sum(n for _, n in correct.values())
    return acc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "checkpoint")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = build_tokenizer(QUALITY_PRESET.vocab_size, tokenizer_corpus())
    answer_ids = answer_token_ids(tokenizer)
    processor = make_processor(QUALITY_PRESET, tokenizer)
    config = preset_config(QUALITY_PRESET, tokenizer)
    model = LlavaNextForConditionalGeneration(config).to(args.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=max(0.05, 2 / args.steps))
    test_seeds = list(TEST_SEEDS)
    rng = random.Random(args.seed)
    start = time.perf_counter()
    loss_avg = None
    for step in range(1, args.steps + 1):
        exs = [make_example(rng.randrange(TEST_SEEDS.start)) for _ in range(args.batch)]
        inputs = batch_inputs(processor, exs, args.device)
        logits = model(**inputs).logits
        last = logits[torch.arange(len(exs)), last_positions(inputs["attention_mask"])]
        target = torch.tensor([answer_ids[e.answer] for e in exs], device=args.device)
        loss = torch.nn.functional.cross_entropy(last.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        if step % 50 == 0:
            progress(f"step {step}/{args.steps} loss {loss_avg:.3f} ({time.perf_counter() - start:.0f}s)")
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, processor, answer_ids, test_seeds[:200], args.device)
            progress(f"step {step}: held-out accuracy " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    acc = evaluate(model, processor, answer_ids, test_seeds, args.device)
    progress("final held-out accuracy " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    note = (f"# Quality checkpoint\n\nTrained by `python -m benchmarks.quality.train --steps {args.steps} "
            f"--batch {args.batch} --lr {args.lr} --seed {args.seed}` on {args.device} in "
            f"{time.perf_counter() - start:.0f}s. Held-out accuracy (all {len(test_seeds)} test scenes, full "
            f"image tokens): " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()) + ".\n")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(args.out, config, processor, state, note)
    progress(f"wrote {args.out}")


if __name__ == "__main__":
    main()
