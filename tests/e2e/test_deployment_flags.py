"""vLLM's own deployment flags with the plugin: several API servers, the server default given
the vLLM way, trusted request kwargs, a model the plugin does not prune, and settings that
must stop the server at start-up."""

import json
import shutil

import pytest

from pio_fvlm_vllm.budget import budget
from pio_fvlm_vllm.serving import VllmServer, fetch_metrics, metric_value
from pio_fvlm_vllm.vllm_ext.observability import HEADER

from .conftest import SERVER_ARGS
from .helpers import messages, post_chat
from .test_request_surface import _post

SCALED_ARGS = [*SERVER_ARGS, "--api-server-count", "2", "--trust-request-mm-kwargs",
               "--mm-processor-kwargs", '{"visual_keep": 0.25}', "--enable-scale-out"]


@pytest.fixture(scope="module")
def scaled_server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "scaled.log"
    with VllmServer(tiny_checkpoint, args=SCALED_ARGS, log_path=log) as srv:
        yield srv


def _counts(headers):
    kept, total = map(int, headers[HEADER].split("/"))
    return kept, total


def test_every_api_server_prunes_validates_and_counts(scaled_server, model_name):
    """Requests are spread over both API-server processes: each one honours the request's
    keep, the `--mm-processor-kwargs` default and keep 1.0 (unpruned at a pruned default:
    start-up profiled full images), refuses bad keeps, and /metrics carries the plugin's
    metrics."""
    for i in range(4):
        base = {"model": model_name, "messages": messages(seed=700 + i), "max_tokens": 1}
        status, payload, headers = post_chat(scaled_server, {**base, "visual_keep": 0.11})
        assert status == 200, payload
        kept, total = _counts(headers)
        assert kept == budget(total, 0.11)
        status, payload, headers = post_chat(scaled_server, base)  # the server default
        assert status == 200, payload
        assert _counts(headers)[0] == budget(total, 0.25)
        status, payload, headers = post_chat(scaled_server, {**base, "visual_keep": 1.0})
        assert status == 200, payload
        assert _counts(headers) == (total, total)
        status, payload, _ = post_chat(scaled_server, {**base, "visual_keep": 7})
        assert status == 400 and "visual_keep" in json.dumps(payload), payload
    text = fetch_metrics(scaled_server.base_url)
    assert "pio_fvlm_images_pruned_total" in text and "pio_fvlm_selection_pass_seconds_bucket" in text
    # Served images, counted in whichever API server rendered them: 12 requests with one image.
    served = f'pio_fvlm_served_images_total{{model_name="{model_name}"}}'
    assert metric_value(text, "pio_fvlm_served_images_total") >= 12 and served in text
    assert metric_value(text, "pio_fvlm_served_images_pruned_total") >= 8


@pytest.mark.parametrize("key", ["_pio_fvlm_keep", "_pio_fvlm_prompt"])
def test_private_processor_kwargs_are_refused_even_when_trusted(scaled_server, model_name, key):
    """They name the cache entry a selection is stored under: a request that could set them
    could plant its embeddings under another user's (image, question, keep)."""
    body = {"model": model_name, "messages": messages(seed=710), "max_tokens": 1,
            "mm_processor_kwargs": {key: 0.5}}
    status, payload, _ = post_chat(scaled_server, body)
    assert status == 400 and key in json.dumps(payload), payload


def _edited(rendered: dict, edit) -> dict:
    """`rendered` with its first image's packed plugin context passed through `edit`, wherever
    the features carry it (the full kwargs and the metadata-only copy, which wins)."""
    from vllm.entrypoints.scale_out.token_in_token_out.mm_serde import decode_mm_kwargs_item, encode_mm_kwargs_item
    from vllm.multimodal.inputs import MultiModalFieldElem

    from pio_fvlm_vllm.vllm_ext.context import CONTEXT_FIELD

    copy = json.loads(json.dumps(rendered))
    edited = 0
    for part in ("kwargs_data", "mm_metadata"):
        encoded = (copy["features"].get(part) or {}).get("image")
        if not encoded or encoded[0] is None:
            continue
        item = decode_mm_kwargs_item(encoded[0])
        if CONTEXT_FIELD in item:
            elem = item[CONTEXT_FIELD]
            item[CONTEXT_FIELD] = MultiModalFieldElem(data=edit(elem.data.clone()), field=elem.field)
            encoded[0] = encode_mm_kwargs_item(item)
            edited += 1
    assert edited
    return copy


