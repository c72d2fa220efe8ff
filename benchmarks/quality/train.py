"""Trains a small LLaVA-NeXT on the synthetic task and writes it in the llava-hf layout.

    python -m benchmarks.quality.train --out benchmarks/quality/checkpoint

Seeded and deterministic for a given machine; about 45 minutes on 2 CPU cores. The
architecture is LLaVA-NeXT's (CLIP tower, 2-layer GELU projector, anyres tiles with
unpadding and newline tokens, Llama decoder), scaled down: 112-pixel tiles of 14-pixel
patches (64 tokens a tile), a 4-layer CLIP of width 96 and a 4-layer Llama of width 128.
Each training scene is asked one question of every kind it allows, one after another in a
single chat, so one pass over the image supervises up to four answers; the first turn reads
exactly like the single-question prompt that is served. While training, a linear head on the
projector output also predicts, for every 14-pixel patch of every tile, the colour and shape
of the object under it (dense targets rendered from the scene, run through the processor's
own resizing and tiling), and the attention of each answer slot is pointed at its question
and then at the object it names. That teaches the vision tower to see objects in a few
hundred steps, so the decoder can learn to ask about them; without it the model sits at
chance for thousands of steps. The head is dropped when the checkpoint is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pio_fvlm_vllm.checkpoints import Preset, build_tokenizer, make_processor, preset_config, save_checkpoint

from ..common import progress
from .task import ANSWERS, COLORS, KINDS, SHAPES, TEST_SEEDS, VOCABULARY, label_image, make_dialogue, make_example

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


def dialogue_text(turns) -> str:
    """The turns as one chat, answers included: the answer to turn i is the token after its
    i-th "ASSISTANT:". The first turn reads exactly like the single-question prompt."""
    first, *rest = turns
    return prompt(first.question) + f" {first.answer}" + "".join(
        f" USER: {t.question} ASSISTANT: {t.answer}" for t in rest)


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
    inputs = processor(text=[dialogue_text(e.turns) for e in examples], images=[e.image for e in examples],
                       return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in inputs.items()}


class AnswerSlots(NamedTuple):
    """Where each turn's answer is asked, turn by turn ([turns] each): the row, the first token
    of its " ASSISTANT:" marker, and the marker's last token, from which the answer is predicted."""

    rows: torch.Tensor
    markers: torch.Tensor
    slots: torch.Tensor


def answer_slots(tokenizer, input_ids: torch.Tensor, examples, marker_text: str = " ASSISTANT:") -> AnswerSlots:
    marker = tokenizer(marker_text, add_special_tokens=False).input_ids
    width = len(marker)
    windows = input_ids.unfold(1, width, 1)  # [B, L - width + 1, width]
    hit = (windows == torch.tensor(marker, device=input_ids.device)).all(-1)
    rows, starts = hit.nonzero(as_tuple=True)
    turns = sum(len(e.turns) for e in examples)
    if rows.numel() != turns:
        raise RuntimeError(f"found {rows.numel()} answer slots for {turns} turns")
    return AnswerSlots(rows, starts, starts + width - 1)


