"""Qwen2.5-VL and Qwen3-VL (`Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration`:
native multimodal rotary, Qwen3 with interleaved sections and deepstack) pruned per request: a
real `vllm serve` with the plugin beside a stock one, and the engine in-process to read the
positions and deepstack features the decoder layers see. Every test runs on both families."""

import json
import os

import pytest
import torch

from pio_fvlm_vllm.budget import budget
from pio_fvlm_vllm.images import image_message, synthetic_image
from pio_fvlm_vllm.serving import VllmServer

from .helpers import (QUESTION_A, assert_b_after_a_equals_b_alone, assert_keep_one_and_no_keep_match_stock, chat,
                      environment, family_fixtures, image_token_counts, messages, openai_client, post_chat,
                      record_kept)

ARGS = ["--dtype", "float32", "--max-model-len", "4096", "--enforce-eager", "--generation-config", "vllm",
        "--max-num-batched-tokens", "256", "--seed", "0"]


@pytest.fixture(scope="module", params=["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def checkpoint(request, tmp_path_factory):
    from pio_fvlm_vllm.checkpoints import build

    return build(request.param, tmp_path_factory.mktemp("ckpt") / request.param)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / f"{checkpoint.name}.log"
    with VllmServer(checkpoint, args=ARGS, log_path=log, env={"VLLM_SERVER_DEV_MODE": "1"}) as srv:
        yield srv


stock_server, client, model = family_fixtures(ARGS)


def test_the_checkpoint_is_served_as_its_processor_counts_it(client, model, checkpoint):
    from transformers import AutoProcessor

    reply = chat(client, model, messages(QUESTION_A, seed=3, size=(640, 480)), max_tokens=2)
    processor = AutoProcessor.from_pretrained(checkpoint)
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION_A}]}]
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[synthetic_image(640, 480, seed=3)], return_tensors="pt")
    assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1] > 300


@pytest.mark.parametrize("keep", [0.5, 0.111, 0.05])
def test_prompt_tokens_and_header_shrink_to_the_budget(client, model, keep):
    msgs = messages(seed=1, size=(640, 480))
    full_tokens, kept_all, total = image_token_counts(client, model, msgs)
    assert kept_all == total >= 300
    tokens, kept, total_again = image_token_counts(client, model, msgs, keep)
    assert (kept, total_again) == (budget(total, keep), total)
    assert tokens == full_tokens - total + kept


def test_two_images_of_different_sizes_are_pruned_each_to_its_budget(client, model, server):
    msgs = image_message(QUESTION_A, synthetic_image(640, 480, seed=5), synthetic_image(300, 600, seed=6))
    full, kept_all, total = image_token_counts(client, model, msgs)
    body = {"model": model, "messages": msgs, "max_tokens": 1, "visual_keep": 0.25, "pio_fvlm_kept_indices": True}
    status, payload, headers = post_chat(server, body)
    assert status == 200, payload
    sizes = payload["pio_fvlm"]["image_tokens"]
    assert sum(sizes) == total and len(set(sizes)) == 2
    assert [len(k) for k in payload["pio_fvlm"]["kept_indices"]] == [budget(n, 0.25) for n in sizes]
    assert payload["usage"]["prompt_tokens"] == full - total + sum(budget(n, 0.25) for n in sizes)


def test_question_b_after_a_equals_b_alone(client, model, server):
    assert_b_after_a_equals_b_alone(client, server, model, 30, 0.2, 0.6)


@pytest.mark.parametrize("keep", [0.3, 0.111])
def test_server_matches_hf_reference_with_served_placement(client, model, checkpoint, keep):
    """The Hugging Face reference's Qwen2.5-VL path (multimodal rotary from the model's own
    `get_rope_index`, the hand-off after layer K on the unpruned forward) is the oracle: the
    served first token and its log-probability are the reference's."""
    import math

    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from pio_fvlm_vllm.reference import HFReference

    if checkpoint.name != "tiny-qwen2.5-vl":
        pytest.skip("the reference models Qwen2.5-VL; Qwen3-VL's deepstack is covered by the engine tests")
    question = "Which square is red?"
    image = synthetic_image(640, 480, seed=52)
    reply = chat(client, model, image_message(question, image), keep, logprobs=True, max_tokens=1,
                 extra={"cache_salt": f"parity-{keep}", "return_tokens_as_token_ids": True})
    first = reply.choices[0].logprobs.content[0]
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(checkpoint)
    ref = HFReference(hf, processor)
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prepared = ref.prepare(processor.apply_chat_template(hf_messages, add_generation_prompt=True), [image],
                           add_special_tokens=False)
    kept = ref.select(prepared, keep)
    assert prepared.input_ids.numel() - sum(e - s for s, e in prepared.image_spans) + kept[0].numel() == \
        reply.usage.prompt_tokens
    logprobs = torch.log_softmax(ref.last_logits(prepared, kept, "handoff").double(), -1)
    token = int(logprobs.argmax())
    assert first.token == f"token_id:{token}", (first.token, token)
    assert math.isclose(float(logprobs[token]), first.logprob, abs_tol=2e-3)


