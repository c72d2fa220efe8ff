"""Routes a request's `visual_keep` to the multimodal processor, where placeholders are made.

Accepted from: the top level of an OpenAI request body (`extra_body={"visual_keep": 0.11}`),
`vllm_xargs={"visual_keep": 0.11}`, and `SamplingParams(extra_args={"visual_keep": 0.11})` in
offline `LLM.generate` / `LLM.chat`. Invalid values are rejected with a validation error
naming `visual_keep` (HTTP 400 on the server). Per-request `mm_processor_kwargs` stay behind
vLLM's `--trust-request-mm-kwargs`; `visual_keep` is exempt because it can only lower a
request's resource use.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm.exceptions import VLLMValidationError

from ..budget import VISUAL_KEEP_FIELD, validate_visual_keep
from .observability import note_rendered


def _validated(value: Any, where: str) -> float:
    try:
        return validate_visual_keep(value, field=where)
    except ValueError as exc:
        raise VLLMValidationError(str(exc), parameter=VISUAL_KEEP_FIELD, value=value) from None


def request_visual_keep(request: Any) -> float | None:
    """The keep ratio an OpenAI request asks for, validated; None when it does not say."""
    top = (getattr(request, "model_extra", None) or {}).get(VISUAL_KEEP_FIELD)
    xargs = getattr(request, "vllm_xargs", None) or {}
    nested = xargs.get(VISUAL_KEEP_FIELD)
    values = {}
    # JSON null means "not set", as for every optional OpenAI field.
    if top is not None:
        values[VISUAL_KEEP_FIELD] = _validated(top, VISUAL_KEEP_FIELD)
    if nested is not None:
        values["vllm_xargs.visual_keep"] = _validated(nested, "vllm_xargs.visual_keep")
    if len(set(values.values())) > 1:
        raise VLLMValidationError(
            f"visual_keep and vllm_xargs.visual_keep disagree ({values}); send one of them",
            parameter=VISUAL_KEEP_FIELD,
        )
    return next(iter(values.values()), None)


def _route_online(preprocess):
    @functools.wraps(preprocess)
    async def wrapper(self, request, *args, **kwargs):
        keep = request_visual_keep(request)
        if keep is not None:
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
    patch(OfflineInferenceMixin, "_add_completion_requests",
          lambda f: _route_offline(f, "prompts", offline.prompt_to_seq))
    patch(OfflineInferenceMixin, "_add_chat_requests",
          lambda f: _route_offline(f, "messages", offline.conversation_to_seq))
