"""Trains a small Qwen2.5-VL on the synthetic task and writes it in the published layout.

    python -m benchmarks.quality.train_qwen --out benchmarks/quality/checkpoint_qwen2_5_vl

The architecture is Qwen2.5-VL's (windowed ViT with 2-D rotary, 2x2 patch merger, a Qwen2
decoder with multimodal rotary positions), scaled down: a 4-block ViT of width 96 and a
4-layer decoder of width 128. Images go through the published `Qwen2VLImageProcessor` with
dynamic resolution: each scene is resized, aspect kept, to a multiple of 28 pixels with at
least `MIN_PIXELS` (about 144 tokens an image). The chat is the published template's. The
training signals are `train.py`'s, in Qwen's terms: the answer tokens of a dialogue that asks
each kind of question in turn, a linear head on the merger output predicting colour, shape
and left/right half of every 28-pixel cell, and two heads of each answer slot pointed at the
question in decoder layer 1 and at the named object in layer 2. The head is dropped when the
checkpoint is written; the model is a plain Qwen2.5-VL.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pio_fvlm_vllm.checkpoints_qwen import QwenShape, build

from ..common import progress
from .task import ANSWERS, COLORS, KINDS, SHAPES, TEST_SEEDS, VOCABULARY, label_image, make_dialogue, make_example
from .train import (answer_slots, attention_mass_loss, kind_accuracy, optimizer_step, question_tokens,
                    soft_cross_entropy)

QUALITY_QWEN = QwenShape(
    text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4),
    vision=dict(depth=4, hidden_size=96, intermediate_size=384, num_heads=4, fullatt_block_indexes=[1, 3]),
    mrope_section=[4, 6, 6], vocab_size=640, text_vocab=600, tie_word_embeddings=False,
)
CELL = 28  # pixels of one merged token: 14-pixel patches, merged 2 x 2
MIN_PIXELS = 144 * CELL * CELL  # every scene of the task is smaller: resized up to about 144 tokens
PREPROCESSOR = {"min_pixels": MIN_PIXELS, "max_pixels": 4 * MIN_PIXELS}
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
MARKER = "<|im_start|>assistant\n"


def prompt(question: str) -> str:
    """What the checkpoint's chat template renders for one user turn, an image then the question."""
    return f"{SYSTEM}<|im_start|>user\n{IMAGE}{question}<|im_end|>\n{MARKER}"


def dialogue_text(turns) -> str:
    first, *rest = turns
    return prompt(first.question) + first.answer + "".join(
        f"<|im_end|>\n<|im_start|>user\n{t.question}<|im_end|>\n{MARKER}{t.answer}" for t in rest)


def tokenizer_corpus() -> list[str]:
    rng = random.Random(0)
    lines = [make_example(s).question + " " + make_example(s).answer for s in range(300)]
    lines += [" ".join(rng.sample(VOCABULARY, len(VOCABULARY))) for _ in range(50)]
    lines += [" ".join(ANSWERS)] * 20 + ["\n".join(ANSWERS)] * 20
    return lines * 3


def answer_token_ids(tokenizer) -> dict[str, int]:
    """An answer follows "assistant\\n" with no space: each must be one token as it stands."""
    ids = {}
    for word in ANSWERS:
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            raise RuntimeError(f"answer {word!r} is not one token: {pieces}")
        ids[word] = pieces[0]
    return ids


def batch_inputs(processor, texts, images, device):
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in inputs.items()}


