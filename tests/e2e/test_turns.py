"""A chat's later turns reuse the pruned image through vLLM's prefix cache and add a delta."""

import pytest

from pio_fvlm_vllm.budget import budget, delta_budget
from pio_fvlm_vllm.images import image_message, synthetic_image
from pio_fvlm_vllm.serving import VllmServer
from pio_fvlm_vllm.settings import PioFvlmSettings

from .conftest import SERVER_ARGS
from .helpers import HEADER, block_size, metric, openai_client, post_chat, reset_caches, token_logprobs

KEEP = 0.2
SHARE = PioFvlmSettings().turn_delta_share  # the server's default
QUESTIONS = ["What is shown in this image?", "Which square is red?", "How many shapes are there?"]


@pytest.fixture(scope="module")
def turns_server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "turns.log"
    args = SERVER_ARGS + ["--enable-prompt-tokens-details"]
    with VllmServer(tiny_checkpoint, args=args, log_path=log, env={"VLLM_SERVER_DEV_MODE": "1"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def turns_client(turns_server):
    return openai_client(turns_server)


def _ask(client, model, conversation, mode=None, salt=None, max_tokens=3):
    body = {"visual_keep": KEEP}
    if mode is not None:
        body["visual_turns"] = mode
    if salt is not None:
        body["cache_salt"] = salt
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=conversation, max_tokens=max_tokens, temperature=0.0, logprobs=True,
        top_logprobs=5, extra_body=body)
    reply = raw.parse()
    kept, total = map(int, raw.headers[HEADER].split("/"))
    cached = (reply.usage.prompt_tokens_details.cached_tokens or 0) if reply.usage.prompt_tokens_details else 0
    return reply, cached, kept, total


def _chat(client, model, seed, questions, mode=None, salt=None):
    """Asks `questions` in turn about one image; returns each turn's (reply, cached, kept, total)
    and the conversation so far."""
    conversation = image_message(questions[0], synthetic_image(672, 672, seed=seed))
    turns = []
    for n, question in enumerate(questions):
        if n:
            conversation = conversation + [{"role": "user", "content": question}]
        turn = _ask(client, model, conversation, mode, salt)
        turns.append(turn)
        conversation = conversation + [{"role": "assistant", "content": turn[0].choices[0].message.content}]
    return turns, conversation


def test_later_turns_reuse_earlier_turns_and_add_a_delta(turns_client, turns_server, model_name):
    images = metric(turns_server.base_url, "pio_fvlm_served_images_total") or 0.0
    turns, _ = _chat(turns_client, model_name, 90, QUESTIONS)
    # One image per request: a delta adds tokens to its image, not an image.
    assert metric(turns_server.base_url, "pio_fvlm_served_images_total") - images == len(QUESTIONS)
    size = block_size(turns_server.base_url)
    (first, _, k, n), *later = turns
    assert k == budget(n, KEEP) and k < n
    served_before, served_tokens = first.usage.prompt_tokens, k
    for m, (reply, cached, kept, total) in enumerate(later, start=1):
        # Every full block of the turn before (its prompt and its answer) is a prefix-cache hit.
        assert cached >= (served_before // size) * size > 0, (m, cached, served_before)
        # Each later turn adds its share of k (never more than is left), counted once.
        served_tokens += delta_budget(n, k, SHARE, served_tokens)
        assert (kept, total) == (served_tokens, n) and served_tokens > k
        served_before = reply.usage.prompt_tokens


def test_a_turn_from_the_cache_equals_the_same_turn_recomputed(turns_client, turns_server, model_name):
    turns, conversation = _chat(turns_client, model_name, 91, QUESTIONS[:2])
    assert turns[1][1] > 0
    warm = token_logprobs(turns[1][0])
    reset_caches(turns_server)  # prefix, processor and encoder caches: everything is recomputed
    cold, cached, *_ = _ask(turns_client, model_name, conversation[:-1])
    assert cached == 0
    assert [t for t, _ in token_logprobs(cold)] == [t for t, _ in warm]
    assert max(abs(a - b) for (_, a), (_, b) in zip(token_logprobs(cold), warm)) <= 1e-3


def test_chats_sharing_an_image_but_not_the_first_question_share_nothing(turns_client, turns_server, model_name):
    _chat(turns_client, model_name, 92, [QUESTIONS[0], QUESTIONS[1]])
    # The same image, the same second question, another first question: the image's tokens
    # come before the first question, so no block of this chat may come from the other one.
    size = block_size(turns_server.base_url)
    turns, _ = _chat(turns_client, model_name, 92, [QUESTIONS[2], QUESTIONS[1]])
    assert turns[0][1] < size  # at most the text before the image
    assert turns[1][1] >= (turns[0][0].usage.prompt_tokens // size) * size  # its own first turn only


def test_visual_turns_chooses_what_later_turns_see(turns_client, model_name):
    conversation = image_message(QUESTIONS[0], synthetic_image(672, 672, seed=93))
    first, _, k, n = _ask(turns_client, model_name, conversation)
    conversation += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": QUESTIONS[1]}]
    incremental = _ask(turns_client, model_name, conversation, "incremental")
    frozen = _ask(turns_client, model_name, conversation, "first_turn")
    reselect = _ask(turns_client, model_name, conversation, "reselect")
    default = _ask(turns_client, model_name, conversation)
    assert frozen[2] == k and frozen[1] > 0  # the first turn's tokens, from the cache
    d = delta_budget(n, k, SHARE, k)
    assert d > 0 and incremental[2] == k + d
    assert incremental[0].usage.prompt_tokens == frozen[0].usage.prompt_tokens + d
    assert default[0].usage.prompt_tokens == incremental[0].usage.prompt_tokens
    # A fresh selection over the whole prompt: nothing after the image's first block is reused.
    assert reselect[2] == k and reselect[1] < incremental[1]


@pytest.mark.parametrize("value", ["bogus", 1, True, ["incremental"], ""])
def test_visual_turns_is_validated(turns_server, model_name, value):
    body = {"model": model_name, "max_tokens": 1, "visual_keep": KEEP, "visual_turns": value,
            "messages": image_message(QUESTIONS[0], synthetic_image(64, 64, seed=94))}
    status, payload, _ = post_chat(turns_server, body)
    assert status == 400 and "visual_turns" in str(payload) and "incremental" in str(payload), payload
    ok, _, _ = post_chat(turns_server, {**body, "visual_turns": "first_turn"})
    assert ok == 200
