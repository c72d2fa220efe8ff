"""LLaVA-1.5 (`LlavaForConditionalGeneration`, a fixed 576 tokens per image) served with the
plugin, against a stock server of the same checkpoint, through the OpenAI client on loopback."""

import json
import re

import pytest

from pio_fvlm_vllm.budget import budget
from pio_fvlm_vllm.serving import VllmServer, fetch_metrics, metric_value

from .helpers import (HEADER, QUESTION_A, QUESTION_B, assert_b_after_a_equals_b_alone,
                      assert_keep_one_and_no_keep_match_stock, chat, family_fixtures, image_token_counts, messages,
                      openai_client, post_chat)

N = 576  # (336 / 14)^2 patches, the CLS token dropped
# A step budget below one image: every unpruned prompt and the keep-0.5 one prefill in chunks.
ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--max-num-batched-tokens", "256",
        "--max-num-seqs", "8", "--seed", "0", "--enforce-eager"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from pio_fvlm_vllm.checkpoints import build

    return build("tiny-llava-1.5", tmp_path_factory.mktemp("ckpt") / "tiny-llava-1.5")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "llava-1.5.log"
    tmp = tmp_path_factory.mktemp("server-tmp")
    # Development mode exposes the cache-reset endpoints used below.
    with VllmServer(checkpoint, args=ARGS, log_path=log, env={"VLLM_SERVER_DEV_MODE": "1", "TMPDIR": str(tmp)}) as srv:
        assert list(tmp.glob("pio_fvlm_*")), "the server keeps its metrics directory in TMPDIR"
        yield srv
    # A stopped server leaves nothing of the plugin's behind.
    assert not list(tmp.glob("pio_fvlm_*")), list(tmp.iterdir())


stock_server, client, model = family_fixtures(ARGS)


def _prefill_kv_tokens(srv) -> float:
    """Tokens the engine computed and wrote to the KV cache in prefills so far."""
    text = fetch_metrics(srv.base_url)
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("vllm:request_prefill_kv_computed_tokens_sum"))


def _share_bucket(metrics_text: str, le: str) -> float:
    """The kept-share histogram's cumulative count at upper bound `le`, over all models."""
    return sum(float(line.split()[-1]) for line in metrics_text.splitlines()
               if line.startswith("pio_fvlm_served_image_kept_share_bucket") and f'le="{le}"' in line)




@pytest.mark.parametrize("keep", [0.5, 0.111, 0.05])
def test_prompt_tokens_and_header_shrink_to_the_budget(client, model, keep):
    msgs = messages(seed=1, size=(640, 480))
    full_tokens, kept_all, total = image_token_counts(client, model, msgs)
    assert kept_all == total == N
    tokens, kept, total_again = image_token_counts(client, model, msgs, keep)
    assert (kept, total_again) == (budget(N, keep), N)
    assert tokens == full_tokens - N + kept


def test_the_engine_prefills_and_caches_only_the_kept_tokens(client, model, server):
    """The engine's own count of prompt tokens written to the KV cache (no prefix-cache
    hits: a new image each time)."""
    written = {}
    for keep, seed in ((1.0, 20), (0.111, 21)):
        before = _prefill_kv_tokens(server)
        reply = chat(client, model, messages(seed=seed), keep, max_tokens=1)
        written[keep] = _prefill_kv_tokens(server) - before
        assert written[keep] == reply.usage.prompt_tokens
    assert written[1.0] - written[0.111] == N - budget(N, 0.111)


def test_question_b_after_a_equals_b_alone(client, model, server):
    assert_b_after_a_equals_b_alone(client, server, model, 30, 0.2, 0.5)


def test_two_images_are_pruned_each_to_its_budget(client, model):
    msgs = messages(seed=40, count=2)
    full, kept_all, total = image_token_counts(client, model, msgs)
    assert kept_all == total == 2 * N
    tokens, kept, _ = image_token_counts(client, model, msgs, 0.25)
    assert kept == 2 * budget(N, 0.25)
    assert tokens == full - total + kept


@pytest.mark.parametrize("bad", ["0", "1.5", "NaN", '"0.5"', "true"])
def test_invalid_visual_keep_is_a_400_and_the_server_keeps_serving(server, model, client, bad):
    body = json.dumps({"model": model, "messages": messages(seed=50), "max_tokens": 2})
    status, payload, _ = post_chat(server, body[:-1] + f', "visual_keep": {bad}}}')
    assert status == 400, payload
    assert "visual_keep" in json.dumps(payload) and "(0, 1]" in json.dumps(payload)
    assert chat(client, model, messages(seed=50), 0.3, max_tokens=1).usage.prompt_tokens > 0


