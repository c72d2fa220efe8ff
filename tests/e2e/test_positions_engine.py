"""On the real engine (V1 runner, in-process): a pruned request's prefill and decode positions
are the unpruned prompt's, with the image split across prefill chunks and after a prefix-cache
hit, and the hand-off rows are the first image's kept tokens and the text after it."""

import os

import pytest
import torch

from pio_fvlm_vllm.images import synthetic_image

from .helpers import QUESTION_B, environment

CHUNK = 128  # tokens per step: a pruned 640x480 image (257 kept tokens) spans three steps


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    # The model lives in this process. A server default below 1.0 with a small step budget is
    # where profiling pruned dummy images would leave the encoder cache too small for the
    # keep-1.0 requests below: profiling must stay unpruned.
    with environment(VLLM_ENABLE_V1_MULTIPROCESSING="0", PIO_FVLM_VISUAL_KEEP="0.25"):
        llm = LLM(model=str(tiny_checkpoint), dtype="float32", max_model_len=4096, seed=0, enforce_eager=True,
                  max_num_batched_tokens=CHUNK, enable_prefix_caching=True)
        yield llm
        del llm


class Recorder:
    """Positions, hand-off masks and kept indices, as the engine's model sees them."""

    def __init__(self, model):
        self.model = model
        self.positions, self.marked, self.kept = [], [], []
        layers = model.language_model.model.layers
        self._handles = [layers[0].register_forward_pre_hook(self._on_layer)]
        self._select = model._kept_indices

        def kept_indices(*args):
            selection, failed = self._select(*args)
            self.kept += [k.clone() for k in selection.kept]
            return selection, failed

        model._kept_indices = kept_indices

    def _on_layer(self, module, args):
        self.positions.append(args[0].clone())
        handoff = self.model.pio_handoff
        self.marked.append(handoff.mask[: args[0].shape[0]].clone())

    def close(self):
        for h in self._handles:
            h.remove()
        del self.model._kept_indices


def _model(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model


def _generate(llm, keep, seed=70, max_tokens=3):
    from vllm import SamplingParams

    prompt = {"prompt": f"USER: <image>\n{QUESTION_B} ASSISTANT:",
              "multi_modal_data": {"image": synthetic_image(640, 480, seed=seed)}}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1, extra_args={"visual_keep": keep})
    return llm.generate([prompt], params, use_tqdm=False)[0]


def _expected(full_len: int, served_len: int, start: int, kept: torch.Tensor) -> list[int]:
    n = full_len - (served_len - kept.numel())
    return list(range(start)) + (start + kept).tolist() + list(range(start + n, full_len))


def test_prefill_and_decode_positions_are_the_unpruned_ones(engine):
    model = _model(engine)
    full = _generate(engine, 1.0)
    start = full.prompt_token_ids.index(model.config.image_token_index)
    rec = Recorder(model)
    try:
        pruned = _generate(engine, 0.111)
    finally:
        rec.close()
    (kept,) = rec.kept
    served = len(pruned.prompt_token_ids)
    prefill = torch.cat(rec.positions[:-2]).tolist()
    assert len(rec.positions[0]) == CHUNK and len(prefill) == served  # the image crossed a chunk
    assert prefill == _expected(len(full.prompt_token_ids), served, start, kept)
    decode = [p.tolist() for p in rec.positions[-2:]]
    assert decode == [[len(full.prompt_token_ids)], [len(full.prompt_token_ids) + 1]]
    # Hand-off rows: the kept image tokens and every text row after the image, nothing else.
    marked = torch.cat(rec.marked[:-2])
    assert marked.nonzero().squeeze(-1).tolist() == list(range(start, served))
    assert not torch.cat(rec.marked[-2:]).any()


