"""Routes a request's `visual_keep` to the multimodal processor, where placeholders are made.

Accepted from: the top level of an OpenAI or Anthropic (`/v1/messages`) request body
(`extra_body={"visual_keep": 0.11}`), `vllm_xargs={"visual_keep": 0.11}`, per-request
`mm_processor_kwargs`, and `SamplingParams(extra_args={"visual_keep": 0.11})` in offline
`LLM.generate` / `LLM.chat`. Invalid values, places that disagree, look-alike keys
(`visualKeep`, `visual_kep`) and a keep sent to a model the plugin does not prune are rejected
with a validation error naming the field (HTTP 400 on the server). Per-request
`mm_processor_kwargs` stay behind vLLM's `--trust-request-mm-kwargs`; `visual_keep` is exempt:
a request's unpruned prompt is bounded as stock vLLM bounds it (see `processor.py`), so a keep
ratio cannot raise its cost above stock's. `visual_turns` (how a chat's later turns treat an
image an earlier turn pruned, see `turns.py`) travels the same ways and is checked the same way.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable
from typing import Any

from vllm.exceptions import VLLMValidationError

from ..budget import VISUAL_KEEP_FIELD, VISUAL_TURNS_FIELD, validate_visual_keep, validate_visual_turns
from . import kept_indices
from .observability import note_rendered

_PLUGIN_FIELDS = (VISUAL_KEEP_FIELD, VISUAL_TURNS_FIELD)


def _validated(value: Any, where: str, field: str = VISUAL_KEEP_FIELD) -> Any:
    validate = validate_visual_keep if field == VISUAL_KEEP_FIELD else validate_visual_turns
    try:
        return validate(value, field=where)
    except ValueError as exc:
        # The message shows the value, cut; vLLM would append the whole value again.
        raise VLLMValidationError(str(exc), parameter=field) from None


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


def _request_field(request: Any, field: str) -> Any:
    """A plugin field of an OpenAI request, validated, from wherever it was sent; None when
    it is not. JSON null means "not set", as for every optional OpenAI field."""
    top = getattr(request, "model_extra", None) or {}
    xargs = getattr(request, "vllm_xargs", None) or {}
    mm_kwargs = getattr(request, "mm_processor_kwargs", None) or {}
    values = {
        where: _validated(raw, where, field)
        for where, raw in ((field, top.get(field)), (f"vllm_xargs.{field}", xargs.get(field)),
                           (f"mm_processor_kwargs.{field}", mm_kwargs.get(field)))
        if raw is not None
    }
    if len(set(values.values())) > 1:
        raise VLLMValidationError(
            f"{field} is given in several places that disagree ({values}); send one of them", parameter=field,
        )
    return next(iter(values.values()), None)


def request_visual_keep(request: Any) -> float | None:
    """The keep ratio an OpenAI request asks for, validated; None when it does not say."""
    refuse_look_alikes(getattr(request, "model_extra", None) or {})
    refuse_look_alikes(getattr(request, "vllm_xargs", None) or {}, "vllm_xargs.")
    refuse_look_alikes(getattr(request, "mm_processor_kwargs", None) or {}, "mm_processor_kwargs.")
    return _request_field(request, VISUAL_KEEP_FIELD)


def request_visual_turns(request: Any) -> str | None:
    """How an OpenAI request's later chat turns treat earlier turns' images; None: unsaid."""
    return _request_field(request, VISUAL_TURNS_FIELD)


def _check_model_supported(model_config: Any) -> None:
    from .families import model_prunes, supported_list

    if not model_prunes(model_config):
        architectures = getattr(model_config, "architectures", None) or []
        raise VLLMValidationError(
            f"visual_keep: the pio_fvlm plugin prunes {supported_list()} models; this server's model is "
            f"{', '.join(architectures) or 'unknown'}, which it does not prune. Leave visual_keep out.",
            parameter=VISUAL_KEEP_FIELD,
        )


def _served_model_name(model_config: Any) -> str:
    name = getattr(model_config, "served_model_name", None) or getattr(model_config, "model", "")
    return name[0] if isinstance(name, (list, tuple)) else str(name)


def _route_online(preprocess):
    @functools.wraps(preprocess)
    async def wrapper(self, request, *args, **kwargs):
        keep = request_visual_keep(request)
        turns = request_visual_turns(request)
        try:
            wants_kept = kept_indices.requested(getattr(request, "model_extra", None) or {},
                                                bool(getattr(request, "stream", False)))
        except ValueError as exc:
            raise VLLMValidationError(str(exc), parameter=kept_indices.FIELD) from None
        if keep is not None or wants_kept or turns is not None:
            _check_model_supported(self.model_config)
            current = getattr(request, "mm_processor_kwargs", None) or {}
            request.mm_processor_kwargs = {**current, VISUAL_KEEP_FIELD: keep, VISUAL_TURNS_FIELD: turns}
        result = await preprocess(self, request, *args, **kwargs)
        # preprocess_chat returns (conversation, engine_inputs), preprocess_cmpl engine_inputs.
        engine_inputs = result[1] if isinstance(result, tuple) else result
        if isinstance(engine_inputs, list):
            note_rendered(engine_inputs, _served_model_name(self.model_config), wants_kept)
        return result

    wrapper.__pio_fvlm__ = True
    return wrapper


def _exempt_visual_keep(validate):
    @functools.wraps(validate)
    def wrapper(*, mm_processor_kwargs, **kwargs):
        if mm_processor_kwargs:
            mm_processor_kwargs = {k: v for k, v in mm_processor_kwargs.items() if k not in _PLUGIN_FIELDS}
        return validate(mm_processor_kwargs=mm_processor_kwargs, **kwargs)

    wrapper.__pio_fvlm__ = True
    return wrapper


def params_visual_keep(params: Any) -> float | None:
    extra = getattr(params, "extra_args", None) or {}
    if VISUAL_KEEP_FIELD not in extra:
        return None
    return validate_visual_keep(extra[VISUAL_KEEP_FIELD], field="extra_args.visual_keep")


def params_plugin_kwargs(params: Any) -> dict[str, Any]:
    """The plugin's processor kwargs a `SamplingParams` asks for in `extra_args`, validated."""
    extra = getattr(params, "extra_args", None) or {}
    kwargs: dict[str, Any] = {}
    if extra.get(VISUAL_KEEP_FIELD) is not None:
        kwargs[VISUAL_KEEP_FIELD] = params_visual_keep(params)
    if extra.get(VISUAL_TURNS_FIELD) is not None:
        kwargs[VISUAL_TURNS_FIELD] = validate_visual_turns(extra[VISUAL_TURNS_FIELD],
                                                           field=f"extra_args.{VISUAL_TURNS_FIELD}")
    return kwargs