def test_keep_one_and_no_keep_are_bit_identical_to_stock_vllm(client, model, stock_server):
    assert_keep_one_and_no_keep_match_stock(client, openai_client(stock_server), model,
                                            messages(QUESTION_A, seed=60, size=(500, 375)))


def test_metrics_count_served_images_cache_hits_included(client, model, server):
    """The same pruned request twice: one selection pass (the second is served from the
    caches), two served images, both counted under the served model's name."""
    names = ("pio_fvlm_served_images_total", "pio_fvlm_served_images_pruned_total",
             "pio_fvlm_served_image_tokens_total", "pio_fvlm_served_image_tokens_kept_total",
             "pio_fvlm_images_pruned_total", "pio_fvlm_served_image_kept_share_count")
    first = fetch_metrics(server.base_url)
    before = {n: metric_value(first, n) or 0.0 for n in names}
    before_buckets = {le: _share_bucket(first, le) for le in ("0.111", "0.15")}
    for _ in range(2):
        chat(client, model, messages(seed=70), 0.111, max_tokens=1)
    text = fetch_metrics(server.base_url)
    delta = {n: metric_value(text, n) - before[n] for n in names}
    k = budget(N, 0.111)
    assert delta == {"pio_fvlm_served_images_total": 2, "pio_fvlm_served_images_pruned_total": 2,
                     "pio_fvlm_served_image_tokens_total": 2 * N,
                     "pio_fvlm_served_image_tokens_kept_total": 2 * k,
                     "pio_fvlm_images_pruned_total": 1, "pio_fvlm_served_image_kept_share_count": 2}
    assert f'pio_fvlm_served_images_total{{model_name="{model}"}}' in text
    # k / N = 64 / 576 = 0.1111: both observations fall in the bucket (0.111, 0.15].
    in_bucket = _share_bucket(text, "0.15") - _share_bucket(text, "0.111")
    assert in_bucket - (before_buckets["0.15"] - before_buckets["0.111"]) == 2


def test_every_metric_the_grafana_dashboard_reads_is_served(client, model, server):
    from tests.test_docs import dashboard_metric_names

    chat(client, model, messages(seed=80), 0.2, max_tokens=1)
    text = fetch_metrics(server.base_url)
    served = {re.sub(r"_(bucket|count|sum|created)$", "", line.split("{")[0].split(" ")[0])
              for line in text.splitlines() if line and not line.startswith("#")}
    missing = sorted(n for n in dashboard_metric_names() if n not in served)
    assert not missing, missing


def test_kept_indices_are_returned_when_asked(server, model):
    """`pio_fvlm_kept_indices: true` returns, per image, the indices its prefill kept; a cached
    repeat (no selection runs) returns the same; unpruned images report null."""
    msgs = messages(QUESTION_B, seed=90, count=2)
    body = {"model": model, "messages": msgs, "max_tokens": 1, "visual_keep": 0.111, "pio_fvlm_kept_indices": True}
    status, payload, headers = post_chat(server, body)
    assert status == 200, payload
    report = payload["pio_fvlm"]
    k = budget(N, 0.111)
    assert report["image_tokens"] == [N, N]
    for kept in report["kept_indices"]:
        assert len(kept) == k and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < N
    assert report["kept_indices"][0] != report["kept_indices"][1]  # two images, two selections
    assert headers[HEADER] == f"{2 * k}/{2 * N}"
    again = post_chat(server, body)[1]["pio_fvlm"]
    assert again == report
    full = post_chat(server, {**body, "visual_keep": 1.0})[1]["pio_fvlm"]
    assert full == {"kept_indices": [None, None], "image_tokens": [None, None]}
    plain = post_chat(server, {k: v for k, v in body.items() if k != "pio_fvlm_kept_indices"})[1]
    assert "pio_fvlm" not in plain


@pytest.mark.parametrize("extra", [{"pio_fvlm_kept_indices": 1}, {"pio_fvlm_kept_indices": True, "stream": True}])
def test_kept_indices_request_errors_name_the_field(server, model, extra):
    body = {"model": model, "messages": messages(seed=91), "max_tokens": 1, "visual_keep": 0.2, **extra}
    status, payload, _ = post_chat(server, body)
    assert status == 400 and "pio_fvlm_kept_indices" in json.dumps(payload), payload
