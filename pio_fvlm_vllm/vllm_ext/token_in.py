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
    keys: list[int] = []
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
        if ctx.handoff_rows < -1 or rows > min(len(ctx.suffix_ids) - ctx.handoff_text_start, n - ctx.num_keep):
            return f"{where} hands off {ctx.handoff_rows} rows"
        # An image's first selection, or a later turn's delta of it (items after the images):
        # the text it saw is the prompt's around that image, up to the end of some turn.
        image = i if i < len(around) else next((j for j, (p, _) in enumerate(around) if p == ctx.prefix_ids), None)
        if (image is None or ctx.prefix_ids != around[image][0]
                or ctx.suffix_ids != around[image][1][: len(ctx.suffix_ids)]):
            return f"{where} does not match the prompt's text around the image"
        if i < len(around) and (ctx.served_before or ctx.handoff_text_start or ctx.text_position != -1):
            return f"{where} is an image's first selection but carries a later turn's fields"
        if i >= len(around) and not (ctx.served_before and set(ctx.served_before) <= set(keys)
                                     and 0 <= ctx.handoff_text_start <= len(ctx.suffix_ids)):
            return f"{where} is a later turn's delta of no earlier item of this request"
        hashes = (getattr(features, "mm_hashes", None) or {}).get("image", [])
        if i >= len(hashes) or ctx.image_key != image_key(hashes[i]):
            return f"{where} names another image than its multimodal hash"
        keys.append(ctx.image_key)
    return None


def without_vision_keys(features) -> None:
    """Zeroes the vision-cache key of every packed context a token-in request carries, in place.

    The key names the image's pixels, which cannot be checked against it here: a token-in item
    neither reads nor fills the worker's vision cache, so no request can plant another image's
    tower output under a key someone else's image has."""
    from dataclasses import replace

    from vllm.entrypoints.scale_out.token_in_token_out.mm_serde import decode_mm_kwargs_item, encode_mm_kwargs_item
    from vllm.multimodal.inputs import MultiModalFieldElem

    for part in (features.kwargs_data, features.mm_metadata):
        for encoded_items in (part or {}).values():
            for j, encoded in enumerate(encoded_items or []):
                if encoded is None:
                    continue
                item = decode_mm_kwargs_item(encoded)
                elem = item.get(CONTEXT_FIELD)
                if elem is None or PromptContext.unpack(elem.data).vision_key == 0:
                    continue
                ctx = replace(PromptContext.unpack(elem.data), vision_key=0)
                item[CONTEXT_FIELD] = MultiModalFieldElem(data=ctx.pack(), field=elem.field)
                encoded_items[j] = encode_mm_kwargs_item(item)


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
                without_vision_keys(features)
        return await serve_tokens(self, request, *args, **kwargs)

    wrapper.__pio_fvlm__ = True
    return wrapper
