"""Chat turns: boundaries from rendered prefixes, the plan of bases and deltas, the delta's
budget, selection that excludes served tokens, and the positions a delta takes."""

import pytest
import torch

from pio_fvlm_vllm.algorithm import select
from pio_fvlm_vllm.budget import delta_budget, validate_visual_turns
from pio_fvlm_vllm.positions import GridSpan, ImageSpan, mrope_layout, original_positions
from pio_fvlm_vllm.settings import PioFvlmSettings
from pio_fvlm_vllm.vllm_ext.context import PromptContext
from pio_fvlm_vllm.vllm_ext.served import ServedSets, VisionCache
from pio_fvlm_vllm.vllm_ext.turns import (ChatTurns, Delta, chat_turns, image_starts, index_after_text, plan_turns,
                                          text_count)

pytestmark = pytest.mark.vllm_seams

IMG = 99


def _vicuna(messages, add_generation_prompt):
    """A Vicuna-style template: each message ends in a space the next one's first word absorbs."""
    text = "".join(f"{m['role'].upper()}: {m['content']} " for m in messages)
    return text + ("ASSISTANT:" if add_generation_prompt else "")


_VOCAB: dict[str, int] = {}


def _tokenize(text: str) -> list[int]:
    """Words with their leading space are one token, as a BPE vocabulary makes them; a
    trailing space alone is a token of its own."""
    words, word = [], ""
    for ch in text:
        if ch == " " and word.strip():
            words.append(word)
            word = ""
        word += ch
    if word:
        words.append(word)
    return [_VOCAB.setdefault(w, len(_VOCAB)) for w in words]


def test_chat_turns_finds_each_user_turn_even_where_a_space_joins_the_next_word():
    conversation = [{"role": "user", "content": "<image> what is it ?"}, {"role": "assistant", "content": "red"},
                    {"role": "user", "content": "and left ?"}, {"role": "assistant", "content": "no"},
                    {"role": "user", "content": "how many ?"}]
    prompt = _tokenize(_vicuna(conversation, True))
    turns = chat_turns(_vicuna, _tokenize, conversation, prompt)
    assert turns is not None and len(turns.spans) == 3
    first_end = len(_tokenize(_vicuna(conversation[:1], True)))
    assert turns.spans[0] == (0, first_end)
    assert turns.spans[-1][1] == len(prompt)
    for (s0, e0), (s1, e1) in zip(turns.spans, turns.spans[1:]):
        assert e0 <= s1 < e1  # the next turn starts after the turn before ends
    # Its start is a token boundary of the whole prompt: the history tokens before it agree.
    history = _tokenize(_vicuna(conversation[:2], False))
    assert prompt[: turns.spans[1][0]] == history[: turns.spans[1][0]]


def test_chat_turns_refuses_templates_that_rewrite_history_and_single_turns():
    conversation = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "q2"}]

    def rewriting(messages, add_generation_prompt):  # drops earlier answers, as reasoning strippers do
        kept = [m for m in messages if m["role"] == "user" or m is messages[-1]]
        return _vicuna(kept, add_generation_prompt)

    prompt = _tokenize(rewriting(conversation, True))
    assert chat_turns(rewriting, _tokenize, conversation, prompt) is None
    assert chat_turns(_vicuna, _tokenize, conversation[:1], _tokenize(_vicuna(conversation[:1], True))) is None
    assert chat_turns(_vicuna, _tokenize, conversation[:2], _tokenize(_vicuna(conversation[:2], True))) is None


def test_plan_gives_each_image_its_turns_cut_and_a_delta_per_later_turn():
    turns = ChatTurns(((0, 10), (12, 20), (22, 30)))
    plan = plan_turns(30, [3, 15], turns, "incremental")
    assert plan.cuts == (10, 20)
    assert plan.deltas == (Delta(0, 1, 12, 20), Delta(0, 2, 22, 30), Delta(1, 2, 22, 30))
    assert plan_turns(30, [3, 15], turns, "first_turn").deltas == ()
    assert plan_turns(30, [3, 15], turns, "first_turn").cuts == (10, 20)
    assert plan_turns(30, [3, 15], turns, "reselect") == plan_turns(30, [3, 15], None, "incremental")
    assert plan_turns(30, [3, 15], None, "incremental").cuts == (30, 30)
    assert plan_turns(30, [11], turns, "incremental").deltas == ()  # an image outside every turn


