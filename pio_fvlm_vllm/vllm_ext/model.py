"""PIO-FVLM selection in the multimodal embedding step, for any family in `families/`.

`PioFvlmModel` goes before a vLLM multimodal model class whose language model is a
Llama-family `LlamaForCausalLM`-style module (`.language_model.model.layers`). The vision
tower and projector run as in stock vLLM and give N embeddings per image; for an
image whose request asked for fewer, the selection pass (proxy forward through the first K
decoder layers, layer-local gradient saliency, NMS) keeps exactly the number of placeholders
the processor emitted, in their original order. Every decoder layer then prefills and caches
only those tokens, at the positions they have in the unpruned prompt (vLLM's M-RoPE pruning
hook, see `engine_config.py`), and after decoder layer h (K by default, the paper's pruning
point) the first image's kept tokens and the text after it continue from the states the
unpruned prompt gives them there (`handoff.py`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.multimodal.utils import copy_mm_embedding_modality

from ..algorithm import (HandoffInput, ImageContext, ProxyWeights, Selection, seeded_random, select,
                         select_on_every_rank, uniform_stride_among)
from ..settings import PioFvlmSettings
from .context import CONTEXT_FIELD, PromptContext
from .engine_config import missing_engine_config
from .families import model_prunes
from .handoff import HandoffBuffers
from .kept_indices import KEPT_STORE
from .positions_hook import PositionsHook
from .served import ProxyCache, ServedSets, VisionCache
from .stats import SELECTION_STATS
from .weights import attach_proxy_snapshot

logger = init_logger("vllm.pio_fvlm")


def _as_list(batched: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return list(batched.unbind(0)) if isinstance(batched, torch.Tensor) else list(batched)


class PioFvlmModel:
    """The plugin's side of a pruned model: proxy weights, selection, positions, hand-off.

    A family subclasses `(PioFvlmModel, <vLLM model>, SupportsMRoPE, SupportsMultiModalPruning)`;
    `super()` below is the vLLM model.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pio_handoff: HandoffBuffers | None = None
        self.pio_enabled = model_prunes(vllm_config.model_config)
        if not self.pio_enabled:
            return  # a checkpoint of this architecture that the family leaves to stock vLLM
        text_config = self.config.text_config
        self.pio_settings = PioFvlmSettings.from_env()
        if self.pio_settings.mode != "encoder_free":
            raise ValueError(
                "PIO_FVLM_MODE=encoder_involved is available in the Hugging Face reference path "
                "(pio_fvlm_vllm.reference) only; the vLLM plugin runs mode encoder_free"
            )
        missing = missing_engine_config(vllm_config)
        if missing:
            raise ValueError(
                "PIO-FVLM keeps pruned tokens at their original positions through vLLM's M-RoPE "
                f"pruning hook, which this engine configuration leaves off; add {' and '.join(missing)}"
            )
        self.pio_proxy_layers = self.pio_settings.proxy_layer_for(text_config.num_hidden_layers)
        self.pio_handoff_layer = self.pio_settings.handoff_layer_for(text_config.num_hidden_layers)
        self.pio_tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.pio_model_name = vllm_config.model_config.served_model_name  # vLLM's own metrics label
        self.pio_proxy: ProxyWeights | None = None
        self.pio_served = ServedSets(self.pio_settings.served_sets)
        self.pio_vision = VisionCache(self.pio_settings.vision_cache_mb << 20)
        self.pio_proxy_cache = ProxyCache(self.pio_settings.proxy_cache_mb << 20)
        attach_proxy_snapshot(self, self.snapshot_proxy_weights)
        if self.pio_handoff_layer:
            scheduler = vllm_config.scheduler_config
            self.pio_handoff = HandoffBuffers(
                scheduler.max_num_batched_tokens + scheduler.max_num_seqs,
                text_config.hidden_size, vllm_config.model_config.dtype,
            )
            layer = self.language_model.model.layers[self.pio_handoff_layer - 1]
            layer.register_forward_hook(self.pio_handoff.after_layer)
        self.pio_positions = self._positions_hook(text_config)
        if self.pio_positions.decode_runs_ahead:
            self._extend_rotary_table(text_config.max_position_embeddings + vllm_config.model_config.max_model_len)

    def _positions_hook(self, text_config):
        """The family's positions scheme (default: plain rotary behind emulated M-RoPE rows)."""
        return PositionsHook(text_config.hidden_size)

    def _embedding_width(self, text_config) -> int:
        """Columns of one image token's embedding as the language model merges it."""
        return text_config.hidden_size

    def _extend_rotary_table(self, num_positions: int) -> None:
        """Decode positions run Σ(N - k) ahead of the served length, past max_model_len: give
        the rotary table those rows (the existing rows stay bit-identical, checked)."""
        seen: set[int] = set()
        for layer in self.language_model.model.layers:
            rope = getattr(getattr(layer, "self_attn", None), "rotary_emb", None)
            cache = getattr(rope, "cos_sin_cache", None)
            if cache is None or id(rope) in seen or cache.shape[0] >= num_positions:
                continue
            seen.add(id(rope))
            before = rope.max_position_embeddings
            rope.max_position_embeddings = num_positions
            longer = rope._compute_cos_sin_cache().to(cache.device, cache.dtype)
            if torch.equal(longer[: cache.shape[0]], cache):
                rope.cos_sin_cache = longer
            else:
                rope.max_position_embeddings = before
                logger.warning("PIO-FVLM: rotary table of %s not extended; decode positions past %d "
                               "are not supported", type(rope).__name__, cache.shape[0])

    # -- positions (vLLM's M-RoPE pruning hook, see positions_hook.py) ---------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        return self.pio_positions.initial(input_tokens, mm_features)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.Tensor, num_computed_tokens: int):
        return self.pio_positions.recompute(multimodal_embeddings, mrope_positions)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *,
                        is_multimodal: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        # Hand-off rows end in their layer-h states (see handoff.py): load them at the rows'
        # indices in this step's batch, which the multimodal mask gives, then merge as stock.
        if self.pio_handoff is not None and multimodal_embeddings is not None and is_multimodal is not None:
            stripped = self.pio_handoff.load(multimodal_embeddings, is_multimodal,
                                             self._embedding_width(self.config.text_config))
            if stripped is not multimodal_embeddings:
                multimodal_embeddings = [copy_mm_embedding_modality(src, dst)
                                         for src, dst in zip(multimodal_embeddings, stripped)]
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids, positions: torch.Tensor, intermediate_tensors=None, inputs_embeds=None,
                **kwargs):
        if self.pio_enabled:
            positions = self.pio_positions.language_model_positions(positions)
        try:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds,
                                   **kwargs)
        finally:
            if self.pio_handoff is not None:
                self.pio_handoff.clear()

    def snapshot_proxy_weights(self) -> None:
        from .proxy_weights import snapshot_proxy_weights

        tp_group = None
        if self.pio_tp_size > 1:
            from vllm.distributed import get_tp_group

            tp_group = get_tp_group().device_group
        # Accelerator parameters stay in place: views are enough there.
        copy = next(self.language_model.parameters()).device.type == "cpu"
        # Outputs of the weights before, if these are reloaded ones.
        self.pio_vision.clear()
        self.pio_proxy_cache.clear()
        self.pio_proxy = snapshot_proxy_weights(
            self.language_model, self.config.text_config, self.pio_proxy_layers, copy=copy,
            tp_group=tp_group,
        )
        logger.info(
            "PIO-FVLM proxy ready: decoder layers 1..%d (%s, tensor parallel %d), settings %s",
            self.pio_proxy_layers, "copied" if copy else "shared", self.pio_tp_size,
            self.pio_settings.model_dump(),
        )

    def embed_multimodal(self, **kwargs: object):
        packed = kwargs.pop(CONTEXT_FIELD, None)
        grids = self._image_grids(kwargs)
        contexts = [PromptContext.unpack(p) for p in _as_list(packed)] if packed is not None else None
        embeddings = self._vision_outputs(kwargs, contexts)
        if contexts is None or len(embeddings) == 0:
            return embeddings
        if len(contexts) != len(embeddings):
            raise RuntimeError(f"{len(contexts)} PIO-FVLM contexts for {len(embeddings)} images")
        return self._select(list(embeddings), contexts, grids or [None] * len(contexts))

    def _vision_outputs(self, kwargs: dict, contexts: list[PromptContext] | None):
        """The vision tower's outputs, from the vision cache when it holds every image of the
        batch (a later turn's delta, another question about a recent image)."""
        cacheable = self.pio_enabled and contexts is not None and all(c.pruned for c in contexts)
        if cacheable:
            device = next(self.language_model.parameters()).device
            cached = self.pio_vision.get_all([c.vision_key for c in contexts], device)
            if cached is not None:
                return cached
        embeddings = super().embed_multimodal(**kwargs)
        if cacheable and len(embeddings) == len(contexts):
            for ctx, output in zip(contexts, embeddings):
                self.pio_vision.put(ctx.vision_key, output)
        return embeddings

    def _image_grids(self, kwargs: dict) -> list[tuple[int, int, int]] | None:
        """Each image's (t, h, w) token grid, for families with multimodal rotary positions."""
        return None

    def _select(self, embeddings: list[torch.Tensor], contexts: list[PromptContext],
                grids: list[tuple[int, int, int] | None]) -> list[torch.Tensor]:
        for i, c in enumerate(contexts):
            n = embeddings[i].shape[0]
            if c.pruned and not (0 < c.num_keep <= n and c.num_tokens == n):
                raise RuntimeError(f"image {i}: {c.num_keep} placeholders for {n} image tokens "
                                   f"(the processor counted {c.num_tokens})")
        todo = [i for i, c in enumerate(contexts) if c.pruned and c.num_keep < embeddings[i].shape[0]]
        # A delta selects among what earlier items of its image left: they go first (a first
        # selection, then each later turn's delta in turn order).
        for depth in sorted({len(contexts[i].served_before) for i in todo}):
            self._select_some([i for i in todo if len(contexts[i].served_before) == depth], embeddings, contexts,
                              grids)
        return embeddings

    def _select_some(self, todo: list[int], embeddings: list[torch.Tensor], contexts: list[PromptContext],
                     grids: list[tuple[int, int, int] | None]) -> None:
        start = time.perf_counter()
        exclude = []
        for i in todo:
            ctx = contexts[i]
            served = self.pio_served.union(ctx.served_before) if ctx.is_delta else None
            if ctx.is_delta and served is None:
                logger.warning("PIO-FVLM: a later turn's image tokens were selected without the set its earlier "
                               "turns served (forgotten: raise PIO_FVLM_SERVED_SETS); some may repeat")
            if served is not None and served.numel() + ctx.num_keep > ctx.num_tokens:
                served = None
            exclude.append(served)
        pasts = [self._proxy_past(contexts[i], embeddings[i]) for i in todo]
        selection, failed = self._kept_indices([embeddings[i] for i in todo], [contexts[i] for i in todo],
                                               [grids[i] for i in todo], exclude, pasts)
        for j, i in enumerate(todo):
            past = selection.pasts[j] if selection.pasts is not None else None
            if past is not None:
                self.pio_proxy_cache.put(contexts[i].image_key, contexts[i].prefix_ids, contexts[i].suffix_ids, past)
        seen = [embeddings[i].shape[0] for i in todo]
        for j, i in enumerate(todo):
            ctx = contexts[i]
            kept = self.pio_served.get(ctx.image_key)
            if kept is None or kept.numel() != ctx.num_keep:
                # First time: this set is what the item's cached rows hold from now on.
                kept = selection.kept[j]
                self.pio_served.put(ctx.image_key, kept)
            kept = kept.to(embeddings[i].device)
            KEPT_STORE.put(ctx.image_key, kept, ctx.num_tokens)
            embeds = embeddings[i][kept]
            if ctx.handoff_rows > 0:
                first = ctx.handoff_text_start
                text = self._embed_text(ctx.suffix_ids[first: first + ctx.handoff_rows], embeds.device)
                # Text rows in an image's placeholder: nothing where an image row has more
                # columns than the text embedding (Qwen3-VL's deepstack levels).
                embeds = torch.cat([embeds, F.pad(text.to(embeds.dtype), (0, embeds.shape[-1] - text.shape[-1]))])
            states = self._handoff_states(ctx, kept, selection.handoff_inputs[j])
            embeddings[i] = self.pio_positions.rows(embeds, kept, ctx, states, grids[i])
        SELECTION_STATS.record(self.pio_model_name, seen, [contexts[i].num_keep for i in todo],
                               time.perf_counter() - start, failed)

    def _handoff_states(self, ctx: PromptContext, kept: torch.Tensor, handoff: HandoffInput | None
                        ) -> torch.Tensor | None:
        """(k + R, D) the hand-off layer's output at the item's served rows (its kept image tokens,
        then its R text rows) in the unpruned prompt, or None without a hand-off."""
        if not ctx.handoff or handoff is None:
            return None
        start = len(ctx.prefix_ids)
        text = start + ctx.num_tokens + ctx.handoff_text_start + torch.arange(max(ctx.handoff_rows, 0),
                                                                               device=kept.device)
        return handoff.output_at(self.pio_proxy, torch.cat([start + kept, text]))

    def _proxy_past(self, ctx: PromptContext, image: torch.Tensor):
        """The proxy past a delta's pass continues: the previous item of its image, whose
        sequence is this one's first rows (same image, same text up to that item's turn)."""
        if not (ctx.is_delta and self.pio_proxy_cache.enabled and self.pio_tp_size == 1):
            return None
        return self.pio_proxy_cache.continuable(ctx.served_before[-1], ctx.prefix_ids, ctx.suffix_ids,
                                                image.shape[0], image.device)

    def _kept_indices(self, images: list[torch.Tensor], contexts: list[PromptContext],
                      grids: list[tuple[int, int, int] | None],
                      exclude: list[torch.Tensor | None], pasts: list | None = None) -> tuple[Selection, bool]:
        """Kept indices (and hand-off states) per image, and whether any image's selection failed.

        A failure must not cost the other requests of the batch: the batch is retried one
        image at a time, and only an image whose own selection fails falls back to uniform
        stride (it still gets exactly its budget, without hand-off states).
        """
        budgets = [c.num_keep for c in contexts]
        pasts = pasts or [None] * len(contexts)

        def stride() -> Selection:
            return Selection([uniform_stride_among(img.shape[0], k, e, img.device)
                              for img, k, e in zip(images, budgets, exclude)], [None] * len(images))

        if self.pio_settings.selector != "pio_fvlm":
            return Selection([self._baseline_kept(img.shape[0], c, e, img.device)
                              for img, c, e in zip(images, contexts, exclude)], [None] * len(images)), False
        if self.pio_proxy is None:  # weights were never loaded through vLLM's loader
            return stride(), True
        device = images[0].device

        def prepare() -> list[ImageContext]:
            _raise_if_injected(contexts)
            return [self._image_context(img, c, g) for img, c, g in zip(images, contexts, grids)]

        if self.pio_proxy.tp_group is not None:
            # Every rank must serve the same tokens, and a rank failing alone must not leave the
            # others waiting in the proxy's all-reduce: the ranks agree, or all fall back.
            selection, failed = select_on_every_rank(
                self.pio_proxy, prepare, budgets, self.pio_settings, fallback=stride,
                handoff_layer=self._handoff_layer_for(contexts), device=device, exclude=exclude,
            )
            if failed:
                logger.error("PIO-FVLM selection failed on a tensor-parallel rank; every rank uses "
                             "uniform-stride selection for this batch")
            return selection, failed
        image_contexts = [self._image_context(img, c, g) for img, c, g in zip(images, contexts, grids)]
        try:
            return self._run_selection(image_contexts, budgets, contexts, exclude, pasts), False
        except Exception:
            if len(images) == 1:
                logger.exception("PIO-FVLM selection failed; using uniform-stride selection")
                return stride(), True
            logger.warning("PIO-FVLM batched selection failed; retrying image by image")
        kept, states, failed = [], [], False
        for ctx, k, c, e, past in zip(image_contexts, budgets, contexts, exclude, pasts):
            try:
                one = self._run_selection([ctx], [k], [c], [e], [past])
                kept += one.kept
                states += one.handoff_inputs
            except Exception:
                logger.exception("PIO-FVLM selection failed for one image; using uniform-stride selection")
                kept.append(uniform_stride_among(ctx.num_image_tokens, k, e, device))
                states.append(None)
                failed = True
        return Selection(kept, states), failed

    def _baseline_kept(self, num_tokens: int, ctx: PromptContext, exclude: torch.Tensor | None,
                       device: torch.device) -> torch.Tensor:
        if self.pio_settings.selector == "uniform":
            return uniform_stride_among(num_tokens, ctx.num_keep, exclude, device)
        # Seeded by the request's text, so a re-encoded image keeps the same tokens.
        seed = hash((num_tokens, ctx.num_keep, *ctx.prefix_ids, *ctx.suffix_ids)) & 0x7FFFFFFF
        if exclude is None:
            return seeded_random(num_tokens, ctx.num_keep, seed, device)
        allowed = torch.ones(num_tokens, dtype=torch.bool)
        allowed[exclude.cpu()] = False
        free = allowed.nonzero().flatten()
        return free[seeded_random(free.numel(), ctx.num_keep, seed)].to(device)

    def _run_selection(self, image_contexts: list[ImageContext], budgets: list[int],
                       contexts: list[PromptContext], exclude: list[torch.Tensor | None],
                       pasts: list | None = None) -> Selection:
        _raise_if_injected(contexts)
        keep_past = self.pio_proxy_cache.enabled and self.pio_settings.saliency == "grad_x_normed"
        return select(self.pio_proxy, image_contexts, budgets, self.pio_settings,
                      handoff_layer=self._handoff_layer_for(contexts), exclude=exclude, pasts=pasts,
                      keep_past=keep_past)

    def _handoff_layer_for(self, contexts: list[PromptContext]) -> int:
        return self.pio_handoff_layer if any(c.handoff for c in contexts) else 0

    def _image_context(self, image: torch.Tensor, ctx: PromptContext,
                       grid: tuple[int, int, int] | None = None) -> ImageContext:
        return ImageContext(image_embeds=image, prefix_embeds=self._embed_text(ctx.prefix_ids, image.device),
                            suffix_embeds=self._embed_text(ctx.suffix_ids, image.device), grid=grid)

    def _embed_text(self, ids: list[int], device: torch.device) -> torch.Tensor:
        tokens = torch.tensor(ids, dtype=torch.long, device=device)
        return self.embed_input_ids(tokens)


# Testing aid: selection raises for images whose following text contains this token-id
# sequence, so fault handling can be exercised against a real server.
_FAIL_ON_TOKENS = [int(t) for t in os.environ.get("PIO_FVLM_TEST_FAIL_ON_TOKENS", "").split(",") if t.strip()]


def _raise_if_injected(contexts: list[PromptContext]) -> None:
    if _FAIL_ON_TOKENS and any(_contains(c.suffix_ids, _FAIL_ON_TOKENS) for c in contexts):
        raise RuntimeError("injected selection failure (PIO_FVLM_TEST_FAIL_ON_TOKENS)")


def _contains(ids: list[int], pattern: list[int]) -> bool:
    n = len(pattern)
    return any(ids[i:i + n] == pattern for i in range(len(ids) - n + 1))
