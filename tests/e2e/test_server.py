"""The plugin in a real `vllm serve` process, through the OpenAI client on loopback."""

import json
import re
import threading
import urllib.request

import pytest

from pio_fvlm_vllm.budget import budget
from pio_fvlm_vllm.serving import fetch_metrics

from .helpers import chat, messages, metric, post_chat

HEADER = "x-pio-fvlm-image-tokens"


def _counts(client, model, msgs, keep=None, extra=None):
    raw = chat(client, model, msgs, keep, extra=extra, raw=True)
    kept, total = map(int, raw.headers[HEADER].split("/"))
    return raw.parse().usage.prompt_tokens, kept, total


@pytest.mark.parametrize("keep", [0.5, 0.222, 0.111, 0.05])
def test_prompt_tokens_shrink_to_the_budget(client, model_name, keep):
    msgs = messages(seed=1)
    full_tokens, kept_all, total = _counts(client, model_name, msgs)
    assert kept_all == total > 1000
    tokens, kept, total_again = _counts(client, model_name, msgs, keep)
    assert total_again == total
    assert kept == budget(total, keep)
    assert tokens == full_tokens - total + kept


def test_vllm_xargs_and_top_level_agree(client, model_name):
    msgs = messages(seed=2)
    top = _counts(client, model_name, msgs, 0.2)
    nested = _counts(client, model_name, msgs, extra={"vllm_xargs": {"visual_keep": 0.2}})
    assert top == nested
    with pytest.raises(Exception, match="disagree"):
        chat(client, model_name, msgs, 0.2, extra={"vllm_xargs": {"visual_keep": 0.3}})


@pytest.mark.parametrize("bad", ["0", "-0.5", "1.5", "1e9", "NaN", "Infinity", '"0.5"', "[0.5]", "true",
                                 "false", '{"v": 1}'])
def test_invalid_visual_keep_is_a_400_naming_the_field(server, model_name, bad):
    body = json.dumps({"model": model_name, "messages": messages(seed=3), "max_tokens": 2})
    body = body[:-1] + f', "visual_keep": {bad}}}'
    status, payload, _ = post_chat(server, body)
    assert status == 400, payload
    text = json.dumps(payload)
    assert "visual_keep" in text and "(0, 1]" in text
    assert server.healthy()


def test_server_keeps_serving_after_bad_requests(client, model_name, server):
    for bad in (0, 2, "x"):
        with pytest.raises(Exception):
            chat(client, model_name, messages(seed=4), bad)
    reply = chat(client, model_name, messages(seed=4), 0.3)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_unpruned_prompt_past_the_context_length_is_a_400(client, model_name, server):
    """Pruned tokens keep their unpruned positions: two 640x480 images (4.7k tokens unpruned,
    over max-model-len 4096) are refused at any keep, as stock vLLM refuses them, and the
    engine keeps serving."""
    body = {"model": model_name, "messages": messages(seed=8, count=2), "max_tokens": 1, "visual_keep": 0.05}
    status, payload, _ = post_chat(server, body)
    assert status == 400, payload
    text = json.dumps(payload)
    assert "visual_keep" in text and "maximum context length of 4096" in text and "before pruning" in text
    reply = chat(client, model_name, messages(seed=8), 0.05, max_tokens=1)
    assert reply.choices[0].finish_reason in ("length", "stop") and server.healthy()


def test_kv_cache_usage_shrinks_while_running(client, model_name, server):
    """The engine's own KV-cache usage, polled while prefill-only requests run (max_tokens=1,
    so the peak is the prompt's blocks). The pruned prompt prefills in one short step and may
    slip between polls; the full one takes several chunked steps and may not."""
    peak = {}
    for keep in (1.0, 0.111):
        samples, done = [], threading.Event()

        def poll():
            while not done.is_set():
                samples.append(metric(server.base_url, "vllm:kv_cache_usage_perc") or 0.0)
                done.wait(0.01)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            for i in range(3):
                chat(client, model_name, messages(seed=500 + i, size=(1008, 336)), keep, max_tokens=1)
        finally:
            done.set()
            poller.join()
        peak[keep] = max(samples)
    assert peak[1.0] > 0, peak
    assert peak[0.111] < peak[1.0] / 3, peak