def test_token_index_helpers():
    ids = [1, 2, IMG, IMG, IMG, 3, 4]
    assert image_starts(ids, IMG) == [2]
    assert image_starts([IMG, 1, IMG], IMG) == [0, 2]
    assert text_count(ids, IMG, 6) == 3
    assert index_after_text(ids, IMG, 3) == 6 and index_after_text(ids, IMG, 0) == 0
    with pytest.raises(ValueError):
        index_after_text(ids, IMG, 5)


def test_delta_budget_is_a_share_of_k_and_never_more_than_remains():
    assert delta_budget(2880, 320, 1.0, 320) == 320
    assert delta_budget(2880, 320, 0.25, 320) == 80
    assert delta_budget(2880, 320, 0.0, 320) == 0
    assert delta_budget(400, 320, 1.0, 320) == 80
    assert delta_budget(400, 320, 1.0, 400) == 0


@pytest.mark.parametrize("bad", ["", "Incremental", 1, None, True, ["incremental"]])
def test_visual_turns_validation_names_the_field_and_the_choices(bad):
    with pytest.raises(ValueError, match=r'visual_turns must be one of "incremental", "first_turn", "reselect"'):
        validate_visual_turns(bad)
    assert validate_visual_turns("first_turn") == "first_turn"


def test_context_round_trips_a_delta():
    ctx = PromptContext(40, 400, 120, 7, 3, [1, 2], [3, 4, 5, 6], image_key=11, handoff_text_start=2,
                        text_position=95, served_before=(11, 12), vision_key=2**60 - 1)
    back = PromptContext.unpack(ctx.pack())
    assert back == ctx and back.is_delta and back.first_text_position == 95
    base = PromptContext(40, 400, 5, 7, 3, [1, 2], [3, 4])
    assert not base.is_delta and base.first_text_position == 407


def test_a_delta_takes_no_positions_of_its_own():
    # [2 text][image k=4 of N=10][3 text][delta d=2][2 text]
    positions, shift = original_positions(13, [ImageSpan(2, 4, 10), ImageSpan(9, 2, 0)])
    assert shift == 10 - 4 - 2
    assert positions[6:9].tolist() == [12, 13, 14]  # after the image: as unpruned
    assert positions[11:].tolist() == [15, 16]  # after the delta: continues from the text before it


def test_multimodal_rotary_delta_does_not_advance_text():
    grid = (1, 2, 3)
    plain, bases, _ = mrope_layout(9, [GridSpan(1, 2, grid)])
    with_delta, bases_delta, _ = mrope_layout(11, [GridSpan(1, 2, grid), GridSpan(5, 2, grid, delta=True)])
    assert bases_delta == bases
    assert torch.equal(with_delta[:, :5], plain[:, :5])
    assert torch.equal(with_delta[:, 7:], plain[:, 5:])


def test_selection_excludes_the_tokens_already_served(proxy):
    from .test_algorithm import _context

    ctx = _context(n=40, seed=6)
    settings = PioFvlmSettings(nms_threshold=1.0)  # plain top-k: the ranking alone decides
    fresh = select(proxy, [ctx], [8], settings).kept[0]
    served = fresh[:4]
    delta = select(proxy, [ctx], [8], settings, exclude=[served]).kept[0]
    assert delta.numel() == 8 and not set(delta.tolist()) & set(served.tolist())
    assert set(fresh[4:].tolist()) <= set(delta.tolist())  # the next best are still chosen
    with pytest.raises(ValueError, match="budget"):
        select(proxy, [ctx], [37], settings, exclude=[served])  # more than remain


def test_served_sets_and_vision_cache_are_bounded():
    sets = ServedSets(2)
    for key in (1, 2, 3):
        sets.put(key, torch.tensor([key, 10 + key]))
    assert sets.get(1) is None and sets.get(3).tolist() == [3, 13]
    assert sets.union([2, 3]).tolist() == [2, 3, 12, 13]
    assert sets.union([1, 3]) is None
    cache = VisionCache(max_bytes=2 * 40 * 4)
    cache.put(1, torch.zeros(10, 4))
    cache.put(2, torch.ones(10, 4))
    assert cache.get_all([1, 2], torch.device("cpu"))[1].sum() == 40
    cache.put(3, torch.ones(10, 4))  # evicts the least recently used
    assert cache.get_all([1, 3], torch.device("cpu")) is None
    assert cache.get_all([2, 3], torch.device("cpu")) is not None
    assert cache.get_all([0], torch.device("cpu")) is None