def test_prefix_cache_hit_recomputes_the_tail_at_its_original_positions(engine):
    model = _model(engine)
    full = _generate(engine, 1.0, seed=71, max_tokens=1)
    start = full.prompt_token_ids.index(model.config.image_token_index)
    rec = Recorder(model)
    try:
        first = _generate(engine, 0.111, seed=71)
    finally:
        rec.close()
    (kept,) = rec.kept
    rec = Recorder(model)
    try:
        again = _generate(engine, 0.111, seed=71)
    finally:
        rec.close()
    served = len(again.prompt_token_ids)
    assert 0 < again.num_cached_tokens < served
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert [next(iter(lp.values())).logprob for lp in again.outputs[0].logprobs] == pytest.approx(
        [next(iter(lp.values())).logprob for lp in first.outputs[0].logprobs], abs=1e-4)
    # The recomputed prompt tail sits where the unpruned prompt has it, and its rows in the
    # hand-off range take over the proxy's states again (re-gathered with the image's rows).
    tail = torch.cat(rec.positions[:-2])
    assert len(tail) == served - again.num_cached_tokens
    assert tail.tolist() == _expected(len(full.prompt_token_ids), served, start, kept)[-len(tail):]
    served_index = torch.arange(served - len(tail), served)
    assert torch.equal(torch.cat(rec.marked[:-2]), served_index >= start)


def test_keep_one_positions_are_plain(engine):
    model = _model(engine)
    rec = Recorder(model)
    try:
        out = _generate(engine, 1.0, seed=72, max_tokens=1)
    finally:
        rec.close()
    assert torch.cat(rec.positions).tolist() == list(range(len(out.prompt_token_ids)))
    assert not torch.cat(rec.marked).any()


def test_later_turns_and_new_questions_about_a_seen_image_run_no_vision_tower(engine):
    """The tower's output depends on the pixels alone: a chat's next turn (its delta) and a
    new chat's question about the same image take it from the worker's vision cache."""
    from vllm import SamplingParams

    from pio_fvlm_vllm.images import image_message

    model = _model(engine)
    calls = []
    handle = model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    image = synthetic_image(640, 480, seed=75)
    params = SamplingParams(max_tokens=2, temperature=0.0, extra_args={"visual_keep": 0.25})
    try:
        chat = image_message(QUESTION_B, image)
        first = engine.chat(chat, params, use_tqdm=False)[0]
        assert calls, "the first sight of an image runs the tower"
        calls.clear()
        chat = chat + [{"role": "assistant", "content": first.outputs[0].text},
                       {"role": "user", "content": "Which square is red?"}]
        second = engine.chat(chat, params, use_tqdm=False)[0]
        assert second.num_cached_tokens > 0
        image_id = model.config.image_token_index
        assert second.prompt_token_ids.count(image_id) > first.prompt_token_ids.count(image_id)  # a delta
        other = engine.chat(image_message("What is shown in this image?", image), params, use_tqdm=False)[0]
        assert other.outputs[0].token_ids
        assert not calls, "a later turn or a new question about a seen image ran the vision tower"
        calls.clear()
        engine.chat(image_message(QUESTION_B, synthetic_image(640, 480, seed=76)), params, use_tqdm=False)
        assert calls  # another image: the tower runs
    finally:
        handle.remove()


def test_handed_off_rows_take_the_unpruned_prompts_states_after_layer_k(engine):
    """After layer h (= K, the paper's pruning point) the kept image rows and the text after
    the image carry the unpruned prompt's states there, in every prefill chunk; every other
    row leaves the layer bit-identical to the layer's own output."""
    from .helpers import assert_handed_off_rows_take_the_unpruned_states, handoff_parity, record_kept

    model = _model(engine)
    assert model.pio_handoff_layer == model.pio_proxy_layers
    kept = []
    record_kept(model, kept)
    prompt = {"prompt": f"USER: <image>\n{QUESTION_B} ASSISTANT:",
              "multi_modal_data": {"image": synthetic_image(640, 480, seed=77)}}
    try:
        run = handoff_parity(engine, prompt, 0.111, lambda m: kept[-1])
    finally:
        del model._kept_indices
    assert_handed_off_rows_take_the_unpruned_states(run)
    # The reference: Hugging Face's own forward over the unpruned prompt, after layer h.
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    checkpoint = engine.llm_engine.vllm_config.model_config.model
    hf = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    inputs = AutoProcessor.from_pretrained(checkpoint)(text=prompt["prompt"], images=[prompt["multi_modal_data"]["image"]],
                                                       return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == run.full_prompt
    with torch.no_grad():
        states = hf(**inputs, output_hidden_states=True).hidden_states[model.pio_handoff_layer][0]
    torch.testing.assert_close(run.pruned[run.marked], states[run.original[run.marked]], rtol=1e-4, atol=1e-4)
