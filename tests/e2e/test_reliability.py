"""Bad input, load and faults against one real server: clean 4xx or a correct answer, nothing
lost, nothing leaked between requests, memory flat. Loopback only, bounded in count and time."""

import base64
import io
import json
import random
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pio_fvlm_vllm.images import data_url, synthetic_image

from .conftest import FAULT_MARKER
from .helpers import chat, messages, metric, post_chat, token_logprobs

HEADER = "x-pio-fvlm-image-tokens"


def _png_bytes(w, h, seed=0):
    buf = io.BytesIO()
    synthetic_image(w, h, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def _url(raw: bytes, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


IMAGES = {
    "tiny 1x1": lambda: data_url(synthetic_image(1, 1)),
    "strip 2000x2": lambda: data_url(synthetic_image(2000, 2)),
    "strip 2x2000": lambda: data_url(synthetic_image(2, 2000)),
    "large 3000x2000": lambda: data_url(synthetic_image(3000, 2000)),
    "normal": lambda: data_url(synthetic_image(640, 480)),
    "corrupt bytes": lambda: _url(b"\x89PNG\r\n\x1a\nthis is not an image"),
    "truncated png": lambda: _url(_png_bytes(640, 480)[:400]),
    "empty data": lambda: _url(b""),
    "not base64": lambda: "data:image/png;base64,@@@@",
}

keep_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-300, 5e-324, 0.999999, 1.0, 1.0000001, -0.0, 0.5]), st.text(max_size=4),
    st.lists(st.floats(0, 1), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


def _valid(keep):
    return keep is None or (not isinstance(keep, bool) and isinstance(keep, (int, float))
                            and keep == keep and 0 < keep <= 1)


@settings(max_examples=45, deadline=None, suppress_health_check=list(HealthCheck))
@given(keep=keep_values, image_kinds=st.lists(st.sampled_from(sorted(IMAGES)), max_size=3),
       text=st.one_of(st.just(""), st.text(max_size=40), st.just("word " * 3800)))
def test_fuzzed_requests_get_a_clean_answer_or_4xx(server, model_name, keep, image_kinds, text):
    content = [{"type": "image_url", "image_url": {"url": IMAGES[k]()}} for k in image_kinds]
    content.append({"type": "text", "text": text})
    body = {"model": model_name, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    if keep is not None or image_kinds:
        body["visual_keep"] = keep
    status, payload, headers = post_chat(server, body)
    assert status < 500, payload
    if not _valid(keep):
        assert status == 400 and "visual_keep" in json.dumps(payload)
    if status == 200:
        assert payload["usage"]["prompt_tokens"] <= 4096
        if HEADER.lower() in {h.lower() for h in headers}:
            kept, total = map(int, next(v for h, v in headers.items() if h.lower() == HEADER).split("/"))
            assert 0 < kept <= total
    else:
        assert 400 <= status < 500
    assert server.healthy()


def _server_rss(server) -> int:
    proc = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def test_soak_mixed_requests_nothing_lost_counts_stable_memory_flat(client, model_name, server):
    combos = [(keep, size, seed) for seed, (keep, size) in enumerate(
        [(k, s) for k in (None, 1.0, 0.5, 0.111, 0.05) for s in ((640, 480), (336, 1008), (500, 500))])]
    solo = {c: chat(client, model_name, messages(seed=100 + c[2], size=c[1]), c[0], max_tokens=2).usage.prompt_tokens
            for c in combos}
    # Interleaved: bad requests (each must be a 400, never a 5xx) and clients that hang up
    # while their image is being processed.
    bad = [0, 7, "x", True, 10**400, {"visualKeep": 0.1}, {"visual_keep": 0.5, "vllm_xargs": {"visual_keep": 0.2}}]
    rounds, per_round, rss = 3, 90, []
    failures, statuses = [], []
    for r in range(rounds):
        work = [combos[(i * 7 + r) % len(combos)] for i in range(per_round)]
        work += [("bad", b) for b in bad] + [("hang up", i) for i in range(3)]
        random.Random(r).shuffle(work)

        def one(c):
            if c[0] == "bad":
                body = {"model": model_name, "messages": messages(seed=300), "max_tokens": 2}
                body.update(c[1] if isinstance(c[1], dict) else {"visual_keep": c[1]})
                text = json.dumps(body) if c[1] != 10**400 else json.dumps(body)[:-1] + f', "visual_keep": {c[1]}}}'
                statuses.append(post_chat(server, text)[0])
                return None
            if c[0] == "hang up":
                _hang_up(server, {"model": model_name, "messages": messages(seed=400 + c[1]), "max_tokens": 50,
                                  "visual_keep": 0.2})
                return None
            reply = chat(client, model_name, messages(seed=100 + c[2], size=c[1]), c[0], max_tokens=2)
            return c, reply.usage.prompt_tokens

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, c) for c in work]
            done = []
            for f in futures:
                try:
                    result = f.result(timeout=600)
                except Exception as exc:  # noqa: BLE001 - collected and asserted below
                    failures.append(exc)
                else:
                    if result is not None:
                        done.append(result)
        assert len(done) == per_round
        assert all(tokens == solo[c] for c, tokens in done)
        rss.append(_server_rss(server))
    assert not failures
    assert statuses == [400] * (rounds * len(bad))
    # After the first round has warmed every cache and pool, memory stays flat.
    assert rss[-1] <= rss[0] * 1.10 + 64 * 2**20, [r / 2**20 for r in rss]
    print(f"soak: {rounds * per_round} requests, 0 failed, server RSS MiB per round: "
          f"{[round(r / 2**20) for r in rss]}")