def _with_value(index, value):
    def edit(packed):
        packed[index] = value
        return packed

    return edit


def test_token_in_requests_carry_only_the_contexts_the_processor_makes(scaled_server, model_name):
    """`--enable-scale-out`: a render tier's output sent back to /inference/v1/generate works;
    the same output with its packed context edited is a 400, and the engine keeps serving."""
    status, rendered, _ = _post(scaled_server, "/v1/chat/completions/render",
                                {"model": model_name, "messages": messages(seed=721), "visual_keep": 0.3})
    assert status == 200, rendered
    rendered["sampling_params"] = {"max_tokens": 2, "temperature": 0.0}
    status, payload, _ = _post(scaled_server, "/inference/v1/generate", rendered)
    assert status == 200, payload
    for index, value in ((0, 100000), (1, 7), (2, 0), (4, 99999), (5, 12345), (6, 3), (7, 10**6), (8, 1),
                         (11, 10**6)):
        # num_keep > N, N wrong, offset wrong, hand-off rows, another image's key (its kept
        # indices would be recorded for that image), a first selection posing as a later turn's
        # delta (hand-off text start, text position, served-before keys), a prefix token id past
        # the vocabulary
        status, payload, _ = _post(scaled_server, "/inference/v1/generate", _edited(rendered, _with_value(index, value)))
        assert status == 400 and "features" in json.dumps(payload), (index, payload)
    status, payload, _ = _post(scaled_server, "/inference/v1/generate", rendered)
    assert status == 200 and scaled_server.healthy(), payload


@pytest.fixture(scope="module")
def text_only_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint's language model alone, as a Llama checkpoint (dummy weights)."""
    out = tmp_path_factory.mktemp("text_only")
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    text = {**config["text_config"], "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (out / "config.json").write_text(json.dumps(text))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tiny_checkpoint / name).exists():
            shutil.copy(tiny_checkpoint / name, out / name)
    return out


def test_keep_sent_to_a_model_the_plugin_does_not_prune_is_a_400(text_only_checkpoint, tmp_path):
    args = ["--dtype", "float32", "--max-model-len", "512", "--load-format", "dummy"]
    with VllmServer(text_only_checkpoint, args=args, log_path=tmp_path / "text.log") as srv:
        base = {"model": str(text_only_checkpoint), "max_tokens": 1,
                "messages": [{"role": "user", "content": "Hello"}]}
        status, payload, _ = post_chat(srv, base)
        assert status == 200, payload
        status, payload, _ = post_chat(srv, {**base, "visual_keep": 0.5})
        assert status == 400, payload
        assert "visual_keep" in json.dumps(payload) and "does not prune" in json.dumps(payload)


@pytest.mark.parametrize("env, args, message", [
    ({"PIO_FVLM_PROXY_LAYER": "999"}, [], "PIO_FVLM_PROXY_LAYER"),
    ({}, ["--mm-processor-kwargs", '{"visual_keep": 2}'], "--mm-processor-kwargs visual_keep"),
    ({"PIO_FVLM_VISUAL_KEEP": "0.5"}, ["--mm-processor-kwargs", '{"visual_keep": 0.25}'], "disagree"),
])
def test_bad_server_settings_stop_the_server_at_start_naming_them(tiny_checkpoint, tmp_path, env, args, message):
    server = VllmServer(tiny_checkpoint, args=[*SERVER_ARGS, *args], env=env, log_path=tmp_path / "bad.log",
                        startup_timeout=300)
    with pytest.raises(RuntimeError, match="exited") as info:
        server.start()
    assert message in str(info.value) or message in server.log_path.read_text()
