"""On the real engine (V1 runner, in-process), a KV cache too small for the batch: pruned
requests with the hand-off, mixed with an unpruned one, are preempted and recomputed, and each
answers exactly as it does alone. A recomputed request gathers its kept tokens and their
hand-off states again (from the encoder cache, or by encoding again with the set it served)."""

import os

import pytest

from pio_fvlm_vllm.images import synthetic_image

from .helpers import QUESTION_A, QUESTION_B, environment

BLOCK = 32  # the CPU attention backend takes multiples of 32
MAX_LEN = 2400
# Room for the unpruned request below (2,355 prompt tokens) and little more. The pruned ones,
# (130 to 610 prompt tokens), decode long enough to need about 2,800 tokens together, so the
# scheduler must preempt some of them while they decode and recompute them later.
BLOCKS = MAX_LEN // BLOCK + 1
MAX_TOKENS = {1.0: 40}
PRUNED_MAX_TOKENS = 300
# First come, first served: the pruned requests run together, and the unpruned one prefills in
# the same steps as their last decodes once they free enough blocks.
REQUESTS = [(QUESTION_A, 71, 0.25), (QUESTION_B, 72, 0.111), (QUESTION_B, 74, 0.25), (QUESTION_A, 75, 0.05),
            (QUESTION_A, 73, 1.0)]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    with environment(VLLM_ENABLE_V1_MULTIPROCESSING="0"):
        llm = LLM(model=str(tiny_checkpoint), dtype="float32", max_model_len=MAX_LEN, seed=0, enforce_eager=True,
                  block_size=BLOCK, num_gpu_blocks_override=BLOCKS, max_num_batched_tokens=256,
                  enable_prefix_caching=True, disable_log_stats=False)
        yield llm
        del llm


def _prompt(question, seed):
    return {"prompt": f"USER: <image>\n{question} ASSISTANT:",
            "multi_modal_data": {"image": synthetic_image(480, 360, seed=seed)}}


def _params(keep):
    from vllm import SamplingParams

    # ignore_eos: every request decodes to the end, so the batch's demand for blocks is known.
    return SamplingParams(max_tokens=MAX_TOKENS.get(keep, PRUNED_MAX_TOKENS), temperature=0.0, logprobs=1,
                          ignore_eos=True, extra_args={"visual_keep": keep})


def _preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def _answers(outputs):
    return [[(t, lp[t].logprob) for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
            for o in outputs]


def test_preempted_pruned_requests_answer_as_they_do_alone(engine):
    prompts = [_prompt(q, s) for q, s, _ in REQUESTS]
    alone = []
    # Prefix caching stays on (vLLM's default); every run starts from an empty cache, so alone
    # and together differ only in batching and preemption.
    for prompt, (_, _, keep) in zip(prompts, REQUESTS):
        engine.reset_prefix_cache()
        alone += engine.generate([prompt], _params(keep), use_tqdm=False)
    model = engine.llm_engine.model_executor.driver_worker.worker.model_runner.model
    handed_off = []
    hook = model.language_model.model.layers[model.pio_handoff_layer - 1].register_forward_hook(
        lambda m, a, out: handed_off.append(int(model.pio_handoff.mask[: out[0].shape[0]].sum())), prepend=True)
    before = _preemptions(engine)
    engine.reset_prefix_cache()
    try:
        together = engine.generate(prompts, [_params(k) for _, _, k in REQUESTS], use_tqdm=False)
    finally:
        hook.remove()
    assert _preemptions(engine) > before, "the batch fitted the cache: nothing was preempted"
    # Each pruned request hands off its rows from the image to the prompt's end at least once
    # (a recompute after preemption may hand them off again).
    image_id = model.config.image_token_index
    at_least = sum(len(o.prompt_token_ids) - o.prompt_token_ids.index(image_id)
                   for o, (_, _, keep) in zip(together, REQUESTS) if keep < 1.0)
    assert sum(handed_off) >= at_least, (sum(handed_off), at_least)
    lengths = [len(o.prompt_token_ids) for o in together]
    assert lengths == [len(o.prompt_token_ids) for o in alone]
    assert lengths[4] > lengths[0] > lengths[1] > lengths[3], "the keeps were not applied per request"
    for keep, mine, theirs in zip([k for _, _, k in REQUESTS], _answers(together), _answers(alone)):
        assert [t for t, _ in mine] == [t for t, _ in theirs], keep
        assert max(abs(x - y) for (_, x), (_, y) in zip(mine, theirs)) <= 1e-3, keep
