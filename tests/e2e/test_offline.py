"""Offline `LLM.generate` / `LLM.chat` with `SamplingParams.extra_args["visual_keep"]`."""

import pytest

from pio_fvlm_vllm.budget import budget
from pio_fvlm_vllm.images import synthetic_image

from .helpers import QUESTION_A, environment, messages


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    # The server-wide default for requests that do not say (see test_server_default_*); only
    # this module's engine sees it.
    with environment(PIO_FVLM_VISUAL_KEEP="0.5"):
        engine = LLM(model=str(tiny_checkpoint), dtype="float32", max_model_len=4096, seed=0)
        yield engine
        del engine


def _params(keep=None, **kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=2, temperature=0.0, extra_args=None if keep is None else {"visual_keep": keep}, **kw)


def _prompt(seed=0, size=(640, 480)):
    return {"prompt": f"USER: <image>\n{QUESTION_A} ASSISTANT:",
            "multi_modal_data": {"image": synthetic_image(*size, seed=seed)}}


def test_generate_with_extra_args_prunes(llm):
    full, pruned = llm.generate([_prompt(1), _prompt(1)], [_params(1.0), _params(0.111)], use_tqdm=False)
    text_tokens = len(llm.get_tokenizer()(f"USER: \n{QUESTION_A} ASSISTANT:").input_ids) - 1
    n_full = len(full.prompt_token_ids)
    image_tokens = n_full - text_tokens - 1
    assert len(pruned.prompt_token_ids) == n_full - image_tokens + budget(image_tokens, 0.111)


def test_generate_keeps_order_with_mixed_keeps(llm):
    keeps = [0.25, 1.0, 0.05, 1.0]
    outs = llm.generate([_prompt(2)] * 4, [_params(k) for k in keeps], use_tqdm=False)
    lengths = [len(o.prompt_token_ids) for o in outs]
    assert lengths[1] == lengths[3] > lengths[0] > lengths[2]


def test_server_default_applies_to_silent_requests(llm):
    silent, half, full = llm.generate([_prompt(5)] * 3, [_params(), _params(0.5), _params(1.0)], use_tqdm=False)
    assert len(silent.prompt_token_ids) == len(half.prompt_token_ids) < len(full.prompt_token_ids)


def test_chat_with_extra_args(llm):
    (full,) = llm.chat(messages(seed=3), _params(1.0), use_tqdm=False)
    (pruned,) = llm.chat(messages(seed=3), _params(0.25), use_tqdm=False)
    assert len(pruned.prompt_token_ids) < len(full.prompt_token_ids) / 2


@pytest.mark.parametrize("bad", [0, 1.5, "0.5", True, float("nan")])
def test_invalid_extra_args_raise_value_error(llm, bad):
    with pytest.raises(ValueError, match=r"extra_args.visual_keep must be a number in \(0, 1\]"):
        llm.generate([_prompt(4)], _params(bad), use_tqdm=False)
