"""What the Qwen-VL families share: native multimodal rotary positions, N = t * h * w / merge^2.

The language model reads all three position rows (temporal, height, width), so kept image
tokens keep their (t, h, w) cell of the unpruned image and the text after an image keeps the
position the unpruned prompt gives it (`positions.mrope_layout`); the proxy runs the same
multimodal rotary; the hand-off text rows after a pruned image sit where the unpruned prompt
puts that text. vLLM's video pruning (EVS) shares the engine switch that turns the
positions hook on: the plugin keeps videos whole, and `visual_keep` below 1 with a video in
the request is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems

from ...positions import NUM_DIGITS, GridSpan, decode_digits, encode_digits, grid_cells, mrope_layout
from ..context import PromptContext
from ..positions_hook import apply_position_columns, feature_context
from ..processor import PioFvlmProcessor


def merged_grid(grid_thw: torch.Tensor, merge_size: int) -> tuple[int, int, int]:
    """An image's patch grid (t, H, W) -> its token grid after the spatial merge."""
    t, h, w = (int(v) for v in grid_thw.tolist())
    return t, h // merge_size, w // merge_size


class MultimodalRotaryHook:
    """Original positions for a language model that reads all three M-RoPE rows."""

    decode_runs_ahead = False  # decode continues from the unpruned prompt's largest position

    def __init__(self, hidden_size: int, merge_size: int) -> None:
        self.hidden_size = hidden_size
        self.merge_size = merge_size

    def initial(self, input_tokens: list[int], mm_features: Sequence) -> tuple[torch.Tensor, int]:
        spans = []
        for f in mm_features:
            ctx = feature_context(f)
            # A placeholder's hand-off rows are text: the layout numbers them as text.
            text_rows = max(ctx.handoff_rows, 0) if ctx is not None else 0
            spans.append(GridSpan(f.mm_position.offset, f.mm_position.length - text_rows,
                                  merged_grid(f.data["image_grid_thw"].data, self.merge_size),
                                  delta=ctx is not None and ctx.is_delta))
        positions, _, delta = mrope_layout(len(input_tokens), spans)
        return positions, delta

    @staticmethod
    def rows(embeds: torch.Tensor, kept: torch.Tensor, ctx: PromptContext, states: torch.Tensor | None,
             grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """[input embedding | hand-off state | served index | t | h | w] digits per served row:
        a kept token's cell (t, h, w) sits at its image's base (`ctx.original_offset`) +
        (t, h, w); the R = handoff_rows text rows after it continue on all three rows from
        base + max(t, h, w) (a delta: from its turn's position, `ctx.text_position`)."""
        if grid is None:
            raise RuntimeError("a multimodal rotary image needs its (t, h, w) grid")
        device = embeds.device
        kept = kept.to(device)
        first = ctx.text_position if ctx.text_position >= 0 else ctx.original_offset + max(grid)
        text = first + torch.arange(max(ctx.handoff_rows, 0), device=device)
        served = ctx.served_offset + torch.arange(kept.numel() + text.numel(), device=device)
        cells = torch.cat([ctx.original_offset + grid_cells(kept, grid), text.expand(3, -1)], dim=1)
        columns = [embeds] if states is None else [embeds, states.to(device, embeds.dtype)]
        return torch.cat([*columns, encode_digits(served, embeds.dtype),
                          *(encode_digits(row, embeds.dtype) for row in cells)], dim=-1)

    def recompute(self, embeddings: Sequence[torch.Tensor], positions: torch.Tensor
                  ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        stripped, positions = apply_position_columns(embeddings, positions, self.hidden_size, 4 * NUM_DIGITS,
                                                     self._write)
        return stripped, positions, self.delta(positions)

    @staticmethod
    def _write(columns: torch.Tensor, positions: torch.Tensor) -> None:
        """columns: served index, then t, h, w position digits."""
        served = decode_digits(columns[:, :NUM_DIGITS]).to(positions.device)
        for r in range(3):
            row = columns[:, NUM_DIGITS * (r + 1): NUM_DIGITS * (r + 2)]
            positions[r, served] = decode_digits(row).to(positions.device, positions.dtype)

    @staticmethod
    def delta(positions: torch.Tensor) -> int:
        """Decode runs at served index + delta: one past the largest prompt position, as
        stock Qwen2-VL numbers it (kept cells never exceed the text after the image)."""
        return int(positions.max()) + 1 - positions.shape[1]

    @staticmethod
    def language_model_positions(positions: torch.Tensor) -> torch.Tensor:
        return positions


class QwenVLProcessor(PioFvlmProcessor):
    """`PioFvlmProcessor` over a Qwen-VL multimodal processor; `family_name` names it in errors."""

    family_name = "Qwen-VL"

    def image_token_id(self) -> int:
        return self.info.get_hf_config().image_token_id

    def _merge_size(self) -> int:
        return self.info.get_hf_config().vision_config.spatial_merge_size

    def _image_grid(self, mm_items, item_idx: int) -> tuple[int, int, int]:
        images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
        if isinstance(images, ImageEmbeddingItems):
            raise ValueError(f"visual_keep: {self.family_name} requests with image embeddings instead of images "
                             "cannot be pruned; send the images, or leave visual_keep out")
        size = images.get_image_size(item_idx)
        resized, _ = self.info._get_vision_info(image_width=size.width, image_height=size.height, num_frames=1,
                                                image_processor=self.info.get_image_processor(), mm_kwargs={},
                                                modality="image")
        cell = self.info.get_hf_config().vision_config.patch_size * self._merge_size()
        return 1, resized.height // cell, resized.width // cell

    def _stock_num_tokens(self, mm_items, item_idx: int) -> int:
        t, h, w = self._image_grid(mm_items, item_idx)
        return t * h * w

    def item_num_tokens(self, item) -> int:
        return int(item["image_grid_thw"].data.prod()) // self._merge_size() ** 2

    def _image_bases(self, mm_items, items) -> list[int]:
        spans = [GridSpan(it.offset, it.num_keep, self._image_grid(mm_items, it.image), delta=it.delta is not None)
                 for it in items]
        end = max(it.offset + it.num_keep for it in items)
        bases = iter(mrope_layout(end, spans)[1])
        first = {it.image: next(bases) for it in items if it.delta is None}
        return [first[it.image] for it in items]

    def _text_positions(self, mm_items, items) -> list[int]:
        # Text after an image continues from its base + max(t, h, w), as Qwen2-VL numbers it;
        # a delta's text continues where the unpruned prompt has it.
        spans = [GridSpan(it.offset, it.num_keep, self._image_grid(mm_items, it.image), delta=it.delta is not None)
                 for it in items]
        positions = mrope_layout(max(it.offset + it.num_keep for it in items) + 1, spans)[0][0]
        return [int(positions[it.offset + it.num_keep]) for it in items]

    def apply(self, inputs, timing_ctx):
        if len(inputs.mm_data_items.get("video", ())) and self._request_prunes(inputs):
            raise ValueError(f"visual_keep: {self.family_name} requests with videos are served whole; leave "
                             "visual_keep out (or 1.0) for them")
        return super().apply(inputs, timing_ctx)

    def _request_prunes(self, inputs) -> bool:
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        return self._request_keep(kwargs) < 1.0


class QwenVLModel:
    """`PioFvlmModel`'s Qwen-VL part; a family lists it before `PioFvlmModel` and vLLM's model.
    `stock` is vLLM's model class, whose positions serve requests that prune nothing."""

    stock: type

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # vLLM's EVS reads this to append its position columns and prune videos: off, videos
        # are served whole (the engine-level switch stays on for the plugin's positions hook).
        self.is_multimodal_pruning_enabled = False

    def _embedding_width(self, text_config) -> int:
        """Columns of one image token's embedding, before the plugin's position columns."""
        return text_config.hidden_size

    def _positions_hook(self, text_config):
        return MultimodalRotaryHook(self._embedding_width(text_config), self.config.vision_config.spatial_merge_size)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        pruned = any((ctx := feature_context(f)) is not None and ctx.pruned for f in mm_features)
        if not (self.pio_enabled and pruned):
            return self.stock.get_mrope_input_positions(self, input_tokens, mm_features)
        return self.pio_positions.initial(input_tokens, mm_features)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        return self.pio_positions.recompute(multimodal_embeddings, mrope_positions)

    def _image_grids(self, kwargs: dict) -> list[tuple[int, int, int]] | None:
        grid_thw = kwargs.get("image_grid_thw")
        if grid_thw is None:
            return None
        rows = grid_thw if isinstance(grid_thw, torch.Tensor) else torch.stack(list(grid_thw))
        merge = self.config.vision_config.spatial_merge_size
        return [merged_grid(row, merge) for row in rows.reshape(-1, 3)]

    def get_encoder_cudagraph_config(self):
        # The encoder CUDA graph path skips embed_multimodal, where the selection runs.
        config = super().get_encoder_cudagraph_config()
        return dataclasses.replace(config, modalities=[], max_frames_per_video=1)
