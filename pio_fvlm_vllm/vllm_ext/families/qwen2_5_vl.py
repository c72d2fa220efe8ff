"""Qwen2.5-VL (Qwen/Qwen2.5-VL-*-Instruct); the Qwen-VL machinery is in `qwen_vl.py`."""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing.processor import PromptReplacement

from ..model import PioFvlmModel
from .qwen_vl import QwenVLModel, QwenVLProcessor


class PioFvlmQwen2_5_VLProcessor(QwenVLProcessor, Qwen2_5_VLMultiModalProcessor):
    family_name = "Qwen2.5-VL"

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        video_token = self.info.get_hf_config().video_token_id
        merge = self._merge_size() ** 2

        def whole_video(item_idx: int) -> list[int]:
            # vLLM prunes videos (EVS) whenever its pruning switch is on; the plugin turns the
            # switch on for its positions hook and keeps videos as stock serves them.
            return [video_token] * (int(out_mm_kwargs["video"][item_idx]["video_grid_thw"].data.prod()) // merge)

        return [PromptReplacement(modality="video", target=u.target, replacement=whole_video)
                if u.modality == "video" else u for u in updates]


@MULTIMODAL_REGISTRY.register_processor(
    PioFvlmQwen2_5_VLProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class PioFvlmQwen2_5_VLForConditionalGeneration(QwenVLModel, PioFvlmModel, Qwen2_5_VLForConditionalGeneration):
    stock = Qwen2_5_VLForConditionalGeneration