def patch_targets(processor, examples, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch class shares of the scene under every tile the model sees.

    Returns (colour [tiles, patches, len(COLORS) + 1], shape [tiles, patches, len(SHAPES) + 1]),
    class 0 = background, tiles in the order LLaVA-NeXT feeds them to the projector.
    """
    from PIL.Image import Resampling

    ip = processor.image_processor
    maps = [ip(label_image(*e.image.size, e.objects), resample=Resampling.NEAREST, do_rescale=False,
               do_normalize=False, return_tensors="pt").pixel_values[0] for e in examples]
    labels = torch.cat(maps).round().long()  # [tiles, 3, H, W]

    def shares(channel: torch.Tensor, classes: int) -> torch.Tensor:
        onehot = F.one_hot(channel.clamp(0, classes - 1), classes).permute(0, 3, 1, 2).float()
        return F.avg_pool2d(onehot, processor.patch_size).flatten(2).transpose(1, 2)

    return shares(labels[:, 0], len(COLORS) + 1).to(device), shares(labels[:, 1], len(SHAPES) + 1).to(device)


def tile_counts(config, image_sizes) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
            for s in image_sizes]


def base_column_loss(logits: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Cross-entropy of each base-view patch's column. The base view is the whole picture, so
    its columns are the only place a tile-local tower can see left from right; this keeps
    that in the features the decoder reads (RoPE gives the decoder relative order only)."""
    first = torch.tensor([0, *counts[:-1]], device=logits.device).cumsum(0)  # base tile of each image
    base = logits[first]  # [images, patches, side]
    side = base.shape[-1]
    column = torch.arange(side * side, device=logits.device) % side
    return F.cross_entropy(base.flatten(0, 1), column.repeat(len(counts)))


def relevant_tokens(model, inputs, examples, colour: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """[turns, L] share of each prompt position covered by the object(s) each turn's question
    names, turns in order of `answer_slots`.

    The per-patch shares are packed exactly like the image features (unpadding, newline
    tokens = 0) and scattered to the image-token positions of the turn's row. A position
    question looks only at the base view: the grid tiles are seen one by one, so only the
    whole-picture view can tell left from right.
    """
    config = model.config
    counts = tile_counts(config, inputs["image_sizes"])
    out = []
    for row, (e, c, s) in enumerate(zip(examples, colour.split(counts), shape.split(counts))):
        image = inputs["input_ids"][row] == config.image_token_id
        for turn in e.turns:
            words = turn.question.split()
            share = torch.ones_like(c[..., 0])
            named_colour = [w for w in words if w in COLORS]
            named_shape = [w for w in words if w in SHAPES]
            if named_colour:
                share = share * c[..., 1 + list(COLORS).index(named_colour[0])]
            if named_shape:
                share = share * s[..., 1 + SHAPES.index(named_shape[0])]
            if turn.kind == "position":
                share[1:] = 0
            packed, _ = model.model.pack_image_features([share[..., None]], inputs["image_sizes"][row:row + 1],
                                                        "default", image_newline=torch.zeros(1, device=c.device))
            target = torch.zeros(image.shape, device=c.device)
            target[image] = packed[0].squeeze(-1)
            out.append(target)
    return torch.stack(out)


def question_tokens(inputs, at: AnswerSlots, image_token_id: int) -> torch.Tensor:
    """[turns, L] 1.0 on each turn's question: the text between the image (first turn) or the
    previous answer and the turn's " ASSISTANT:" marker."""
    ids = inputs["input_ids"]
    pos = torch.arange(ids.shape[1], device=ids.device)
    last_image = torch.where(ids == image_token_id, pos, -1).amax(-1)[at.rows]
    first_turn = torch.ones_like(at.rows, dtype=torch.bool)
    first_turn[1:] = at.rows[1:] != at.rows[:-1]
    previous_answer = torch.cat([at.slots[:1], at.slots[:-1]]) + 1
    start = torch.where(first_turn, last_image, previous_answer)
    return ((pos > start[:, None]) & (pos < at.markers[:, None])).float()


def attention_mass_loss(attn: torch.Tensor, target: torch.Tensor, at: AnswerSlots, heads: int) -> torch.Tensor:
    """-log of the attention mass each answer slot puts on its `target` positions ([turns, L]
    shares; >= 0.25 counts), mean over the first `heads` heads and over the turns that have a
    target (a "no" question may name nothing that is in the picture). The other heads stay
    free: counting needs attention that is not all on the counted objects."""
    attn_rows = attn[at.rows, :heads, at.slots]  # [turns, heads, L]
    target = (target >= 0.25).float()[:, None]
    has = target.flatten(1).any(-1)
    if not has.any():
        return attn.new_zeros(())
    mass = (attn_rows * target).sum(-1)[has]
    return -(mass + 1e-6).log().mean()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def optimizer_step(loss, parts: dict, model, opt, sched, loss_avg: dict | None, step: int, steps: int,
                   start: float) -> dict:
    """One clipped step; returns the running average of the loss parts, logged every 50 steps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    parts = {k: v.item() for k, v in parts.items()}
    loss_avg = parts if loss_avg is None else {k: 0.95 * loss_avg[k] + 0.05 * v for k, v in parts.items()}
    if step % 50 == 0:
        progress(f"step {step}/{steps} losses " + ", ".join(f"{k} {v:.3f}" for k, v in loss_avg.items())
                 + f" ({time.perf_counter() - start:.0f}s)")
    return loss_avg


@torch.no_grad()
def evaluate(model, processor, answer_ids, seeds, device, batch=16) -> dict[str, float]:
    model.eval()
    correct = {k: [0, 0] for k in KINDS}
    for i in range(0, len(seeds), batch):
        exs = [make_example(s) for s in seeds[i:i + batch]]
        inputs = batch_inputs(processor, exs, device)
        logits = model(**inputs).logits
        at = answer_slots(processor.tokenizer, inputs["input_ids"], exs)
        pred = logits[at.rows, at.slots].argmax(-1)
        for e, p in zip(exs, pred.tolist()):
            correct[e.kind][0] += int(p == answer_ids[e.answer])
            correct[e.kind][1] += 1
    model.train()
    return kind_accuracy(correct)


def kind_accuracy(correct: dict[str, list[int]]) -> dict[str, float]:
    """{kind: [right, asked]} -> accuracy per kind and over all of them ("all")."""
    acc = {k: c / n for k, (c, n) in correct.items()}
    acc["all"] = sum(c for c, _ in correct.values()) / sum(n for _, n in correct.values())
    return acc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "checkpoint")
    p.add_argument("--steps", type=int, default=3500)
    p.add_argument("--init", type=Path, help="continue from the weights of a checkpoint this script wrote "
                   "(a fresh learning-rate schedule; the patch head starts anew)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-patch colour/shape loss")
    p.add_argument("--ground-weight", type=float, default=1.0, help="weight of the attention grounding loss")
    p.add_argument("--ground-layer", type=int, default=1, help="decoder layer (0-based) whose last-token "
                   "attention is pointed at the named object; the layer before it reads the question")
    p.add_argument("--ground-heads", type=int, default=2, help="how many attention heads (the first ones) "
                   "the grounding loss points; the rest stay free")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--text-layers", type=int, default=QUALITY_PRESET.text["num_hidden_layers"],
                   help="decoder layers of the language model (a deeper variant of the preset)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.steps < 10:
        p.error(f"--steps must be at least 10 (the learning-rate warm-up needs them), got {args.steps}")
    for flag, value in (("--batch", args.batch), ("--eval-every", args.eval_every)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.text_layers < 2:
        p.error(f"--text-layers must be at least 2, got {args.text_layers}")
    preset = dataclasses.replace(QUALITY_PRESET, text={**QUALITY_PRESET.text, "num_hidden_layers": args.text_layers})
    layers = preset.text["num_hidden_layers"]
    if not 1 <= args.ground_layer < layers:
        p.error(f"--ground-layer must be in [1, {layers - 1}] (the layer before it reads the question), "
                f"got {args.ground_layer}")
    heads = preset.text["num_attention_heads"]
    if not 1 <= args.ground_heads <= heads:
        p.error(f"--ground-heads must be in [1, {heads}], got {args.ground_heads}")
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = build_tokenizer(preset.vocab_size, tokenizer_corpus())
    answer_ids = answer_token_ids(tokenizer)
    processor = make_processor(preset, tokenizer)
    config = preset_config(preset, tokenizer)
    # Eager attention: the grounding loss reads the attention probabilities.
    model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation="eager")
    history = "# Quality checkpoint\n\nTrained by "
    if args.init:
        if not (args.init / "model.safetensors").is_file():
            p.error(f"--init {args.init} holds no model.safetensors")
        # A continued run keeps the history of the checkpoint it started from; read it now, as
        # --out may be the same directory.
        readme = args.init / "README.md"
        history = (readme.read_text() if readme.is_file() else f"# Quality checkpoint\n\nStarted from {args.init}.\n"
                   ) + "\nThen continued by "
        init = LlavaNextForConditionalGeneration.from_pretrained(args.init, attn_implementation="eager")
        shapes = {k: v.shape for k, v in init.state_dict().items()}
        if shapes != {k: v.shape for k, v in model.state_dict().items()} or \
                init.config.image_token_id != config.image_token_id:
            p.error(f"--init {args.init} is not a checkpoint of this preset")
        model.load_state_dict(init.state_dict())
    model = model.to(args.device)
    model.train()
    side = config.vision_config.image_size // config.vision_config.patch_size
    n_colour, n_shape = len(COLORS) + 1, len(SHAPES) + 1
    aux_head = torch.nn.Linear(config.text_config.hidden_size, n_colour + n_shape + side).to(args.device)
    projected: list[torch.Tensor] = []
    model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: projected.append(out))
    opt = torch.optim.AdamW([*model.parameters(), *aux_head.parameters()], lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=max(0.05, 2 / args.steps))
    test_seeds = list(TEST_SEEDS)
    rng = random.Random(args.seed)
    start = time.perf_counter()
    loss_avg = None
    for step in range(1, args.steps + 1):
        exs = [make_dialogue(rng.randrange(TEST_SEEDS.start)) for _ in range(args.batch)]
        inputs = batch_inputs(processor, exs, args.device)
        projected.clear()
        out = model(**inputs, output_attentions=bool(args.ground_weight))
        at = answer_slots(tokenizer, inputs["input_ids"], exs)
        target = torch.tensor([answer_ids[t.answer] for e in exs for t in e.turns], device=args.device)
        loss = answer_loss = F.cross_entropy(out.logits[at.rows, at.slots].float(), target)
        parts = {"answer": answer_loss}
        colour, shape = patch_targets(processor, exs, args.device)
        if args.aux_weight:
            aux = aux_head(projected[0].float())
            loss_aux = (soft_cross_entropy(aux[..., :n_colour], colour)
                        + soft_cross_entropy(aux[..., n_colour:n_colour + n_shape], shape)
                        + base_column_loss(aux[..., n_colour + n_shape:], tile_counts(config, inputs["image_sizes"])))
            loss = loss + args.aux_weight * loss_aux
            parts["patches"] = loss_aux
        if args.ground_weight:
            relevant = relevant_tokens(model, inputs, exs, colour, shape)
            question = question_tokens(inputs, at, config.image_token_id)
            heads = args.ground_heads
            parts["object"] = attention_mass_loss(out.attentions[args.ground_layer], relevant, at, heads)
            parts["question"] = attention_mass_loss(out.attentions[args.ground_layer - 1], question, at, heads)
            loss = loss + args.ground_weight * (parts["object"] + parts["question"])
        loss_avg = optimizer_step(loss, parts, model, opt, sched, loss_avg, step, args.steps, start)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, processor, answer_ids, test_seeds[:200], args.device)
            progress(f"step {step}: held-out accuracy " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    acc = evaluate(model, processor, answer_ids, test_seeds, args.device)
    progress("final held-out accuracy " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    command = f"--steps {args.steps} --batch {args.batch} --lr {args.lr} --seed {args.seed}"
    stage = (f"`python -m benchmarks.quality.train {command}" + (f" --init {args.init}`" if args.init else "`")
             + f" on {args.device} in {time.perf_counter() - start:.0f}s. Held-out accuracy (all {len(test_seeds)}"
             " test scenes, full image tokens): " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()) + ".\n")
    note = history + stage
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(args.out, config, processor, state, note)
    progress(f"wrote {args.out}")


if __name__ == "__main__":
    main()