@pytest.mark.parametrize("handoff_layer", [0, 1, 2])
def test_a_pass_continued_from_its_past_equals_the_whole_pass(proxy, handoff_layer):
    """A later turn's proxy pass runs only the rows after the earlier turn's: the scores, the
    hand-off states and the past it leaves are those of one pass over the whole sequence."""
    from pio_fvlm_vllm.algorithm.saliency import gradient_saliency

    from .test_algorithm import _context

    whole = _context(n=30, p=3, s=12, seed=7)
    earlier = type(whole)(whole.image_embeds, whole.prefix_embeds, whole.suffix_embeds[:5])
    kwargs = dict(handoff_layer=handoff_layer, keep_past=True)
    first = gradient_saliency(proxy, [earlier], **kwargs)
    continued = gradient_saliency(proxy, [whole], past=first.pasts[0], **kwargs)
    reference = gradient_saliency(proxy, [whole], **kwargs)
    plain = gradient_saliency(proxy, [whole], handoff_layer=handoff_layer)
    torch.testing.assert_close(continued.scores, reference.scores)
    torch.testing.assert_close(reference.scores, plain.scores)
    if handoff_layer:
        rows = torch.tensor([3, 10, 40, whole.length - 1])
        torch.testing.assert_close(continued.handoff_inputs[0].output_at(proxy, rows),
                                   plain.handoff_inputs[0].output_at(proxy, rows))
    for a, b in zip(continued.pasts[0].keys + continued.pasts[0].states,
                    reference.pasts[0].keys + reference.pasts[0].states):
        torch.testing.assert_close(a, b)
    # A past is refused where it cannot be continued.
    with pytest.raises(ValueError, match="cannot continue"):
        gradient_saliency(proxy, [earlier], past=reference.pasts[0])


def test_token_in_contexts_lose_their_vision_cache_key():
    """A token-in request's pixels cannot be checked against the key it names: it neither
    reads nor fills the vision cache."""
    from types import SimpleNamespace

    from vllm.entrypoints.scale_out.token_in_token_out.mm_serde import decode_mm_kwargs_item, encode_mm_kwargs_item
    from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem, MultiModalKwargsItem

    from pio_fvlm_vllm.vllm_ext.context import CONTEXT_FIELD
    from pio_fvlm_vllm.vllm_ext.token_in import without_vision_keys

    ctx = PromptContext(4, 40, 3, 3, -1, [1, 2], [3], image_key=5, vision_key=77)
    item = MultiModalKwargsItem({CONTEXT_FIELD: MultiModalFieldElem(data=ctx.pack(),
                                                                    field=MultiModalBatchedField(keep_on_cpu=True))})
    features = SimpleNamespace(kwargs_data={"image": [encode_mm_kwargs_item(item)]}, mm_metadata=None)
    without_vision_keys(features)
    back = PromptContext.unpack(decode_mm_kwargs_item(features.kwargs_data["image"][0])[CONTEXT_FIELD].data)
    assert back.vision_key == 0 and back == PromptContext(4, 40, 3, 3, -1, [1, 2], [3], image_key=5)


def test_the_turns_benchmark_compares_each_turn_with_stocks_same_turn():
    from benchmarks.turns import TurnResult, table

    rows = [TurnResult("stock", 1, 3, 0, 2.0, 2.5, 3000, 0), TurnResult("stock", 2, 3, 0, 0.2, 0.3, 3020, 2944),
            TurnResult("plugin", 1, 3, 0, 0.5, 0.6, 340, 0), TurnResult("plugin", 2, 3, 1, 0.3, 0.4, 440, 256)]
    text = table(rows)
    assert "| plugin | 1 | 0.500 | 0.600 | 0.25x | 340 | 0 | 0 |" in text
    assert "| plugin | 2 | 0.300 | 0.400 | 1.50x | 440 | 256 | 1 |" in text
    assert "| stock | 2 | 0.200 | 0.300 | - | 3020 | 2944 | 0 |" in text