def cell_targets(processor, examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per merged token, in the order the merger emits them (raster order of 28-pixel cells):
    colour shares [T, len(COLORS) + 1], shape shares [T, len(SHAPES) + 1] (class 0 = background)
    and which half of the picture the cell is in [T] (0 left, 1 right)."""
    from PIL.Image import Resampling
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = processor.image_processor
    colour, shape, side = [], [], []
    for e in examples:
        w, h = e.image.size
        hh, ww = smart_resize(h, w, factor=CELL, min_pixels=ip.size["shortest_edge"],
                              max_pixels=ip.size["longest_edge"])
        labels = label_image(w, h, e.objects).resize((ww, hh), Resampling.NEAREST)
        labels = torch.from_numpy(np.asarray(labels).copy()).permute(2, 0, 1).long()  # [3, hh, ww]

        def shares(channel: torch.Tensor, classes: int) -> torch.Tensor:
            onehot = F.one_hot(channel.clamp(0, classes - 1), classes).permute(2, 0, 1).float()[None]
            return F.avg_pool2d(onehot, CELL)[0].flatten(1).T  # [cells, classes]

        colour.append(shares(labels[0], len(COLORS) + 1))
        shape.append(shares(labels[1], len(SHAPES) + 1))
        cols = torch.arange(ww // CELL).repeat(hh // CELL)
        side.append(((cols + 0.5) * CELL >= ww / 2).long())
    return torch.cat(colour), torch.cat(shape), torch.cat(side)


def relevant_tokens(inputs, examples, colour: torch.Tensor, shape: torch.Tensor, image_token_id: int
                    ) -> torch.Tensor:
    """[turns, L] share of each prompt position covered by the object(s) each turn's question
    names, turns in order of `answer_slots`."""
    counts = [int(n) for n in (inputs["image_grid_thw"].prod(-1) // 4).tolist()]
    out = []
    for row, (e, c, s) in enumerate(zip(examples, colour.split(counts), shape.split(counts))):
        image = inputs["input_ids"][row] == image_token_id
        for turn in e.turns:
            words = turn.question.split()
            share = torch.ones(c.shape[0])
            named_colour = [w for w in words if w in COLORS]
            named_shape = [w for w in words if w in SHAPES]
            if named_colour:
                share = share * c[:, 1 + list(COLORS).index(named_colour[0])]
            if named_shape:
                share = share * s[:, 1 + SHAPES.index(named_shape[0])]
            target = torch.zeros(image.shape)
            target[image.cpu()] = share
            out.append(target)
    return torch.stack(out).to(inputs["input_ids"].device)


@torch.no_grad()
def evaluate(model, processor, answer_ids, seeds, device, batch=16) -> dict[str, float]:
    model.eval()
    correct = {k: [0, 0] for k in KINDS}
    for i in range(0, len(seeds), batch):
        exs = [make_example(s) for s in seeds[i:i + batch]]
        processor.tokenizer.padding_side = "left"
        inputs = batch_inputs(processor, [prompt(e.question) for e in exs], [e.image for e in exs], device)
        processor.tokenizer.padding_side = "right"
        pred = model(**inputs).logits[:, -1].argmax(-1)
        for e, p in zip(exs, pred.tolist()):
            correct[e.kind][0] += int(p == answer_ids[e.answer])
            correct[e.kind][1] += 1
    model.train()
    return kind_accuracy(correct)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "checkpoint_qwen2_5_vl")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--init", type=Path, help="continue from the weights of a checkpoint this script wrote")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--ground-weight", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.steps < 10:
        p.error(f"--steps must be at least 10 (the learning-rate warm-up needs them), got {args.steps}")
    for flag, value in (("--batch", args.batch), ("--eval-every", args.eval_every)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(args.seed)
    layout = Path(tempfile.mkdtemp(prefix="qwen-quality-"))
    build(QUALITY_QWEN, layout, seed=args.seed, dtype="float32", weights=False, corpus=tokenizer_corpus(),
          preprocessor=PREPROCESSOR)
    processor = AutoProcessor.from_pretrained(layout)
    tokenizer = processor.tokenizer
    answer_ids = answer_token_ids(tokenizer)
    config = AutoConfig.from_pretrained(layout)
    # Eager attention in the decoder: the grounding loss reads its attention probabilities.
    attention = {"text_config": "eager", "vision_config": "sdpa", "": "eager"}
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attention)
    history = "# Qwen2.5-VL quality checkpoint\n\nTrained by "
    if args.init:
        readme = args.init / "README.md"
        history = (readme.read_text() if readme.is_file() else "") + "\nThen continued by "
        init = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.init)
        model.load_state_dict(init.state_dict())
    model = model.to(args.device)
    model.train()
    image_token_id = config.image_token_id
    n_colour, n_shape = len(COLORS) + 1, len(SHAPES) + 1
    aux_head = torch.nn.Linear(config.text_config.hidden_size, n_colour + n_shape + 2).to(args.device)
    merged: list[torch.Tensor] = []
    # The tower's pooled output: the merger's cells, back in raster order.
    model.model.visual.register_forward_hook(lambda _m, _i, out: merged.append(out.pooler_output))
    opt = torch.optim.AdamW([*model.parameters(), *aux_head.parameters()], lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=max(0.05, 2 / args.steps))
    test_seeds = list(TEST_SEEDS)
    rng = random.Random(args.seed)
    start = time.perf_counter()
    loss_avg = None
    for step in range(1, args.steps + 1):
        exs = [make_dialogue(rng.randrange(TEST_SEEDS.start)) for _ in range(args.batch)]
        inputs = batch_inputs(processor, [dialogue_text(e.turns) for e in exs], [e.image for e in exs], args.device)
        merged.clear()
        out = model(**inputs, output_attentions=bool(args.ground_weight))
        at = answer_slots(tokenizer, inputs["input_ids"], exs, MARKER)
        target = torch.tensor([answer_ids[t.answer] for e in exs for t in e.turns], device=args.device)
        loss = answer_loss = F.cross_entropy(out.logits[at.rows, at.slots].float(), target)
        parts = {"answer": answer_loss}
        colour, shape, side = (t.to(args.device) for t in cell_targets(processor, exs))
        if args.aux_weight:
            aux = aux_head(merged[0].float())
            loss_aux = (soft_cross_entropy(aux[:, :n_colour], colour)
                        + soft_cross_entropy(aux[:, n_colour:n_colour + n_shape], shape)
                        + F.cross_entropy(aux[:, n_colour + n_shape:], side))
            loss = loss + args.aux_weight * loss_aux
            parts["cells"] = loss_aux
        if args.ground_weight:
            relevant = relevant_tokens(inputs, exs, colour.cpu(), shape.cpu(), image_token_id)
            question = question_tokens(inputs, at, image_token_id)
            parts["object"] = attention_mass_loss(out.attentions[1], relevant, at, 2)
            parts["question"] = attention_mass_loss(out.attentions[0], question, at, 2)
            loss = loss + args.ground_weight * (parts["object"] + parts["question"])
        loss_avg = optimizer_step(loss, parts, model, opt, sched, loss_avg, step, args.steps, start)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, processor, answer_ids, test_seeds[:200], args.device)
            progress(f"step {step}: held-out accuracy " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
            # Written at every evaluation, so a run stopped early leaves its latest weights.
            write(args, model, history, step, acc, len(test_seeds[:200]), time.perf_counter() - start)
    acc = evaluate(model, processor, answer_ids, test_seeds, args.device)
    progress("final held-out accuracy " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    write(args, model, history, args.steps, acc, len(test_seeds), time.perf_counter() - start)
    progress(f"wrote {args.out}")


def write(args, model, history: str, step: int, acc: dict[str, float], scenes: int, seconds: float) -> None:
    command = f"--steps {args.steps} --batch {args.batch} --lr {args.lr} --seed {args.seed}"
    stage = (f"`python -m benchmarks.quality.train_qwen {command}" + (f" --init {args.init}`" if args.init else "`")
             + f", step {step} of {args.steps}, on {args.device} in {seconds:.0f}s. Held-out accuracy ({scenes}"
             " test scenes, full image tokens): " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()) + ".\n")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    build(QUALITY_QWEN, args.out, seed=args.seed, dtype="float32", weights=True, corpus=tokenizer_corpus(),
          preprocessor=PREPROCESSOR, state=state)
    (args.out / "README.md").write_text(history + stage)


if __name__ == "__main__":
    main()
