"""`vllm serve --data-parallel-size 2`: every engine prunes, and the answers do not depend on
which engine served them."""

import concurrent.futures
import re

import pytest

from pio_fvlm_vllm.serving import VllmServer, fetch_metrics, metric_value

from .conftest import SERVER_ARGS
from .helpers import messages, post_chat

REQUESTS = 6


@pytest.fixture(scope="module")
def data_parallel_server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "data_parallel.log"
    args = [*SERVER_ARGS, "--data-parallel-size", "2"]
    with VllmServer(tiny_checkpoint, args=args, log_path=log) as srv:
        yield srv


def _engine_totals(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^{re.escape(name)}{{engine="(\d+)",[^}}]*}} (\S+)$', text, re.M)}


def test_every_data_parallel_engine_prunes_and_answers_alike(data_parallel_server, model_name):
    def ask(seed, keep):
        body = {"model": model_name, "messages": messages(seed=seed), "max_tokens": 3, "temperature": 0.0,
                "visual_keep": keep}
        status, payload, _ = post_chat(data_parallel_server, body)
        assert status == 200, payload
        return payload["usage"]["prompt_tokens"], payload["choices"][0]["message"]["content"]

    # Six different images at once: the load balancer spreads them, and none is a cache hit.
    with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
        pruned = list(pool.map(lambda seed: ask(seed, 0.25), range(REQUESTS)))
    text = fetch_metrics(data_parallel_server.base_url)
    served = _engine_totals(text, "vllm:prompt_tokens_total")
    assert set(served) == {"0", "1"} and all(v > 0 for v in served.values()), served
    # Each engine prefilled pruned prompts only, and a selection pass ran for every image.
    (length,) = {tokens for tokens, _ in pruned}
    assert all(v % length == 0 for v in served.values()) and sum(served.values()) == REQUESTS * length
    assert metric_value(text, "pio_fvlm_images_pruned_total") == REQUESTS
    # The same request again, now likely on the other engine (and a prefix-cache hit on its
    # first one): the same answer.
    with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
        again = list(pool.map(lambda seed: ask(seed, 0.25), range(REQUESTS)))
    assert again == pruned
    full, _ = ask(0, 1.0)
    assert full > 3 * length