def _hang_up(server, body) -> None:
    """Sends a request and closes the connection 50 ms later, before any answer."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
        time.sleep(0.05)


def test_client_disconnects_mid_stream_and_aborts_leave_nothing_running(client, model_name, server):
    body = {"model": model_name, "messages": messages(seed=200), "max_tokens": 300, "stream": True,
            "visual_keep": 0.3, "ignore_eos": True}
    req = urllib.request.Request(server.base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    for _ in range(3):
        r = urllib.request.urlopen(req, timeout=120)
        r.read(300)  # a few chunks, then hang up
        r.close()
    # Requests abandoned while their image is still being processed and selected: the
    # client sends the request and hangs up 50 ms later.
    for i in range(6):
        abandoned = dict(body, stream=False, visual_keep=0.2)
        abandoned["messages"] = messages(seed=210 + i, size=(1008, 336))
        _hang_up(server, abandoned)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        running = metric(server.base_url, "vllm:num_requests_running")
        waiting = metric(server.base_url, "vllm:num_requests_waiting")
        if running == 0 and waiting == 0:
            break
        time.sleep(1)
    assert (running, waiting) == (0, 0)
    reply = chat(client, model_name, messages(seed=220), 0.3, max_tokens=2)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_a_failing_selection_spares_the_rest_of_the_batch(client, model_name, server):
    normal = [(messages(seed=300 + i), 0.2) for i in range(4)]
    solo = [token_logprobs(chat(client, model_name, m, k, logprobs=True, extra={"cache_salt": "solo"}))
            for m, k in normal]
    failures_before = metric(server.base_url, "pio_fvlm_selection_failures_total")
    poisoned = messages(f"What is this {FAULT_MARKER} thing?", seed=310)
    results = [None] * (len(normal) + 1)

    def run(i):
        if i == len(normal):
            results[i] = chat(client, model_name, poisoned, 0.2, max_tokens=4)
        else:
            m, k = normal[i]
            results[i] = token_logprobs(chat(client, model_name, m, k, logprobs=True,
                                             extra={"cache_salt": "together"}))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results[-1].choices[0].finish_reason in ("length", "stop")  # served, uniform stride
    assert metric(server.base_url, "pio_fvlm_selection_failures_total") > failures_before
    for alone, together in zip(solo, results[:-1]):
        assert [t for t, _ in alone] == [t for t, _ in together]
        assert max(abs(a - b) for (_, a), (_, b) in zip(alone, together)) < 1e-3


def test_same_request_same_output_across_batches_and_cache_states(client, model_name):
    msgs = messages("Which square is the largest?", seed=400, size=(672, 672))
    alone = token_logprobs(chat(client, model_name, msgs, 0.15, logprobs=True, max_tokens=6))
    cached = token_logprobs(chat(client, model_name, msgs, 0.15, logprobs=True, max_tokens=6))
    with ThreadPoolExecutor(4) as pool:
        crowd = [pool.submit(chat, client, model_name, messages(seed=410 + i), 0.3, max_tokens=6) for i in range(3)]
        in_batch = pool.submit(lambda: token_logprobs(chat(client, model_name, msgs, 0.15, logprobs=True,
                                                           max_tokens=6, extra={"cache_salt": "batch"})))
        for f in crowd:
            f.result()
        batched = in_batch.result()
    for other in (cached, batched):
        assert [t for t, _ in other] == [t for t, _ in alone]
        assert max(abs(a - b) for (_, a), (_, b) in zip(alone, other)) < 1e-3
