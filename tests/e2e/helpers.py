import contextlib
import json
import os
import re
import urllib.error
import urllib.request

from pio_fvlm_vllm.images import image_message, synthetic_image
from pio_fvlm_vllm.serving import fetch_metrics, metric_value

QUESTION_A = "What is shown in this image?"
QUESTION_B = "How many squares are there, and which one is red?"


def chat(client, model, messages, keep=None, *, max_tokens=4, logprobs=False, extra=None, raw=False):
    body = dict(extra or {})
    if keep is not None:
        body["visual_keep"] = keep
    call = client.chat.completions.with_raw_response.create if raw else client.chat.completions.create
    return call(model=model, messages=messages, max_tokens=max_tokens, temperature=0.0,
                logprobs=logprobs, top_logprobs=5 if logprobs else None, extra_body=body or None)


def token_logprobs(reply):
    return [(t.token, t.logprob) for t in reply.choices[0].logprobs.content]


def metric(base_url, name):
    return metric_value(fetch_metrics(base_url), name)


def messages(question=QUESTION_A, size=(640, 480), seed=0, count=1):
    return image_message(question, *[synthetic_image(*size, seed=seed + i) for i in range(count)])


def block_size(base_url):
    text = fetch_metrics(base_url)
    match = re.search(r'^vllm:cache_config_info{[^}]*block_size="(\d+)"', text, re.M)
    return int(match.group(1))


def post_chat(server, body, timeout=300):
    """POST a chat body (dict, or raw JSON text) without a client library: (status, payload, headers)."""
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    req = urllib.request.Request(server.base_url + "/v1/chat/completions", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            payload = json.loads(raw or b"{}")
        except ValueError:
            payload = {"raw": raw.decode(errors="replace")}
        return e.code, payload, dict(e.headers)


@contextlib.contextmanager
def environment(**values: str):
    """Sets environment variables for the block (an engine built inside reads them), then
    restores what was there."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -- shared by the per-family modules ---------------------------------------------------

HEADER = "x-pio-fvlm-image-tokens"
CACHE_RESETS = ("/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache")  # VLLM_SERVER_DEV_MODE=1


def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def image_token_counts(client, model, msgs, keep=None):
    """(usage.prompt_tokens, kept, total) of one request, the last two from the header."""
    raw = chat(client, model, msgs, keep, raw=True)
    kept, total = map(int, raw.headers[HEADER].split("/"))
    return raw.parse().usage.prompt_tokens, kept, total


def reset_caches(server) -> None:
    for path in CACHE_RESETS:
        urllib.request.urlopen(urllib.request.Request(server.base_url + path, method="POST"), timeout=60).close()


def assert_b_after_a_equals_b_alone(client, server, model, seed: int, keep: float, other_keep: float) -> None:
    """Selection depends on the question: no cache may hand question A's tokens to B. The
    comparison can tell selections apart: another keep answers measurably differently."""
    reset_caches(server)
    alone = token_logprobs(chat(client, model, messages(QUESTION_B, seed=seed), keep, logprobs=True))
    reset_caches(server)
    chat(client, model, messages(QUESTION_A, seed=seed), keep, max_tokens=2)
    after_a = token_logprobs(chat(client, model, messages(QUESTION_B, seed=seed), keep, logprobs=True))
    assert [t for t, _ in after_a] == [t for t, _ in alone]
    assert max(abs(x - y) for (_, x), (_, y) in zip(after_a, alone)) <= 1e-3
    other = token_logprobs(chat(client, model, messages(QUESTION_B, seed=seed), other_keep, logprobs=True))
    assert max(abs(x - y) for (_, x), (_, y) in zip(other, alone)) > 1e-3


def assert_keep_one_and_no_keep_match_stock(client, stock_client, model, msgs) -> None:
    theirs = chat(stock_client, model, msgs, None, logprobs=True, max_tokens=8, extra={"cache_salt": "stock"})
    for keep, salt in ((1.0, "keep-one"), (None, "silent")):
        ours = chat(client, model, msgs, keep, logprobs=True, max_tokens=8, extra={"cache_salt": salt})
        assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
        assert token_logprobs(ours) == token_logprobs(theirs)


def family_fixtures(args: list[str]):
    """A family module's `stock_server` (stock vLLM on the module's `checkpoint` with `args`),
    `client` (on the module's plugin `server`) and `model` (the served name) fixtures:
    `stock_server, client, model = family_fixtures(ARGS)`."""
    import pytest

    from pio_fvlm_vllm.serving import VllmServer

    @pytest.fixture(scope="module")
    def stock_server(checkpoint, tmp_path_factory):
        log = tmp_path_factory.mktemp("logs") / f"{checkpoint.name}-stock.log"
        with VllmServer(checkpoint, plugin=False, args=args, log_path=log) as srv:
            yield srv

    @pytest.fixture(scope="module")
    def client(server):
        return openai_client(server)

    @pytest.fixture(scope="module")
    def model(checkpoint):
        return str(checkpoint)

    return stock_server, client, model