@pytest.mark.parametrize("bad", ["0", "1.5", '"0.5"', "true"])
def test_invalid_visual_keep_is_a_400_and_the_server_keeps_serving(server, model, client, bad):
    body = json.dumps({"model": model, "messages": messages(seed=50), "max_tokens": 2})
    status, payload, _ = post_chat(server, body[:-1] + f', "visual_keep": {bad}}}')
    assert status == 400 and "visual_keep" in json.dumps(payload), payload
    assert chat(client, model, messages(seed=50), 0.3, max_tokens=1).usage.prompt_tokens > 0


def test_keep_one_and_no_keep_are_bit_identical_to_stock_vllm(client, model, stock_server):
    assert_keep_one_and_no_keep_match_stock(client, openai_client(stock_server), model,
                                            messages(QUESTION_A, seed=60, size=(500, 375)))


@pytest.fixture(scope="module")
def engine(checkpoint):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    with environment(VLLM_ENABLE_V1_MULTIPROCESSING="0"):
        llm = LLM(model=str(checkpoint), dtype="float32", max_model_len=4096, seed=0, enforce_eager=True,
                  max_num_batched_tokens=128, generation_config="vllm")
        yield llm
        del llm


PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which square is red?<|im_end|>\n"
          "<|im_start|>assistant\n")


def test_kept_tokens_and_the_text_after_keep_their_unpruned_3d_positions(engine):
    """In every prefill chunk and at decode, layer 0 sees the positions the unpruned prompt
    gives each served token: kept image tokens their (t, h, w) cells, text its own."""
    from vllm import SamplingParams

    model = engine.llm_engine.model_executor.driver_worker.worker.model_runner.model
    seen, kept = [], []
    handle = model.language_model.model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].clone()))
    record_kept(model, kept)
    prompt = {"prompt": PROMPT, "multi_modal_data": {"image": synthetic_image(640, 480, seed=70)}}
    try:
        runs = {}
        for keep in (1.0, 0.3):
            seen.clear()
            params = SamplingParams(max_tokens=3, temperature=0.0, extra_args={"visual_keep": keep})
            out = engine.generate([prompt], params, use_tqdm=False)[0]
            runs[keep] = (torch.cat(seen[:-2], dim=1), [s.clone() for s in seen[-2:]], out)
    finally:
        handle.remove()
        del model._kept_indices
    full_positions, full_decode, full = runs[1.0]
    pruned_positions, pruned_decode, pruned = runs[0.3]
    start = full.prompt_token_ids.index(model.config.image_token_id)
    n = len(full.prompt_token_ids) - len(pruned.prompt_token_ids) + kept[0].numel()
    assert kept[0].numel() == budget(n, 0.3) and full_positions.shape[1] == len(full.prompt_token_ids)
    served = torch.cat([torch.arange(start), start + kept[0], torch.arange(start + n, full_positions.shape[1])])
    assert torch.equal(pruned_positions, full_positions[:, served])
    assert all(torch.equal(p, f) for p, f in zip(pruned_decode, full_decode))


def test_the_engine_allocates_kv_blocks_for_the_kept_tokens_only(engine):
    """The scheduler's own block pool, read while the request's prefill runs (a layer-0 hook,
    with every block of the prompt allocated): a pruned prompt holds a fraction of them."""
    from vllm import SamplingParams

    model = engine.llm_engine.model_executor.driver_worker.worker.model_runner.model
    manager = engine.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager
    usage = []
    handle = model.language_model.model.layers[0].register_forward_pre_hook(
        lambda module, args: usage.append(manager.block_pool.get_num_free_blocks()))
    prompt = {"prompt": PROMPT, "multi_modal_data": {"image": synthetic_image(1344, 896, seed=72)}}
    try:
        used = {}
        for keep in (1.0, 0.111):
            engine.reset_prefix_cache()
            free_before = manager.block_pool.get_num_free_blocks()
            usage.clear()
            params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"visual_keep": keep})
            out = engine.generate([prompt], params, use_tqdm=False)[0]
            used[keep] = (free_before - min(usage), len(out.prompt_token_ids))
    finally:
        handle.remove()
    block = engine.llm_engine.vllm_config.cache_config.block_size
    (full_blocks, full_tokens), (pruned_blocks, pruned_tokens) = used[1.0], used[0.111]
    assert (full_blocks, pruned_blocks) == (-(-full_tokens // block), -(-pruned_tokens // block)), (used, block)
    assert pruned_blocks < full_blocks / 3, used


def test_kept_image_rows_carry_their_own_deepstack_features(engine):
    """Qwen3-VL adds the vision tower's deepstack features to the image rows after the first
    decoder layers: a pruned prompt's rows get exactly the kept tokens' features."""
    from vllm import SamplingParams

    model = engine.llm_engine.model_executor.driver_worker.worker.model_runner.model
    if not getattr(model, "use_deepstack", False):
        pytest.skip("this family has no deepstack features")
    compute = model._compute_deepstack_embeds
    rows, kept = [], []

    def record(inputs_embeds, multimodal_embeddings, is_multimodal):
        deepstack, main = compute(inputs_embeds, multimodal_embeddings, is_multimodal)
        rows.append(deepstack[:, is_multimodal.to(deepstack.device)].clone())  # (levels, image rows, D)
        return deepstack, main

    model._compute_deepstack_embeds = record
    record_kept(model, kept)
    prompt = {"prompt": PROMPT, "multi_modal_data": {"image": synthetic_image(512, 384, seed=71)}}
    try:
        runs = {}
        for keep in (1.0, 0.25):
            rows.clear()
            engine.reset_prefix_cache()
            params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"visual_keep": keep})
            engine.generate([prompt], params, use_tqdm=False)
            runs[keep] = torch.cat(rows, dim=1)
    finally:
        del model._compute_deepstack_embeds, model._kept_indices
    full, pruned = runs[1.0], runs[0.25]
    k = budget(full.shape[1], 0.25)
    assert full.shape[0] == model.deepstack_num_level and kept[-1].numel() == k
    assert torch.equal(pruned[:, :k], full[:, kept[-1].to(full.device)])
    # The text rows after the image share its placeholder (the hand-off): they get none.
    assert pruned.shape[1] > k and not pruned[:, k:].any()


