import contextlib
import json
import os
import re
from types import SimpleNamespace
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


def handoff_parity(engine, prompt, keep, kept_of):
    """Runs `prompt` through an in-process engine with all tokens and at `keep`, recording the
    output of the hand-off layer h in every prefill step, before and after the plugin's hook.

    Returns marked: served rows whose stream the hook replaced, pruned: (served, D) the
    streams after the hook, full: the unpruned prompt's streams at each served row's original
    index, raw / after: the layer's own outputs (hidden, residual) before / after the hook,
    start: the image's first row, original: each served row's index in the unpruned prompt,
    full_prompt: the unpruned prompt's token ids. `kept_of(model)` gives the selection's kept
    indices (recorded by the caller)."""
    import torch
    from vllm import SamplingParams

    model = engine.llm_engine.model_executor.driver_worker.worker.model_runner.model
    layer = model.language_model.model.layers[model.pio_handoff_layer - 1]
    raw, after, marked = [], [], []

    def before_plugin(module, args, output):
        raw.append(tuple(t.clone() for t in output))
        marked.append(model.pio_handoff.mask[: output[0].shape[0]].clone())

    handles = [layer.register_forward_hook(before_plugin, prepend=True),
               layer.register_forward_hook(lambda m, a, out: after.append(tuple(t.clone() for t in out)))]
    runs = {}
    try:
        for k in (1.0, keep):
            raw.clear(), after.clear(), marked.clear()
            engine.reset_prefix_cache()
            params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"visual_keep": k})
            out = engine.generate([prompt], params, use_tqdm=False)[0]
            runs[k] = (out, [r for r in raw], [a for a in after], torch.cat(marked))
    finally:
        for h in handles:
            h.remove()
    full_out, _, full_after, _ = runs[1.0]
    pruned_out, pruned_raw, pruned_after, pruned_marked = runs[keep]
    full = torch.cat([h + r for h, r in full_after])
    kept = kept_of(model).cpu()
    start = full_out.prompt_token_ids.index(model.config.image_token_index
                                            if hasattr(model.config, "image_token_index") else
                                            model.config.image_token_id)
    n = len(full_out.prompt_token_ids) - len(pruned_out.prompt_token_ids) + kept.numel()
    served = len(pruned_out.prompt_token_ids)
    original = torch.cat([torch.arange(start), start + kept, torch.arange(start + kept.numel(), served) + n
                          - kept.numel()])
    pruned = torch.cat([h + r for h, r in pruned_after])
    raw_rows = tuple(torch.cat(t) for t in zip(*pruned_raw))
    after_rows = tuple(torch.cat(t) for t in zip(*pruned_after))
    return SimpleNamespace(marked=pruned_marked, pruned=pruned, full=full[original], raw=raw_rows, after=after_rows,
                           start=start, original=original, full_prompt=full_out.prompt_token_ids)


def assert_handed_off_rows_take_the_unpruned_states(run) -> None:
    """`handoff_parity`'s result: the hook replaced exactly the rows from the image's first to
    the prompt's end, with the unpruned prompt's states there (which the pruned prompt's own
    layers would not give), and left every other row bit-identical."""
    import torch

    marked = run.marked
    assert marked.nonzero().flatten().tolist() == list(range(run.start, run.pruned.shape[0]))
    torch.testing.assert_close(run.pruned[marked], run.full[marked], rtol=1e-4, atol=1e-4)
    assert not torch.allclose((run.raw[0] + run.raw[1])[marked], run.full[marked], atol=1e-3)
    for before, now in zip(run.raw, run.after):
        assert torch.equal(before[~marked], now[~marked])


def record_kept(model, kept: list) -> None:
    """Appends every selection's kept indices to `kept` (undo: `del model._kept_indices`)."""
    select = model._kept_indices

    def record(*args):
        selection, failed = select(*args)
        kept.extend(k.clone() for k in selection.kept)
        return selection, failed

    model._kept_indices = record
