"""Token-in requests (`--enable-scale-out`, `/inference/v1/generate`) carry the processed
multimodal kwargs a render tier produced, the plugin's packed per-image context included. The
worker trusts that context, so the front-end checks it against what the processor derives
from the same prompt and image before the request reaches the engine.
"""

from __future__ import annotations

import functools

from vllm.entrypoints.scale_out.token_in_token_out.mm_features import mm_kwargs_from_features
from vllm.exceptions import VLLMValidationError
from vllm.multimodal import MULTIMODAL_REGISTRY

from .context import CONTEXT_FIELD, PromptContext, image_contexts
from .families import model_prunes
from .kept_indices import image_key


def token_in_context_problem(token_ids: list[int], features, image_token_id: int, num_image_tokens) -> str | None:
    """What is wrong with the plugin contexts a token-in (`--enable-scale-out`) request
    carries, or None. Each must be exactly what the processor derives from the same prompt and
    image, so the worker can trust it: budget, image size, offset, placeholder length and the
    text around the image. `num_image_tokens(item)` is the image's unpruned token count."""
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
        hashes = (getattr(features, "mm_hashes", None) or {}).get("image", [])
        if i >= len(hashes) or ctx.image_key != image_key(hashes[i]):
            return f"{where} names another image than its multimodal hash"
    return None


def check_token_in(serve_tokens):
    @functools.wraps(serve_tokens)
    async def wrapper(self, request, *args, **kwargs):
        features = getattr(request, "features", None)
        if features is not None and (features.kwargs_data or features.mm_metadata):
            if model_prunes(self.model_config):
                processor = getattr(self, "_pio_fvlm_processor", None)
                if processor is None:
                    processor = self._pio_fvlm_processor = MULTIMODAL_REGISTRY.create_processor(self.model_config)
                problem = token_in_context_problem(request.token_ids, features,
                                                   processor.image_token_id(), processor.item_num_tokens)
                if problem is not None:
                    return self.create_error_response(VLLMValidationError(problem, parameter="features"))
        return await serve_tokens(self, request, *args, **kwargs)

    wrapper.__pio_fvlm__ = True
    return wrapper
