"""Routes a request's `visual_keep` to the multimodal processor, where placeholders are made.

Accepted from: the top level of an OpenAI or Anthropic (`/v1/messages`) request body
(`extra_body={"visual_keep": 0.11}`), `vllm_xargs={"visual_keep": 0.11}`, per-request
`mm_processor_kwargs`, and `SamplingParams(extra_args={"visual_keep": 0.11})` in offline
`LLM.generate` / `LLM.chat`. Invalid values, places that disagree, look-alike keys
(`visualKeep`, `visual_kep`) and a keep sent to a model the plugin does not prune are rejected
with a validation error naming the field (HTTP 400 on the server). Per-request
`mm_processor_kwargs` stay behind vLLM's `--trust-request-mm-kwargs`; `visual_keep` is exempt:
a request's unpruned prompt is bounded as stock vLLM bounds it (see `processor.py`), so a keep
ratio cannot raise its cost above stock's.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Iterable
from typing import Any

from vllm.exceptions import VLLMValidationError

from ..budget import VISUAL_KEEP_FIELD, validate_visual_keep
from .observability import note_rendered


def _validated(value: Any, where: str) -> float:
    try:
        return validate_visual_keep(value, field=where)
    except ValueError as exc:
        raise VLLMValidationError(str(exc), parameter=VISUAL_KEEP_FIELD, value=value) from None


def _normalised(key: str) -> str:
    return key.lower().replace("_", "").replace("-", "")


def _looks_like_visual_keep(key: str) -> bool:
    if key == VISUAL_KEEP_FIELD:
        return False
    norm = _normalised(key)
    return difflib.SequenceMatcher(None, norm, _normalised(VISUAL_KEEP_FIELD)).ratio() >= 0.85


def refuse_look_alikes(keys: Iterable[str], where: str = "") -> None:
    """A key that is almost `visual_keep` is a typo the request would otherwise silently lose."""
    for key in keys:
        if isinstance(key, str) and _looks_like_visual_keep(key):
            raise VLLMValidationError(
                f"unknown field {where}{key!r}: did you mean {where}{VISUAL_KEEP_FIELD}?",
                parameter=f"{where}{key}",
            )


def request_visual_keep(request: Any) -> float | None:
    """The keep ratio an OpenAI request asks for, validated; None when it does not say."""
    top = getattr(request, "model_extra", None) or {}
    xargs = getattr(request, "vllm_xargs", None) or {}
    mm_kwargs = getattr(request, "mm_processor_kwargs", None) or {}
    refuse_look_alikes(top)
    refuse_look_alikes(xargs, "vllm_xargs.")
    refuse_look_alikes(mm_kwargs, "mm_processor_kwargs.")
    # JSON null means "not set", as for every optional OpenAI field.
    values = {
        where: _validated(raw, where)
        for where, raw in ((VISUAL_KEEP_FIELD, top.get(VISUAL_KEEP_FIELD)),
                           ("vllm_xargs.visual_keep", xargs.get(VISUAL_KEEP_FIELD)),
                           ("mm_processor_kwargs.visual_keep", mm_kwargs.get(VISUAL_KEEP_FIELD)))
        if raw is not None
    }
    if len(set(values.values())) > 1:
        raise VLLMValidationError(
            f"visual_keep is given in several places that disagree ({values}); send one of them",
            parameter=VISUAL_KEEP_FIELD,
        )
    return next(iter(values.values()), None)


def _raw_xargs_keep_problem(body: bytes) -> tuple[bytes | None, str | None]:
    """vLLM's schema types `vllm_xargs` values as str | int | float, so `true` would reach the
    plugin as 1 and `null` fail with a schema error: look at the raw JSON first.

    Returns (body to pass on, error message): null is dropped ("not set", as at the top level),
    a boolean is refused.
    """
    if b"vllm_xargs" not in body or VISUAL_KEEP_FIELD.encode() not in body:
        return body, None
    try:
        parsed = json.loads(body)
    except ValueError:
        return body, None  # vLLM answers malformed JSON itself
    xargs = parsed.get("vllm_xargs") if isinstance(parsed, dict) else None
    if not isinstance(xargs, dict) or VISUAL_KEEP_FIELD not in xargs:
        return body, None
    value = xargs[VISUAL_KEEP_FIELD]
    if isinstance(value, bool):
        try:
            validate_visual_keep(value, field="vllm_xargs.visual_keep")
        except ValueError as exc:
            return None, str(exc)
    if value is None:
        del xargs[VISUAL_KEEP_FIELD]
        return json.dumps(parsed).encode(), None
    return body, None


class RawKeepMiddleware:
    """Pure ASGI middleware: applies `_raw_xargs_keep_problem` to POST bodies."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body, error = _raw_xargs_keep_problem(b"".join(chunks))
        if error is not None:
            payload = json.dumps({"error": {"message": error, "type": "BadRequestError",
                                            "param": "vllm_xargs.visual_keep", "code": 400}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed


def _check_model_supported(model_config: Any) -> None:
    from . import ARCHITECTURE

    architectures = getattr(model_config, "architectures", None) or []
    if ARCHITECTURE not in architectures:
        raise VLLMValidationError(
            f"visual_keep: the pio_fvlm plugin prunes {ARCHITECTURE} models; this server's model is "
            f"{', '.join(architectures) or 'unknown'}, which it does not prune. Leave visual_keep out.",
            parameter=VISUAL_KEEP_FIELD,
        )


def _route_online(preprocess):
    @functools.wraps(preprocess)
    async def wrapper(self, request, *args, **kwargs):
        keep = request_visual_keep(request)
        if keep is not None:
            _check_model_supported(self.model_config)
            current = getattr(request, "mm_processor_kwargs", None) or {}
            request.mm_processor_kwargs = {**current, VISUAL_KEEP_FIELD: keep}
        result = await preprocess(self, request, *args, **kwargs)
        # preprocess_chat returns (conversation, engine_inputs), preprocess_cmpl engine_inputs.
        engine_inputs = result[1] if isinstance(result, tuple) else result
        if isinstance(engine_inputs, list):
            note_rendered(engine_inputs)
        return result

    wrapper.__pio_fvlm__ = True
    return wrapper


def _exempt_visual_keep(validate):
    @functools.wraps(validate)
    def wrapper(*, mm_processor_kwargs, **kwargs):
        if mm_processor_kwargs:
            mm_processor_kwargs = {k: v for k, v in mm_processor_kwargs.items() if k != VISUAL_KEEP_FIELD}
        return validate(mm_processor_kwargs=mm_processor_kwargs, **kwargs)

    wrapper.__pio_fvlm__ = True
    return wrapper


def params_visual_keep(params: Any) -> float | None:
    extra = getattr(params, "extra_args", None) or {}
    if VISUAL_KEEP_FIELD not in extra:
        return None
    return validate_visual_keep(extra[VISUAL_KEEP_FIELD], field="extra_args.visual_keep")


def _route_offline(add_requests, items_arg: str, to_seq):
    """Offline entry points render every prompt with one shared `mm_processor_kwargs`; when
    any SamplingParams names a keep ratio, prompts are rendered one at a time, in order."""

    @functools.wraps(add_requests)
    def wrapper(self, **kwargs):
        seq_items = to_seq(kwargs[items_arg])
        seq_params = self._params_to_seq(kwargs["params"], len(seq_items))
        keeps = [params_visual_keep(p) for p in seq_params]
        if all(k is None for k in keeps):
            return add_requests(self, **kwargs)
        base = kwargs.get("mm_processor_kwargs") or {}
        request_ids: list[str] = []
        for item, params, keep in zip(seq_items, seq_params, keeps):
            mm_kwargs = base if keep is None else {**base, VISUAL_KEEP_FIELD: keep}
            one = {**kwargs, items_arg: [item], "params": [params], "mm_processor_kwargs": mm_kwargs or None}
            request_ids += add_requests(self, **one)
        return request_ids

    wrapper.__pio_fvlm__ = True
    return wrapper


def _carry_anthropic_extras(build):
    """The Anthropic request is rebuilt as an OpenAI one; its `visual_keep` (and look-alikes,
    to be refused) go along."""

    @functools.wraps(build)
    def wrapper(cls, anthropic_request, *args, **kwargs):
        request = build(cls, anthropic_request, *args, **kwargs)
        extra = getattr(anthropic_request, "model_extra", None) or {}
        carried = {k: v for k, v in extra.items() if k == VISUAL_KEEP_FIELD or _looks_like_visual_keep(k)}
        return request.model_copy(update=carried) if carried else request

    wrapper.__pio_fvlm__ = True
    return classmethod(wrapper)


def install_anthropic_routing() -> None:
    """`/v1/messages` bodies are parsed by a schema that drops unknown fields: let it keep them
    (before the route is built, at app start-up) so `visual_keep` reaches the OpenAI request."""
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages

    current = AnthropicServingMessages.__dict__["_build_base_request"]
    if getattr(current.__func__, "__pio_fvlm__", False):
        return
    AnthropicMessagesRequest.model_config["extra"] = "allow"
    AnthropicMessagesRequest.model_rebuild(force=True)
    AnthropicServingMessages._build_base_request = _carry_anthropic_extras(current.__func__)


def token_in_context_problem(token_ids: list[int], features, image_token_id: int, num_image_tokens) -> str | None:
    """What is wrong with the plugin contexts a token-in (`--enable-scale-out`) request
    carries, or None. Each must be exactly what the processor derives from the same prompt and
    image, so the worker can trust it: budget, image size, offset, placeholder length and the
    text around the image. `num_image_tokens(item)` is the image's unpruned token count."""
    from .context import CONTEXT_FIELD, PromptContext, image_contexts
    from vllm.entrypoints.scale_out.token_in_token_out.mm_features import mm_kwargs_from_features

    if features is None or not (features.kwargs_data or features.mm_metadata):
        return None
    items = mm_kwargs_from_features(features).get("image", [])  # metadata overrides kwargs, as in vLLM
    placeholders = features.mm_placeholders.get("image", [])
    around = image_contexts(list(token_ids), image_token_id)
    for i, (item, placeholder) in enumerate(zip(items, placeholders)):
        if item is None or CONTEXT_FIELD not in item:
            continue
        where = f"features: image {i}'s {CONTEXT_FIELD}"
        try:
            ctx = PromptContext.unpack(item[CONTEXT_FIELD].data)
        except ValueError as exc:
            return f"{where}: {exc}"
        n = num_image_tokens(item)
        if ctx.num_tokens != n:
            return f"{where} counts {ctx.num_tokens} image tokens; the image has {n}"
        if ctx.served_offset != placeholder.offset:
            return f"{where} is at offset {ctx.served_offset}; its placeholder at {placeholder.offset}"
        if not ctx.pruned:
            if placeholder.length != n or ctx.prefix_ids or ctx.suffix_ids:
                return f"{where} keeps every token but its placeholder has {placeholder.length} of {n}"
            continue
        rows = max(ctx.handoff_rows, 0)
        if not 0 < ctx.num_keep <= n or placeholder.length != ctx.num_keep + rows:
            return (f"{where} keeps {ctx.num_keep} tokens (+{rows} hand-off rows) of {n}; its placeholder "
                    f"has {placeholder.length} rows")
        if ctx.handoff_rows < -1 or rows > min(len(ctx.suffix_ids), n - ctx.num_keep):
            return f"{where} hands off {ctx.handoff_rows} rows"
        if i >= len(around) or (ctx.prefix_ids, ctx.suffix_ids) != around[i]:
            return f"{where} does not match the prompt's text around the image"
    return None


def _check_token_in(serve_tokens):
    @functools.wraps(serve_tokens)
    async def wrapper(self, request, *args, **kwargs):
        features = getattr(request, "features", None)
        if features is not None and (features.kwargs_data or features.mm_metadata):
            from vllm.multimodal import MULTIMODAL_REGISTRY

            from . import ARCHITECTURE

            if ARCHITECTURE in (self.model_config.architectures or []):
                processor = getattr(self, "_pio_fvlm_processor", None)
                if processor is None:
                    processor = self._pio_fvlm_processor = MULTIMODAL_REGISTRY.create_processor(self.model_config)

                def num_image_tokens(item) -> int:
                    height, width = item["image_sizes"].data.tolist()
                    return processor.info.get_num_image_tokens(image_width=width, image_height=height)

                problem = token_in_context_problem(request.token_ids, features,
                                                   self.model_config.hf_config.image_token_index, num_image_tokens)
                if problem is not None:
                    return self.create_error_response(VLLMValidationError(problem, parameter="features"))
        return await serve_tokens(self, request, *args, **kwargs)

    wrapper.__pio_fvlm__ = True
    return wrapper


def install_request_routing() -> None:
    from vllm.entrypoints.common import offline
    from vllm.entrypoints.common.offline import OfflineInferenceMixin
    from vllm.renderers import online_renderer

    def patch(owner, name, wrap):
        current = getattr(owner, name)
        if not getattr(current, "__pio_fvlm__", False):
            setattr(owner, name, wrap(current))

    patch(online_renderer, "validate_request_mm_kwargs", _exempt_visual_keep)
    patch(online_renderer.OnlineRenderer, "preprocess_chat", _route_online)
    patch(online_renderer.OnlineRenderer, "preprocess_cmpl", _route_online)
    from vllm.entrypoints.scale_out.token_in_token_out.serving import ServingTokens

    patch(ServingTokens, "serve_tokens", _check_token_in)
    patch(OfflineInferenceMixin, "_add_completion_requests",
          lambda f: _route_offline(f, "prompts", offline.prompt_to_seq))
    patch(OfflineInferenceMixin, "_add_chat_requests",
          lambda f: _route_offline(f, "messages", offline.conversation_to_seq))
    install_anthropic_routing()
