"""Selection depends on the question: caches must never hand one question's tokens to another."""

import pytest

from pio_fvlm_vllm.budget import budget

from pio_fvlm_vllm.serving import VllmServer

from .conftest import SERVER_ARGS
from .helpers import QUESTION_A, QUESTION_B, block_size, chat, messages, metric, token_logprobs

KEEP = 0.2


def _assert_same_generation(a, b, tol):
    assert [t for t, _ in a] == [t for t, _ in b]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= tol


@pytest.fixture(scope="module")
def fresh_server(tiny_checkpoint, tmp_path_factory):
    with VllmServer(tiny_checkpoint, args=SERVER_ARGS, log_path=tmp_path_factory.mktemp("logs") / "fresh.log") as s:
        yield s


@pytest.fixture(scope="module")
def fresh_client(fresh_server):
    from openai import OpenAI

    return OpenAI(base_url=fresh_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_question_b_after_a_equals_b_on_a_fresh_server(client, fresh_client, model_name, server):
    seed = 40  # an image no other test sends
    chat(client, model_name, messages(QUESTION_A, seed=seed), KEEP, max_tokens=2)
    b_after_a = token_logprobs(chat(client, model_name, messages(QUESTION_B, seed=seed), KEEP, logprobs=True))
    b_fresh = token_logprobs(chat(fresh_client, model_name, messages(QUESTION_B, seed=seed), KEEP, logprobs=True))
    _assert_same_generation(b_after_a, b_fresh, tol=1e-3)

    # The selection matters: another budget for the same question answers differently.
    other = token_logprobs(chat(fresh_client, model_name, messages(QUESTION_B, seed=seed), 0.5, logprobs=True))
    assert other != b_fresh


def test_identical_requests_still_hit_the_caches(client, model_name, server):
    msgs = messages(QUESTION_B, seed=41)
    first = token_logprobs(chat(client, model_name, msgs, KEEP, logprobs=True))
    hits = metric(server.base_url, "vllm:prefix_cache_hits_total")
    raw = client.chat.completions.with_raw_response.create(
        model=model_name, messages=msgs, max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=5,
        extra_body={"visual_keep": KEEP})
    reply = raw.parse()
    again = token_logprobs(reply)
    # Every full block of the prompt but the one holding its last token is reused.
    size = block_size(server.base_url)
    full_blocks = (reply.usage.prompt_tokens - 1) // size
    assert full_blocks >= 2
    assert metric(server.base_url, "vllm:prefix_cache_hits_total") - hits >= full_blocks * size
    _assert_same_generation(first, again, tol=1e-3)


def test_same_image_twice_in_one_prompt_is_selected_per_position(client, model_name, server):
    """Identical pixels at two places in a prompt are two selections (the text around each
    differs), not one encoder-cache entry shared by both."""
    from pio_fvlm_vllm.images import image_message, synthetic_image

    img = synthetic_image(400, 300, seed=42)  # two fit max_model_len unpruned
    images_before = metric(server.base_url, "pio_fvlm_images_pruned_total") or 0.0
    raw = client.chat.completions.with_raw_response.create(
        model=model_name, messages=image_message(QUESTION_A, img, img), max_tokens=2, temperature=0.0,
        extra_body={"visual_keep": KEEP})
    kept, total = map(int, raw.headers["x-pio-fvlm-image-tokens"].split("/"))
    assert kept == 2 * budget(total // 2, KEEP)
    assert metric(server.base_url, "pio_fvlm_images_pruned_total") - images_before == 2


@pytest.fixture(scope="module")
def stock_server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "stock.log"
    with VllmServer(tiny_checkpoint, plugin=False, args=SERVER_ARGS, log_path=log) as s:
        yield s


def test_keep_one_is_bit_identical_to_stock_vllm(client, model_name, stock_server):
    from openai import OpenAI

    stock = OpenAI(base_url=stock_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    msgs = messages(QUESTION_A, seed=43, size=(672, 672))
    salt = {"cache_salt": "keep-one-vs-stock"}  # no prefix-cache hits on either side
    ours = chat(client, model_name, msgs, 1.0, logprobs=True, max_tokens=8, extra=salt)
    theirs = chat(stock, model_name, msgs, None, logprobs=True, max_tokens=8, extra=salt)
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
    assert token_logprobs(ours) == token_logprobs(theirs)
    silent = chat(client, model_name, msgs, None, logprobs=True, max_tokens=8,
                  extra={"cache_salt": "silent-vs-stock"})
    assert token_logprobs(silent) == token_logprobs(theirs)