def _video_data_url(tmp_path) -> str:
    import base64

    import cv2
    import numpy as np

    path = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 4, (320, 240))
    for i in range(8):
        frame = np.full((240, 320, 3), 40 * (i % 6), dtype=np.uint8)
        cv2.rectangle(frame, (20 + 20 * i, 60), (80 + 20 * i, 120), (0, 0, 255), -1)
        writer.write(frame)
    writer.release()
    return "data:video/mp4;base64," + base64.b64encode(open(path, "rb").read()).decode()


def test_videos_are_served_whole_and_a_keep_below_one_with_them_is_refused(server, stock_server, model, tmp_path):
    """vLLM prunes videos (EVS) whenever its pruning switch is on; the plugin turns it on for
    its positions hook, and videos must still be served as stock serves them."""
    content = [{"type": "video_url", "video_url": {"url": _video_data_url(tmp_path)}},
               {"type": "text", "text": "What happens?"}]
    body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": content}]}
    status, whole, _ = post_chat(server, body)
    assert status == 200, whole
    status, stock, _ = post_chat(stock_server, body)
    assert status == 200 and whole["usage"] == stock["usage"], (whole["usage"], stock)
    status, payload, _ = post_chat(server, {**body, "visual_keep": 0.5})
    assert status == 400 and "videos are served whole" in json.dumps(payload), payload
    assert server.healthy()


def test_a_later_turn_reuses_the_first_and_equals_its_cold_recompute(client, server, model):
    """Multimodal rotary: a delta's cells are its image's own, and the text after it continues
    unshifted, so the cached turn and the same turn recomputed from nothing agree."""
    from .helpers import HEADER, block_size, metric, reset_caches, token_logprobs

    keep = 0.5  # the first turn fills at least one whole KV block on either family
    conversation = messages(QUESTION_A, seed=96)
    first = chat(client, model, conversation, keep, raw=True)
    kept_first = int(first.headers[HEADER].split("/")[0])
    full_blocks = first.parse().usage.prompt_tokens // block_size(server.base_url)
    assert full_blocks >= 1
    conversation = conversation + [{"role": "assistant", "content": first.parse().choices[0].message.content},
                                   {"role": "user", "content": "Which square is red?"}]
    hits = metric(server.base_url, "vllm:prefix_cache_hits_total")
    warm = chat(client, model, conversation, keep, logprobs=True, raw=True)
    assert metric(server.base_url, "vllm:prefix_cache_hits_total") - hits >= full_blocks * block_size(server.base_url)
    assert int(warm.headers[HEADER].split("/")[0]) > kept_first  # the turn added a delta
    reset_caches(server)
    cold = token_logprobs(chat(client, model, conversation, keep, logprobs=True))
    warm = token_logprobs(warm.parse())
    assert [t for t, _ in cold] == [t for t, _ in warm]
    assert max(abs(a - b) for (_, a), (_, b) in zip(cold, warm)) <= 1e-3


def test_handed_off_rows_take_the_unpruned_prompts_states_after_layer_k(engine):
    """The hand-off reaches models that read all three M-RoPE rows: after layer h (= K) the
    kept image rows and the text after the image carry the unpruned prompt's states (Qwen3-VL:
    before the layer's deepstack level, which the model adds to image rows after it); every
    other row leaves the layer bit-identical."""
    from .helpers import assert_handed_off_rows_take_the_unpruned_states, handoff_parity

    model = engine.llm_engine.model_executor.driver_worker.worker.model_runner.model
    assert model.pio_handoff_layer == model.pio_proxy_layers
    kept = []
    record_kept(model, kept)
    prompt = {"prompt": PROMPT, "multi_modal_data": {"image": synthetic_image(640, 480, seed=73)}}
    try:
        run = handoff_parity(engine, prompt, 0.111, lambda m: kept[-1])
    finally:
        del model._kept_indices
    assert_handed_off_rows_take_the_unpruned_states(run)
