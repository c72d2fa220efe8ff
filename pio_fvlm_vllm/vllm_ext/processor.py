"""The multimodal processor side of pruning: budget(N, visual_keep) placeholders per image.

`PioFvlmProcessor` goes before a family's vLLM multimodal processor (see `families/`).

A pruned prompt's first image also claims the text after it (its placeholder range covers it),
so that text's rows travel with the image's encoder output and take over the proxy's states
(see `handoff.py`). A prompt whose unpruned length exceeds the context length is refused.

The request's keep ratio arrives as the processor kwarg `visual_keep` (routed there from the
OpenAI body, `vllm_xargs` or `SamplingParams.extra_args`, see `requests.py`), or from the
server default: `--mm-processor-kwargs '{"visual_keep": ...}'`, else `PIO_FVLM_VISUAL_KEEP`.
Fewer placeholder tokens is what shrinks the request's KV-cache allocation: the scheduler
sizes a request from its prompt length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from vllm.exceptions import VLLMValidationError
from vllm.multimodal.inputs import (MultiModalBatchedField, MultiModalFieldElem, MultiModalKwargsItem,
                                    MultiModalKwargsItems, PlaceholderRange)
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
from vllm.multimodal.processing.processor import PromptReplacement, PromptUpdate

from ..budget import (VISUAL_KEEP_FIELD, VISUAL_TURNS_FIELD, budget, delta_budget, validate_visual_keep,
                      validate_visual_turns)
from ..positions import handoff_rows
from ..settings import PioFvlmSettings
from .context import CONTEXT_FIELD, KEEP_ALL, NO_HANDOFF, PromptContext, image_contexts
from .kept_indices import image_key
from .observability import IMAGE_TOTALS
from .turns import CHAT_TURNS, Delta, TextIndex, TurnPlan, image_starts, plan_turns, token_digest

# Processor kwargs private to the plugin. They are removed before the Hugging Face processor
# is called; the keep ratio takes part in the stock multimodal hash, and each image's hash then
# mixes in the prompt up to its cut (`_get_mm_hashes`), so the encoder cache, the processor cache
# and prefix caching tell questions apart.
_PRIVATE_PREFIX = "_pio_fvlm"
_KEEP_KWARG = "_pio_fvlm_keep"
_CUTS_KWARG = "_pio_fvlm_cuts"
_VISION_KWARG = "_pio_fvlm_vision"  # the stock hashes, computed once per request
_PRIVATE_KWARGS = (_KEEP_KWARG, _CUTS_KWARG, _VISION_KWARG)

_CONTEXT_FIELD_TYPE = MultiModalBatchedField(keep_on_cpu=True)


def server_default_keep(model_config, settings: PioFvlmSettings) -> float:
    """The keep ratio of requests that do not name one (see `PioFvlmSettings.server_default_keep`)."""
    mm_config = getattr(model_config, "multimodal_config", None)
    return settings.server_default_keep(getattr(mm_config, "mm_processor_kwargs", None))


@dataclass
class _Item:
    """One pruned item of the served prompt: an image's first selection, or a later turn's delta."""

    image: int
    offset: int  # first placeholder, in the served prompt
    num_keep: int  # k, or a delta's d
    num_tokens: int  # N
    cut: int  # where the prompt its selection sees ends (index in the prompt before expansion)
    mm_hash: str
    delta: Delta | None = None
    rows: int = NO_HANDOFF
    index: int = -1  # in the result's per-modality lists


class PioFvlmProcessor:
    """Mixin for a vLLM `BaseMultiModalProcessor` of a family whose image placeholder is a run
    of `image_token_index` tokens; `super()` below is that processor."""

    _settings: PioFvlmSettings | None = None

    def item_num_tokens(self, item) -> int:
        """An already processed image's unpruned token count, from its multimodal kwargs item
        (token-in requests carry items, not images)."""
        raise NotImplementedError

    def server_settings(self) -> PioFvlmSettings:
        """The `PIO_FVLM_*` settings, read once per processor (one per engine)."""
        if self._settings is None:
            self._settings = PioFvlmSettings.from_env()
        return self._settings

    def get_dummy_inputs(self, *args, **kwargs):
        # Profiling sizes the encoder cache and memory for the largest image: unpruned,
        # whatever the server default, so that keep 1.0 always fits.
        inputs = super().get_dummy_inputs(*args, **kwargs)
        return replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, VISUAL_KEEP_FIELD: 1.0})

    def _request_keep(self, kwargs: dict[str, object]) -> float:
        raw = kwargs.pop(VISUAL_KEEP_FIELD, None)
        if raw is None:
            return server_default_keep(self.info.ctx.model_config, self.server_settings())
        return validate_visual_keep(raw)

    def _request_turns(self, kwargs: dict[str, object]) -> str:
        raw = kwargs.pop(VISUAL_TURNS_FIELD, None)
        return self.server_settings().visual_turns if raw is None else validate_visual_turns(raw)

    def apply(self, inputs, timing_ctx):
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        private = sorted(k for k in kwargs if isinstance(k, str) and k.startswith(_PRIVATE_PREFIX))
        if private:
            # They would let one request plant its embeddings under another request's hash.
            raise ValueError(f"mm_processor_kwargs.{private[0]} is internal to the pio_fvlm plugin and "
                             f"cannot be sent")
        keep = self._request_keep(kwargs)
        mode = self._request_turns(kwargs)
        prune = keep < 1.0 and len(inputs.mm_data_items.get("image", ())) > 0
        plan = None
        if prune:
            # Before the Hugging Face processor runs: its cost grows with the images sent.
            self._check_unpruned_length(sum(
                self._stock_num_tokens(inputs.mm_data_items, i) for i in range(len(inputs.mm_data_items["image"]))))
            prompt = list(inputs.prompt)
            starts = image_starts(prompt, self.image_token_id())
            plan = plan_turns(len(prompt), starts, CHAT_TURNS.get(prompt), mode)
            if len(starts) != len(inputs.mm_data_items["image"]):
                plan = plan_turns(len(prompt), [len(prompt)] * len(inputs.mm_data_items["image"]), None, mode)
            # Hashable, as every processor kwarg must be (some families cache on them).
            kwargs[_VISION_KWARG] = tuple((m, tuple(hs)) for m, hs in
                                          self._vision_hashes(replace(inputs, hf_processor_mm_kwargs=kwargs)).items())
            kwargs[_KEEP_KWARG] = keep
            kwargs[_CUTS_KWARG] = plan.cuts
        inputs = replace(inputs, hf_processor_mm_kwargs=kwargs)
        result = super().apply(inputs, timing_ctx)
        if prune:
            self._attach_pruned(result, inputs, plan)
        else:
            self._attach_whole(result, inputs)
        return result

    def _stock_num_tokens(self, mm_items, item_idx: int) -> int:
        """Unpruned token count of an image, as the stock processor computes it."""
        images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
        if isinstance(images, ImageEmbeddingItems):
            return images.get_feature_size(item_idx)
        size = images.get_image_size(item_idx)
        return self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)

    def _budget_reference(self) -> int | None:
        """The paper's absolute budget base: the model's largest image token count."""
        if self.server_settings().budget != "paper":
            return None
        return self.info.get_max_image_tokens()

    def _handoff_enabled(self) -> bool:
        depth = self.info.get_hf_config().text_config.num_hidden_layers
        return self.server_settings().handoff_layer_for(depth) > 0

    def image_token_id(self) -> int:
        """The token an image's placeholder run is made of (also read by the token-in check)."""
        return self.info.get_hf_config().image_token_index

    def _image_bases(self, mm_items, items: list[_Item]) -> list[int]:
        """Each item's image's first position in the unpruned prompt (items in served order).

        Every image dropped N - k of its tokens before it, and every delta took d positions
        its image already has."""
        bases, shift, first = [], 0, {}
        for item in items:
            if item.delta is None:
                first[item.image] = item.offset + shift
                shift += item.num_tokens - item.num_keep
            else:
                shift -= item.num_keep
            bases.append(first[item.image])
        return bases

    def _text_positions(self, mm_items, items: list[_Item]) -> list[int]:
        """Position, in the unpruned prompt, of the text right after each item's kept rows."""
        positions, shift = [], 0
        for item in items:
            shift += item.num_tokens - item.num_keep if item.delta is None else -item.num_keep
            positions.append(item.offset + item.num_keep + shift)
        return positions

    def _attach_whole(self, result, inputs) -> None:
        """Unpruned images carry a context too: the model tells them from pruned ones by it."""
        items = result["mm_kwargs"].get("image", [])
        placeholders = list(result["mm_placeholders"].get("image", []))
        for item, placeholder in zip(items, placeholders):
            ctx = PromptContext(KEEP_ALL, placeholder.length, placeholder.offset, placeholder.offset, NO_HANDOFF,
                                [], [])
            if item is not None:  # None: the engine already holds this item, context included
                item[CONTEXT_FIELD] = MultiModalFieldElem(data=ctx.pack(), field=_CONTEXT_FIELD_TYPE)

    def _attach_pruned(self, result, inputs, plan: TurnPlan) -> None:
        """Adds the plan's deltas to the served prompt, then packs every item's context."""
        prompt = list(inputs.prompt)
        image_id = self.image_token_id()
        placeholders = list(result["mm_placeholders"]["image"])
        hashes = result["mm_hashes"]["image"]
        kwargs_items = result["mm_kwargs"]["image"]
        counts = [self._stock_num_tokens(inputs.mm_data_items, i) for i in range(len(placeholders))]
        items = [_Item(i, p.offset, p.length, counts[i], plan.cuts[i], hashes[i], index=i)
                 for i, p in enumerate(placeholders)]
        text = TextIndex(prompt, image_id)
        served = self._add_deltas(result, inputs, plan, items, text)
        items.sort(key=lambda it: it.offset)
        served_len = len(served)
        served_text = TextIndex(served, image_id)
        # Only the first image hands off: its proxy context is exactly the unpruned prompt up to
        # the next image, so its states there are the full-sequence ones. A delta's context runs
        # to its own turn, past any later image: it hands off only in a one-image prompt.
        handoff = self._handoff_enabled()
        for n, item in enumerate(items):
            if not (handoff and item.image == 0 and item.num_keep < item.num_tokens):
                continue
            if item.delta is not None and len(placeholders) > 1:
                continue
            text_end = min(served_text.index_after(text.count(item.cut)),
                           items[n + 1].offset if n + 1 < len(items) else served_len)
            item.rows = handoff_rows(text_end - (item.offset + item.num_keep), item.num_tokens, item.num_keep)
        bases = self._image_bases(inputs.mm_data_items, items)
        text_positions = self._text_positions(inputs.mm_data_items, items)
        around = image_contexts(prompt, image_id)
        vision = [image_key(h) for h in dict(inputs.hf_processor_mm_kwargs[_VISION_KWARG]).get("image", ())]
        keys: dict[int, list[int]] = {}
        for item, base, text_position in zip(items, bases, text_positions):
            prefix, suffix = around[item.image]
            suffix = suffix[: text.count(item.cut) - len(prefix)]
            key = image_key(item.mm_hash)
            before = tuple(keys.get(item.image, ())) if item.delta is not None else ()
            keys.setdefault(item.image, []).append(key)
            ctx = PromptContext(
                item.num_keep, item.num_tokens, item.offset, base, item.rows, prefix, suffix, image_key=key,
                handoff_text_start=(text.count(item.delta.insert) - len(prefix)
                                    if item.delta is not None else 0),
                text_position=text_position if item.delta is not None else -1,
                served_before=before, vision_key=vision[item.image],
            )
            IMAGE_TOTALS.put(item.mm_hash, item.num_keep, 0 if item.delta is not None else item.num_tokens)
            if item.rows > 0:
                result["mm_placeholders"]["image"][item.index] = PlaceholderRange(
                    offset=item.offset, length=item.num_keep + item.rows)
            if kwargs_items[item.index] is not None:  # None: the engine holds this item, context included
                kwargs_items[item.index][CONTEXT_FIELD] = MultiModalFieldElem(data=ctx.pack(), field=_CONTEXT_FIELD_TYPE)
        unpruned = served_len + sum(it.num_tokens - it.num_keep if it.delta is None else -it.num_keep
                                    for it in items)
        self._check_unpruned_length(unpruned)

    def _add_deltas(self, result, inputs, plan: TurnPlan, items: list[_Item], text: TextIndex) -> list[int]:
        """Splices each later turn's delta into the served prompt (image tokens just before that
        turn's user message) as an item of its own; returns the served prompt. `text` indexes
        the prompt before expansion."""
        served = list(result["prompt_token_ids"])
        if not plan.deltas:
            return served
        prompt = np.asarray(inputs.prompt, dtype=np.int64)
        image_id = self.image_token_id()
        served_text = TextIndex(served, image_id)
        share = self.server_settings().turn_delta_share
        given = [it.num_keep for it in items]
        inserts = []
        for delta in plan.deltas:
            base = items[delta.image]
            d = delta_budget(base.num_tokens, base.num_keep, share, given[delta.image])
            if d == 0:
                continue
            given[delta.image] += d
            digest = token_digest(prompt[: delta.cut])
            mm_hash = hashlib.sha256(f"{base.mm_hash}#turn{delta.turn}#{d}#{digest}".encode()).hexdigest()
            at = served_text.index_after(text.count(delta.insert))
            inserts.append((at, _Item(delta.image, at, d, base.num_tokens, delta.cut, mm_hash, delta)))
        inserts.sort(key=lambda x: x[0])  # stable: deltas at one place keep the plan's order
        for at, item in reversed(inserts):
            served[at:at] = [image_id] * item.num_keep
        for item in items:
            item.offset += sum(d.num_keep for at, d in inserts if at <= item.offset)
        shift = 0
        for at, item in inserts:
            item.offset, shift = at + shift, shift + item.num_keep
            item.index = len(result["mm_hashes"]["image"])
            result["mm_placeholders"]["image"].append(PlaceholderRange(offset=item.offset, length=item.num_keep))
            result["mm_hashes"]["image"].append(item.mm_hash)
            result["mm_kwargs"]["image"].append(self._delta_kwargs(inputs, result, item))
        placeholders = result["mm_placeholders"]["image"]
        for i in range(len(items)):
            placeholders[i] = PlaceholderRange(offset=items[i].offset, length=placeholders[i].length)
        result["prompt_token_ids"] = served
        items += [item for _, item in inserts]
        return served

    def _delta_kwargs(self, inputs, result, item: _Item):
        """A delta's multimodal kwargs: its image's pixels, sent once (the processor cache's
        protocol, so the engine's mirror of it stays in step)."""
        cache = inputs.cache
        if cache is not None and cache.is_cached_item(item.mm_hash):
            return cache.get_and_update_item(None, item.mm_hash)[0]
        base = result["mm_kwargs"]["image"][item.image]
        if base is not None:
            fresh = MultiModalKwargsItem({k: v for k, v in base.items() if k != CONTEXT_FIELD})
        else:
            public = {k: v for k, v in inputs.hf_processor_mm_kwargs.items() if k not in _PRIVATE_KWARGS}
            one = self.info.parse_mm_data({"image": [inputs.mm_data_items["image"][item.image]]}, validate=False)
            data = self._apply_hf_processor_main(one, public)
            fresh = MultiModalKwargsItems.from_hf_inputs(data, self._get_mm_fields_config(data, public))["image"][0]
        if cache is not None:
            fresh = cache.get_and_update_item((fresh, []), item.mm_hash)[0]
        return fresh

    def _check_unpruned_length(self, unpruned_len: int) -> None:
        """Kept tokens keep their unpruned positions, so the unpruned prompt must fit the
        model's positions as it would without pruning (the same bound stock vLLM applies)."""
        max_len = self.info.ctx.model_config.max_model_len
        if unpruned_len > max_len:
            raise VLLMValidationError(
                f"visual_keep: this prompt is at least {unpruned_len} tokens before pruning, more than the "
                f"model's maximum context length of {max_len}; pruned tokens keep their original "
                f"positions, so the unpruned prompt must fit. Send fewer or smaller images.",
                parameter=VISUAL_KEEP_FIELD,
            )

    def _get_mm_hashes(self, inputs):
        kwargs = inputs.hf_processor_mm_kwargs
        cuts = kwargs.get(_CUTS_KWARG)
        if cuts is None:
            return super()._get_mm_hashes(inputs)
        hashes = {m: list(hs) for m, hs in kwargs[_VISION_KWARG]}
        # An image's selection depends on the keep and on the prompt up to its cut; the same
        # image twice in one prompt is two selections. Every later turn of a chat rebuilds it.
        keep = kwargs[_KEEP_KWARG]
        prompt = np.asarray(inputs.prompt, dtype=np.int64)
        images = [hashlib.sha256(f"{h}#keep={keep}#{i}#{token_digest(prompt[:cut])}".encode()).hexdigest()
                  for i, (h, cut) in enumerate(zip(hashes.get("image", []), cuts))]
        return {**hashes, "image": images} if "image" in hashes else hashes

    def _vision_hashes(self, inputs):
        """Stock vLLM's hashes of the items: what the vision tower's output depends on."""
        public = {k: v for k, v in inputs.hf_processor_mm_kwargs.items() if k not in _PRIVATE_KWARGS}
        return super()._get_mm_hashes(replace(inputs, hf_processor_mm_kwargs=public))

    def _apply_hf_processor_main(self, mm_items, hf_kwargs, *args, **kwargs):
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k not in _PRIVATE_KWARGS}
        return super()._apply_hf_processor_main(mm_items, hf_kwargs, *args, **kwargs)

    def _get_prompt_updates(
        self,
        mm_items,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        keep = hf_processor_mm_kwargs.get(_KEEP_KWARG)
        if keep is None:
            return updates
        reference = self._budget_reference()
        pruned = []
        for update in updates:
            stock = update.replacement

            def replacement(item_idx: int, stock=stock) -> list[int]:
                tokens = stock(item_idx)
                return tokens[: budget(len(tokens), keep, reference)]

            pruned.append(PromptReplacement(modality=update.modality, target=update.target,
                                             replacement=replacement))
        return pruned
