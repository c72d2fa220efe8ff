"""Qwen3-VL (Qwen/Qwen3-VL-*-Instruct): the Qwen-VL machinery (`qwen_vl.py`) plus deepstack.

Each image token's embedding carries the vision tower's deepstack features after its main
part ([main | level 0 | level 1 | ...], as vLLM's model passes them to the language model,
which adds level i to the image rows after decoder layer i): the kept rows keep all of them,
and the proxy adds them after its early layers as the served model does.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing.processor import PromptReplacement

from ...algorithm import ImageContext
from ..context import PromptContext
from ..model import PioFvlmModel
from .qwen_vl import QwenVLModel, QwenVLProcessor


class PioFvlmQwen3VLProcessor(QwenVLProcessor, Qwen3VLMultiModalProcessor):
    family_name = "Qwen3-VL"

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = self.info.get_hf_config()
        tokenizer = self.info.get_tokenizer()
        merge = self._merge_size() ** 2

        def whole_video(item_idx: int):
            # vLLM prunes videos (EVS) whenever its pruning switch is on; the plugin turns the
            # switch on for its positions hook and keeps videos as stock serves them: every
            # frame's tokens after its timestamp.
            item = out_mm_kwargs["video"][item_idx]
            t, h, w = (int(v) for v in item["video_grid_thw"].data.tolist())
            return Qwen3VLMultiModalProcessor.get_video_repl(
                tokens_per_frame=[h * w // merge] * t, timestamps=item["timestamps"].data, tokenizer=tokenizer,
                vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
                video_token_id=config.video_token_id, select_token_id=True)

        return [PromptReplacement(modality="video", target=u.target, replacement=whole_video)
                if u.modality == "video" else u for u in updates]


@MULTIMODAL_REGISTRY.register_processor(
    PioFvlmQwen3VLProcessor,
    info=Qwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class PioFvlmQwen3VLForConditionalGeneration(QwenVLModel, PioFvlmModel, Qwen3VLForConditionalGeneration):
    stock = Qwen3VLForConditionalGeneration

    def _embedding_width(self, text_config) -> int:
        return self.visual_dim + (self.multiscale_dim if self.use_deepstack else 0)

    def _image_context(self, image: torch.Tensor, ctx: PromptContext,
                       grid: tuple[int, int, int] | None = None) -> ImageContext:
        context = super()._image_context(image[:, : self.visual_dim], ctx, grid)
        if not self.use_deepstack:
            return context
        # (N, levels * D) -> (levels, N, D), a view
        deepstack = image[:, self.visual_dim:].view(image.shape[0], self.deepstack_num_level, -1).transpose(0, 1)
        return dataclasses.replace(context, deepstack=deepstack)
