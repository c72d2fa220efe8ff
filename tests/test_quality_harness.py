"""The quality harness measures what it claims: labels line up with pixels, the downsampling
baseline yields exactly k tokens laid out like the model's own, and the grounding targets
name the asked-about object."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.quality.evaluate import area_pool, downsample, token_layout
from benchmarks.quality.task import COLORS, KINDS, SIZES, make_dialogue, make_example
from benchmarks.quality.train import (QUALITY_PRESET, answer_slots, batch_inputs, dialogue_text, patch_targets,
                                      preset_config, prompt, question_tokens, relevant_tokens, tile_counts,
                                      tokenizer_corpus)
from pio_fvlm_vllm.checkpoints import build_tokenizer, make_processor


@pytest.fixture(scope="module")
def parts():
    tokenizer = build_tokenizer(QUALITY_PRESET.vocab_size, tokenizer_corpus())
    return make_processor(QUALITY_PRESET, tokenizer), preset_config(QUALITY_PRESET, tokenizer)


@pytest.mark.parametrize("width,height", [*SIZES, (300, 40), (37, 200)])
def test_token_layout_matches_the_processor_count(parts, width, height):
    processor, config = parts
    inputs = processor(text=prompt("is there a red square ?"), images=[Image.new("RGB", (width, height))],
                       return_tensors="pt", add_special_tokens=False)
    layout = token_layout(config, (height, width))
    assert layout.shape[0] == int((inputs.input_ids == config.image_token_id).sum())
    assert (layout[:64, 0] == 0).all() and (layout[64:, 0] != 0).all()
    rows = layout[layout[:, 0] == 1, 1]
    assert (layout[:, 0] == -1).sum() == rows.unique().numel()  # one newline per grid row


def test_area_pool_is_a_mean_at_one_token_and_identity_at_full_size():
    grid = torch.randn(4, 6, 3)
    assert torch.allclose(area_pool(grid, 1)[0], grid.mean((0, 1)), atol=1e-6)
    assert torch.allclose(area_pool(grid, 24), grid.reshape(24, 3))


def test_downsample_gives_exactly_k_tokens(parts):
    _, config = parts
    layout = token_layout(config, (150, 200))
    tokens = torch.randn(layout.shape[0], 5)
    for k in (1, 2, 3, 17, 30, 68, 136):
        assert downsample(tokens, layout, k).shape == (k, 5)
    content = int((layout[:, 0] >= 0).sum())
    for k in (0, content + 1):
        with pytest.raises(ValueError, match=r"k must be in \[1, "):
            downsample(tokens, layout, k)


def test_patch_labels_line_up_with_the_pixels(parts):
    processor, config = parts
    examples = [make_example(s) for s in range(8)]
    colour, _ = patch_targets(processor, examples, "cpu")
    inputs = batch_inputs(processor, examples, "cpu")
    tiles = torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], tile_counts(config, inputs["image_sizes"]))])
    assert tiles.shape[0] == colour.shape[0]
    mean_rgb = F.avg_pool2d(tiles, processor.patch_size).flatten(2).transpose(1, 2)  # [tiles, patches, 3]
    for i, name in enumerate(COLORS, start=1):
        covered = colour[..., i] > 0.6
        assert covered.any()
        want = torch.tensor(COLORS[name], dtype=torch.float) / 255
        # normalised pixels of a fully covered patch: the object's colour dominates its channels
        assert torch.equal(mean_rgb[covered].mean(0).argmax(), want.argmax())


def test_grounding_targets_name_the_object_and_the_question(parts):
    processor, config = parts
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration(config)
    example = make_example(0)  # "what color is the circle ?" over one blue circle among others
    assert example.question == "what color is the circle ?"
    inputs = batch_inputs(processor, [example], "cpu")
    colour, shape = patch_targets(processor, [example], "cpu")
    relevant = relevant_tokens(model, inputs, [example], colour, shape)[0]
    image = inputs["input_ids"][0] == config.image_token_id
    assert (relevant[~image] == 0).all() and (relevant >= 0.25).sum() >= 2
    at = answer_slots(processor.tokenizer, inputs["input_ids"], [example])
    question = question_tokens(inputs, at, config.image_token_id)[0]
    assert question[image].sum() == 0 and question[at.markers[0]:].sum() == 0
    assert processor.tokenizer.decode(inputs["input_ids"][0][question.bool()]).strip() == example.question


def test_dialogue_supervises_every_turn_and_opens_like_the_served_prompt(parts):
    processor, config = parts
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration(config)
    dialogues = [make_dialogue(s) for s in range(6)]
    assert {t.kind for d in dialogues for t in d.turns} == set(KINDS)
    inputs = batch_inputs(processor, dialogues, "cpu")
    at = answer_slots(processor.tokenizer, inputs["input_ids"], dialogues)
    answers = [t.answer for d in dialogues for t in d.turns]
    assert processor.tokenizer.batch_decode(inputs["input_ids"][at.rows, at.slots + 1][:, None]) == [
        f" {a}" for a in answers]
    # the first turn reads as the single-question prompt, so its answer is learnt in the served context
    d = dialogues[0]
    assert dialogue_text(d.turns).startswith(prompt(d.turns[0].question) + " ")
    # every turn's question is marked, and a position question is grounded in the base view only
    question = question_tokens(inputs, at, config.image_token_id)
    decoded = [processor.tokenizer.decode(inputs["input_ids"][r][q.bool()]) for r, q in zip(at.rows, question)]
    assert [text.split("USER:")[-1].strip() for text in decoded] == [t.question for d in dialogues for t in d.turns]
    colour, shape = patch_targets(processor, dialogues, "cpu")
    relevant = relevant_tokens(model, inputs, dialogues, colour, shape)
    kinds = [t.kind for d in dialogues for t in d.turns]
    base_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2  # base view first
    base_end = inputs["input_ids"].eq(config.image_token_id).int().argmax(-1) + base_tokens
    for r, kind, target in zip(at.rows, kinds, relevant):
        if kind == "position":
            assert target[base_end[r]:].sum() == 0 and (target >= 0.25).any()


def test_committed_checkpoint_answers_and_pio_fvlm_outranks_random():
    """The committed checkpoint loads in the llava-hf layout, answers held-out scenes far above
    the question prior (~45%; it scores 91% on all 400), and PIO-FVLM at keep 0.05 agrees with
    full tokens far more often than random selection at the same budget."""
    from pathlib import Path

    from benchmarks.quality.evaluate import KEEPS, SERVED_NAME, evaluate_hf
    from benchmarks.quality.task import TEST_SEEDS
    from pio_fvlm_vllm.settings import PioFvlmSettings

    assert 0.05 in KEEPS
    checkpoint = Path(__file__).parents[1] / "benchmarks" / "quality" / "checkpoint"
    torch.manual_seed(0)
    result = evaluate_hf(checkpoint, list(TEST_SEEDS)[:160], [1.0, 0.05], PioFvlmSettings(proxy_layer=2))
    assert result["full_accuracy"] >= 0.85
    methods = result["methods"]
    agree = {name: methods[name][0.05]["agree"] / methods[name][0.05]["n"] for name in methods}
    assert agree[SERVED_NAME] >= agree["random (original positions)"] + 0.1, agree


def test_dialogue_split_is_held_out_and_scored_against_full_tokens_per_turn():
    from benchmarks.quality.reductions import VALIDATION_SEEDS
    from benchmarks.quality.task import TEST_SEEDS
    from benchmarks.quality.turns import DIALOGUE_SEEDS, score

    # Training draws dialogues below TEST_SEEDS; the test and validation splits come next.
    assert DIALOGUE_SEEDS.start >= VALIDATION_SEEDS.stop > TEST_SEEDS.stop
    dialogues = [make_dialogue(s) for s in list(DIALOGUE_SEEDS)[:3]]
    truth = [[t.answer for t in d.turns] for d in dialogues]
    wrong_later = [[a[0]] + ["?"] * (len(a) - 1) for a in truth]
    s = score(dialogues, wrong_later, truth)
    assert s["first_accuracy"] == 1.0 and s["later_accuracy"] == 0.0 and s["later_of_full"] == 0.0
    assert s["later_turns"] == sum(len(d.turns) - 1 for d in dialogues) > 0
    assert score(dialogues, truth, truth)["later_of_full"] == 1.0


def test_qwen_trainer_cell_labels_line_up_with_the_merged_tokens(tmp_path):
    """The Qwen harness's per-cell targets follow the merger's raster order: a cell the labels
    call a colour is that colour in the processor's own patches, and the grid is the processor's."""
    from transformers import AutoProcessor

    from benchmarks.quality import train_qwen as tq
    from pio_fvlm_vllm.checkpoints_qwen import build

    build(tq.QUALITY_QWEN, tmp_path, seed=0, dtype="float32", weights=False, corpus=tq.tokenizer_corpus(),
          preprocessor=tq.PREPROCESSOR)
    processor = AutoProcessor.from_pretrained(tmp_path)
    tq.answer_token_ids(processor.tokenizer)  # every answer one token, as it follows "assistant\n"
    examples = [make_example(s) for s in range(6)]
    colour, _, side = tq.cell_targets(processor, examples)
    inputs = tq.batch_inputs(processor, [tq.prompt(e.question) for e in examples], [e.image for e in examples], "cpu")
    grid = inputs["image_grid_thw"]
    assert colour.shape[0] == side.shape[0] == int((grid.prod(-1) // 4).sum())
    assert (inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == colour.shape[0]
    # Patches come 2 x 2 per merged cell, in the cell's raster order: mean colour per cell.
    patches = inputs["pixel_values"].view(-1, 4, 3, 2, 14, 14).mean(dim=(1, 3, 4, 5))  # [cells, 3]
    for i, name in enumerate(COLORS, start=1):
        covered = colour[:, i] > 0.7
        if covered.any():
            want = torch.tensor(COLORS[name], dtype=torch.float)
            assert torch.equal(patches[covered].mean(0).argmax(), want.argmax())
    t, h, w = grid[0].tolist()
    cols = torch.arange(w // 2).repeat(h // 2)
    assert torch.equal(side[: h * w // 4], (cols + 0.5 >= (w // 2) / 2).long())  # cell centres


def test_committed_qwen_checkpoint_answers_and_the_served_placement_outranks_random():
    """The committed Qwen2.5-VL loads in the published layout, answers held-out scenes above the
    question prior through the reference's Qwen path, and at keep 0.05 the served placement
    (PIO-FVLM, hand-off after layer K) agrees with full tokens more often than random tokens."""
    from pathlib import Path

    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from benchmarks.quality import train_qwen as tq
    from benchmarks.quality.task import TEST_SEEDS
    from pio_fvlm_vllm.budget import budget
    from pio_fvlm_vllm.reference import HFReference
    from pio_fvlm_vllm.settings import PioFvlmSettings

    checkpoint = Path(__file__).parents[1] / "benchmarks" / "quality" / "checkpoint_qwen2_5_vl"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(checkpoint)
    ref = HFReference(model, processor, PioFvlmSettings(proxy_layer=2))
    ids = tq.answer_token_ids(processor.tokenizer)
    gen = torch.Generator().manual_seed(0)
    correct = agree_served = agree_random = 0
    scenes = list(TEST_SEEDS)[:80]
    for seed in scenes:
        ex = make_example(seed)
        prepared = ref.prepare(tq.prompt(ex.question), [ex.image], add_special_tokens=False)
        full = int(ref.last_logits(prepared, None).argmax())
        correct += full == ids[ex.answer]
        agree_served += int(ref.last_logits(prepared, ref.select(prepared, 0.05), "handoff").argmax()) == full
        random = [torch.randperm(e - s, generator=gen)[: budget(e - s, 0.05)].sort().values
                  for s, e in prepared.image_spans]
        agree_random += int(ref.last_logits(prepared, random, "input_positions").argmax()) == full
    assert correct / len(scenes) >= 0.75, correct
    assert agree_served >= agree_random + 0.1 * len(scenes), (agree_served, agree_random)
