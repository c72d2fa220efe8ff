import re
import urllib.request

from pio_fvlm_vllm.images import image_message, synthetic_image

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
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values) if values else None


def messages(question=QUESTION_A, size=(640, 480), seed=0, count=1):
    return image_message(question, *[synthetic_image(*size, seed=seed + i) for i in range(count)])


def block_size(base_url):
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    match = re.search(r'^vllm:cache_config_info{[^}]*block_size="(\d+)"', text, re.M)
    return int(match.group(1))