def _route_offline(add_requests, items_arg: str, to_seq):
    """Offline entry points render every prompt with one shared `mm_processor_kwargs`; when
    any SamplingParams names a keep ratio, prompts are rendered one at a time, in order."""

    @functools.wraps(add_requests)
    def wrapper(self, **kwargs):
        seq_items = to_seq(kwargs[items_arg])
        seq_params = self._params_to_seq(kwargs["params"], len(seq_items))
        asked = [params_plugin_kwargs(p) for p in seq_params]
        if not any(asked):
            return add_requests(self, **kwargs)
        base = kwargs.get("mm_processor_kwargs") or {}
        request_ids: list[str] = []
        for item, params, plugin_kwargs in zip(seq_items, seq_params, asked):
            mm_kwargs = {**base, **plugin_kwargs}
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
        carried = {k: v for k, v in extra.items() if k in _PLUGIN_FIELDS or _looks_like_visual_keep(k)}
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


def install_request_routing() -> None:
    from vllm.entrypoints.common import offline
    from vllm.entrypoints.common.offline import OfflineInferenceMixin
    from vllm.renderers import online_renderer

    def patch(owner, name, wrap):
        current = getattr(owner, name)
        if not getattr(current, "__pio_fvlm__", False):
            setattr(owner, name, wrap(current))

    patch(online_renderer, "validate_request_mm_kwargs", _exempt_visual_keep)
    from .turns import install_turn_boundaries

    install_turn_boundaries()
    patch(online_renderer.OnlineRenderer, "preprocess_chat", _route_online)
    patch(online_renderer.OnlineRenderer, "preprocess_cmpl", _route_online)
    from vllm.entrypoints.scale_out.token_in_token_out.serving import ServingTokens

    from .token_in import check_token_in

    patch(ServingTokens, "serve_tokens", check_token_in)
    patch(OfflineInferenceMixin, "_add_completion_requests",
          lambda f: _route_offline(f, "prompts", offline.prompt_to_seq))
    patch(OfflineInferenceMixin, "_add_chat_requests",
          lambda f: _route_offline(f, "messages", offline.conversation_to_seq))
    install_anthropic_routing()
