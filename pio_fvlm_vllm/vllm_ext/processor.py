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
from dataclasses import replace

from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem, PlaceholderRange
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
from vllm.multimodal.processing.processor import PromptReplacement, PromptUpdate

from ..budget import VISUAL_KEEP_FIELD, budget, validate_visual_keep
from ..positions import handoff_rows
from ..settings import PioFvlmSettings
from .context import CONTEXT_FIELD, KEEP_ALL, NO_HANDOFF, PromptContext, image_contexts
from .kept_indices import image_key
from .observability import IMAGE_TOTALS

# Processor kwargs private to the plugin. They take part in the multimodal hash (so the
# encoder cache, the processor cache and prefix caching tell questions apart) and are
# removed before the Hugging Face processor is called.
_PRIVATE_PREFIX = "_pio_fvlm"
_KEEP_KWARG = "_pio_fvlm_keep"
_PROMPT_KWARG = "_pio_fvlm_prompt"
_PRIVATE_KWARGS = (_KEEP_KWARG, _PROMPT_KWARG)

_CONTEXT_FIELD_TYPE = MultiModalBatchedField(keep_on_cpu=True)


def server_default_keep(model_config, settings: PioFvlmSettings) -> float:
    """The keep ratio of requests that do not name one (see `PioFvlmSettings.server_default_keep`)."""
    mm_config = getattr(model_config, "multimodal_config", None)
    return settings.server_default_keep(getattr(mm_config, "mm_processor_kwargs", None))


def _prompt_digest(prompt_ids: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, prompt_ids)).encode()).hexdigest()


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

    def apply(self, inputs, timing_ctx):
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        private = sorted(k for k in kwargs if isinstance(k, str) and k.startswith(_PRIVATE_PREFIX))
        if private:
            # They would let one request plant its embeddings under another request's hash.
            raise ValueError(f"mm_processor_kwargs.{private[0]} is internal to the pio_fvlm plugin and "
                             f"cannot be sent")
        keep = self._request_keep(kwargs)
        prune = keep < 1.0 and len(inputs.mm_data_items.get("image", ())) > 0
        if prune:
            # Before the Hugging Face processor runs: its cost grows with the images sent.
            self._check_unpruned_length(sum(
                self._stock_num_tokens(inputs.mm_data_items, i) for i in range(len(inputs.mm_data_items["image"]))))
            kwargs[_KEEP_KWARG] = keep
            kwargs[_PROMPT_KWARG] = _prompt_digest(inputs.prompt)
        result = super().apply(replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)
        self._attach_contexts(result, inputs, prune)
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

    def _original_offsets(self, mm_items, placeholders: list, counts: list[int]) -> list[int]:
        """Where each image's first token sits in the unpruned prompt (its position there)."""
        offsets, dropped = [], 0
        for placeholder, n in zip(placeholders, counts):
            offsets.append(placeholder.offset + dropped)
            dropped += n - placeholder.length
        return offsets

    def _attach_contexts(self, result, inputs, prune: bool) -> None:
        items = result["mm_kwargs"].get("image", [])
        if not items:
            return
        around = image_contexts(list(inputs.prompt), self.image_token_id()) if prune else None
        placeholders = list(result["mm_placeholders"]["image"])
        hashes = result["mm_hashes"]["image"]
        served_len = len(result["prompt_token_ids"])
        served_counts = [p.length for p in placeholders]
        counts = [self._stock_num_tokens(inputs.mm_data_items, i) if prune else p.length
                  for i, p in enumerate(placeholders)]
        originals = self._original_offsets(inputs.mm_data_items, placeholders, counts)
        for i, (item, placeholder, n) in enumerate(zip(items, placeholders, counts)):
            k = placeholder.length
            rows = NO_HANDOFF
            if prune and i == 0 and k < n and self._handoff_enabled():
                # Only the first image: its proxy context is exactly the unpruned prompt up to
                # the next image, so its states there are the full-sequence ones.
                text_end = placeholders[1].offset if len(placeholders) > 1 else served_len
                rows = handoff_rows(text_end - (placeholder.offset + k), n, k)
                if rows:
                    placeholders[0] = PlaceholderRange(offset=placeholder.offset, length=k + rows)
            if prune:
                IMAGE_TOTALS.put(hashes[i], k, n)
            ctx = (PromptContext(k, n, placeholder.offset, originals[i], rows, *around[i],
                                 image_key=image_key(hashes[i]))
                   if prune else PromptContext(KEEP_ALL, n, placeholder.offset, originals[i], NO_HANDOFF, [], []))
            if item is not None:  # None: the engine already holds this item, context included
                item[CONTEXT_FIELD] = MultiModalFieldElem(data=ctx.pack(), field=_CONTEXT_FIELD_TYPE)
        result["mm_placeholders"]["image"] = placeholders
        self._check_unpruned_length(served_len + sum(n - k for n, k in zip(counts, served_counts)))

    def _check_unpruned_length(self, unpruned_len: int) -> None:
        """Kept tokens keep their unpruned positions, so the unpruned prompt must fit the
        model's positions as it would without pruning (the same bound stock vLLM applies)."""
        max_len = self.info.ctx.model_config.max_model_len
        if unpruned_len > max_len:
            raise ValueError(
                f"visual_keep: this prompt is at least {unpruned_len} tokens before pruning, more than the "
                f"model's maximum context length of {max_len}; pruned tokens keep their original "
                f"positions, so the unpruned prompt must fit. Send fewer or smaller images."
            )

    def _get_mm_hashes(self, inputs):
        hashes = super()._get_mm_hashes(inputs)
        if _PROMPT_KWARG not in inputs.hf_processor_mm_kwargs:
            return hashes
        # The same image twice in one prompt is selected against different text around it.
        return {
            modality: [hashlib.sha256(f"{h}#{i}".encode()).hexdigest() for i, h in enumerate(hs)]
            for modality, hs in hashes.items()
        }

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