def test_multiple_images_in_one_prompt(client, model_name):
    msgs = messages(seed=6, count=2, size=(336, 672))
    full, kept_all, total = _counts(client, model_name, msgs)
    tokens, kept, _ = _counts(client, model_name, msgs, 0.25)
    half = total // 2  # two images of one size
    assert kept == 2 * budget(half, 0.25)
    assert tokens == full - total + kept


def test_concurrent_mixed_keeps_and_sizes_match_solo_runs(client, model_name):
    cases = [(keep, size, seed) for keep, size, seed in [
        (1.0, (640, 480), 10), (0.111, (336, 1008), 11), (0.5, (1008, 336), 12),
        (0.222, (672, 672), 13), (0.05, (500, 500), 14), (None, (320, 240), 15)]]
    solo = [_counts(client, model_name, messages(seed=s, size=sz), k) for k, sz, s in cases]
    results = [None] * len(cases)
    errors = []

    def run(i, case):
        keep, size, seed = case
        try:
            results[i] = _counts(client, model_name, messages(seed=seed, size=size), keep)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert results == solo


def test_prometheus_metrics_count_the_selection(client, model_name, server):
    before = metric(server.base_url, "pio_fvlm_image_tokens_kept_total") or 0.0
    failures_before = metric(server.base_url, "pio_fvlm_selection_failures_total") or 0.0
    seen_before = metric(server.base_url, "pio_fvlm_image_tokens_seen_total") or 0.0
    passes_before = metric(server.base_url, "pio_fvlm_selection_pass_seconds_count") or 0.0
    _, kept, total = _counts(client, model_name, messages(seed=20), 0.1)
    after = metric(server.base_url, "pio_fvlm_image_tokens_kept_total")
    seen_after = metric(server.base_url, "pio_fvlm_image_tokens_seen_total")
    assert after - before == kept
    assert seen_after - seen_before == total
    assert metric(server.base_url, "pio_fvlm_selection_seconds_total") > 0
    assert metric(server.base_url, "pio_fvlm_selection_failures_total") == failures_before
    # The selection-time histogram: one more pass, its sum the seconds counter, buckets cumulative.
    assert metric(server.base_url, "pio_fvlm_selection_pass_seconds_count") == passes_before + 1
    assert metric(server.base_url, "pio_fvlm_selection_pass_seconds_sum") == pytest.approx(
        metric(server.base_url, "pio_fvlm_selection_seconds_total"))
    text = fetch_metrics(server.base_url)
    buckets = [float(v) for v in re.findall(r'^pio_fvlm_selection_pass_seconds_bucket{[^}]*le="[^"]+"[^}]*} (\S+)$',
                                            text, re.M)]
    assert len(buckets) == 14 and buckets == sorted(buckets) and buckets[-1] == passes_before + 1
    # The workers' counters carry the served model's name, as vLLM's own metrics do.
    assert re.search(rf'^pio_fvlm_image_tokens_kept_total{{model_name="{re.escape(model_name)}"}} ', text, re.M)


def test_streaming_carries_the_header(server, model_name):
    body = json.dumps({"model": model_name, "messages": messages(seed=21), "max_tokens": 3,
                       "stream": True, "visual_keep": 0.3})
    req = urllib.request.Request(server.base_url + "/v1/chat/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        header = r.headers[HEADER]
        r.read()
    kept, total = map(int, header.split("/"))
    assert kept == budget(total, 0.3)


def test_text_only_request_is_untouched(client, model_name, server):
    raw = client.chat.completions.with_raw_response.create(
        model=model_name, messages=[{"role": "user", "content": "hello"}], max_tokens=2,
        extra_body={"visual_keep": 0.1})
    assert HEADER not in raw.headers
    assert raw.parse().usage.prompt_tokens < 20
