"""Every way a client can send (or mis-send) a keep ratio, against the shared real server."""

import base64
import io
import json
import urllib.error
import urllib.request

import pytest
from PIL import Image

from pio_fvlm_vllm.budget import budget
from pio_fvlm_vllm.vllm_ext.observability import HEADER

from .helpers import chat, messages, post_chat


def _post(server, path, body, timeout=300):
    req = urllib.request.Request(server.base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def _png_b64(width, height, seed=0):
    from pio_fvlm_vllm.images import synthetic_image

    buf = io.BytesIO()
    (synthetic_image(width, height, seed=seed) if width > 1 else Image.new("RGB", (1, 1))).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _assert_serving(client, model_name, server):
    reply = chat(client, model_name, messages(seed=9), 0.2, max_tokens=1)
    assert reply.choices[0].finish_reason in ("length", "stop") and server.healthy()


def test_many_tiny_images_at_a_tiny_keep_are_refused_before_processing(client, model_name, server):
    """64 1x1 images are 75k image tokens unpruned: pruning them to 64 tokens must not admit
    what stock vLLM refuses (a 400), and the refusal comes before the images are processed."""
    url = "data:image/png;base64," + _png_b64(1, 1)
    content = [{"type": "image_url", "image_url": {"url": url}} for _ in range(64)]
    content.append({"type": "text", "text": "What is shown?"})
    body = {"model": model_name, "messages": [{"role": "user", "content": content}], "max_tokens": 1,
            "visual_keep": 1e-6}
    status, payload, _ = post_chat(server, body)
    assert status == 400, payload
    text = json.dumps(payload)
    assert "visual_keep" in text and "before pruning" in text and "maximum context length of 4096" in text
    assert payload["error"]["param"] == "visual_keep", payload
    _assert_serving(client, model_name, server)


@pytest.mark.parametrize("field, value, where", [
    ("visual_keep", 10**400, "visual_keep"),
    ("visualKeep", 0.1, "visualKeep"),
    ("visual_kep", 0.1, "visual_kep"),
])
def test_huge_numbers_and_look_alike_keys_are_400s_naming_the_field(client, model_name, server, field, value, where):
    body = {"model": model_name, "messages": messages(seed=30), "max_tokens": 1}
    raw = json.dumps(body)[:-1] + f', "{field}": {value}}}'  # a 401-digit integer stays an integer
    status, payload, _ = post_chat(server, raw)
    assert status == 400, payload
    message = json.dumps(payload)
    assert where in message and "visual_keep" in message
    assert str(value)[:60] not in message  # a huge value is not echoed back whole
    _assert_serving(client, model_name, server)


def test_look_alike_key_in_vllm_xargs_is_a_400(client, model_name, server):
    body = {"model": model_name, "messages": messages(seed=31), "max_tokens": 1,
            "vllm_xargs": {"VisualKeep": 0.1}}
    status, payload, _ = post_chat(server, body)
    assert status == 400 and "did you mean vllm_xargs.visual_keep" in json.dumps(payload), payload


def test_keep_in_mm_processor_kwargs_is_honoured_and_must_agree(client, model_name, server):
    """`mm_processor_kwargs.visual_keep` needs no --trust-request-mm-kwargs, counts like the
    other places, and a disagreement with the top level is a 400 (no silent precedence)."""
    base = {"model": model_name, "messages": messages(seed=32), "max_tokens": 1}
    status, payload, headers = post_chat(server, {**base, "mm_processor_kwargs": {"visual_keep": 0.25}})
    assert status == 200, payload
    kept, total = map(int, headers[HEADER].split("/"))
    assert kept == budget(total, 0.25)
    status, payload, _ = post_chat(server, {**base, "visual_keep": 0.5, "mm_processor_kwargs": {"visual_keep": 0.25}})
    assert status == 400 and "disagree" in json.dumps(payload), payload


def test_batch_endpoint_header_sums_the_conversations(server, model_name):
    convs = [messages(seed=33), messages(seed=34, size=(336, 1008))]
    status, payload, headers = _post(server, "/v1/chat/completions/batch",
                                     {"model": model_name, "messages": convs, "max_tokens": 1, "visual_keep": 0.11})
    assert status == 200, payload
    kept, total = map(int, headers[HEADER].split("/"))
    singles = []
    for conv in convs:
        status, _, h = post_chat(server, {"model": model_name, "messages": conv, "max_tokens": 1, "visual_keep": 0.11})
        singles.append(tuple(map(int, h[HEADER].split("/"))))
    assert (kept, total) == (sum(s[0] for s in singles), sum(s[1] for s in singles))
    assert payload["usage"]["prompt_tokens"] < total


def _anthropic(server, model_name, keep=None, seed=35):
    body = {"model": model_name, "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": _png_b64(640, 480, seed)}},
        {"type": "text", "text": "What is shown in this image?"}]}]}
    if keep is not None:
        body["visual_keep"] = keep
    return _post(server, "/v1/messages", body)


def test_anthropic_messages_honour_and_validate_visual_keep(server, model_name):
    status, full, _ = _anthropic(server, model_name)
    assert status == 200, full
    status, pruned, headers = _anthropic(server, model_name, 0.11)
    assert status == 200, pruned
    kept, total = map(int, headers[HEADER].split("/"))
    assert kept == budget(total, 0.11)
    assert full["usage"]["input_tokens"] - pruned["usage"]["input_tokens"] == total - kept
    for bad in (0, 2, "x"):
        status, payload, _ = _anthropic(server, model_name, bad)
        assert status == 400 and "visual_keep" in json.dumps(payload), (bad, payload)


def test_vllm_xargs_boolean_is_refused_and_null_means_not_set(client, model_name, server):
    """vLLM's schema would turn `true` into 1 and refuse `null` with a schema error; the plugin
    applies the top-level rules instead."""
    base = {"model": model_name, "messages": messages(seed=36), "max_tokens": 1}
    status, payload, _ = post_chat(server, {**base, "vllm_xargs": {"visual_keep": True}})
    assert status == 400 and "vllm_xargs.visual_keep" in json.dumps(payload), payload
    status, payload, headers = post_chat(server, {**base, "vllm_xargs": {"visual_keep": None}})
    assert status == 200, payload
    kept, total = map(int, headers[HEADER].split("/"))
    assert kept == total
    _assert_serving(client, model_name, server)
