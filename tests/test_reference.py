"""The Hugging Face reference path against Hugging Face's own forward."""

import pytest
import torch

from pio_fvlm_vllm.budget import budget
from pio_fvlm_vllm.images import synthetic_image
from pio_fvlm_vllm.settings import PioFvlmSettings

PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from pio_fvlm_vllm.reference import HFReference

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    return HFReference(model, AutoProcessor.from_pretrained(tiny_checkpoint), PioFvlmSettings())


@pytest.fixture(scope="module")
def prepared(reference):
    return reference.prepare(PROMPT, [synthetic_image(640, 480, seed=1)], with_importance=True)


def test_unpruned_forward_matches_transformers(reference, prepared):
    img = synthetic_image(640, 480, seed=1)
    inputs = reference.processor(text=PROMPT, images=[img], return_tensors="pt")
    with torch.no_grad():
        expected = reference.model(**inputs).logits[0, -1]
    torch.testing.assert_close(reference.last_logits(prepared, None), expected, rtol=1e-4, atol=1e-4)


def test_keeping_everything_is_the_unpruned_forward(reference, prepared):
    everything = [torch.arange(e - s) for s, e in prepared.image_spans]
    for placement in ("layer_k", "input", "input_positions"):
        torch.testing.assert_close(reference.last_logits(prepared, everything, placement),
                                   reference.last_logits(prepared, None))


def test_selection_budget_and_placements_differ(reference, prepared):
    (kept,) = reference.select(prepared, 0.111)
    (start, end), = prepared.image_spans
    assert kept.numel() == budget(end - start, 0.111)
    inside = reference.last_logits(prepared, [kept], "layer_k")
    before = reference.last_logits(prepared, [kept], "input")
    assert not torch.allclose(inside, before)


def test_input_placement_is_the_shorter_prompt_the_server_runs(reference, prepared):
    """The plugin serves a prompt with k placeholders: positions renumbered, nothing pruned."""
    (kept,) = reference.select(prepared, 0.111)
    (start, end), = prepared.image_spans
    shorter = reference.with_image_tokens(prepared, [prepared.embeds[start:end][kept]])
    torch.testing.assert_close(reference.last_logits(prepared, [kept], "input"),
                               reference.last_logits(shorter, None), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reference.last_logits(prepared, [kept], "input_positions"),
                              reference.last_logits(shorter, None))


def test_unknown_placement_is_refused(reference, prepared):
    with pytest.raises(ValueError, match="placement must be one of"):
        reference.last_logits(prepared, None, "layer_0")


def test_encoder_involved_two_stages(reference, prepared):
    (start, end), = prepared.image_spans
    stage1, budgets = reference.visionzip_stage(prepared, 0.111)
    (s1, e1), = stage1.image_spans
    assert budgets == [budget(end - start, 0.111)]
    assert budgets[0] <= e1 - s1 < end - start
    (kept,) = reference.select(stage1, 0.111, budgets)
    assert kept.numel() == budgets[0]
    assert len(reference.generate(stage1, [kept], max_new_tokens=2, placement="input")) == 2
    # CLS attention is a distribution over each crop's patches; newline tokens score 0.
    importance = prepared.importance[0]
    assert importance.shape == (end - start,) and (importance >= 0).all()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from pio_fvlm_vllm.checkpoints import build
    from pio_fvlm_vllm.reference import HFReference

    path = build("tiny-qwen2.5-vl", tmp_path_factory.mktemp("ckpt") / "tiny-qwen2.5-vl")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return HFReference(model, AutoProcessor.from_pretrained(path), PioFvlmSettings())


QWEN_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which square is red?<|im_end|>\n"
               "<|im_start|>assistant\n")


def test_qwen_reference_reads_multimodal_rotary_positions_as_the_model_does(qwen):
    """Qwen2.5-VL through the reference: positions from the model's own `get_rope_index`, the
    unpruned forward equal to transformers' own, and the served placement (hand-off after
    layer K) equal to the paper's pruning after layer K."""
    image = synthetic_image(640, 480, seed=3)
    prepared = qwen.prepare(QWEN_PROMPT, [image], add_special_tokens=False)
    assert prepared.positions.shape == (3, prepared.input_ids.numel()) and len(prepared.grids) == 1
    inputs = qwen.processor(text=QWEN_PROMPT, images=[image], return_tensors="pt")
    with torch.no_grad():
        expected = qwen.model(**inputs).logits[0, -1]
    torch.testing.assert_close(qwen.last_logits(prepared, None), expected, rtol=1e-4, atol=1e-4)
    (kept,) = qwen.select(prepared, 0.111)
    (start, end), = prepared.image_spans
    assert kept.numel() == budget(end - start, 0.111)
    everything = [torch.arange(end - start)]
    torch.testing.assert_close(qwen.last_logits(prepared, everything, "input_positions"), expected,
                               rtol=1e-4, atol=1e-4)
    paper = qwen.last_logits(prepared, [kept], "layer_k")
    # Every text row after the image is handed off here and Qwen keeps original (t, h, w)
    # positions, so the served placement is the paper's own, not an approximation of it.
    torch.testing.assert_close(qwen.last_logits(prepared, [kept], "handoff"), paper, rtol=1e-5, atol=1e-5)
    original = qwen.last_logits(prepared, [kept], "input_positions")
    assert (original - paper).abs().max() > 1e-3, "pruning before layer 0 should change the answer's logits"
    with pytest.raises(ValueError, match="Qwen2.5-VL's tower has no CLS token"):
        qwen.prepare(QWEN_PROMPT, [image], with_importance=True)
