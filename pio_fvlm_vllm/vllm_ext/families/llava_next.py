"""LLaVA-NeXT (llava-hf/llava-v1.6-*): anyres tiles, N = 1,000-2,900 tokens per image."""

from __future__ import annotations

from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModalPruning
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..model import PioFvlmModel
from ..processor import PioFvlmProcessor


class PioFvlmLlavaNextProcessor(PioFvlmProcessor, LlavaNextMultiModalProcessor):
    def item_num_tokens(self, item) -> int:
        height, width = item["image_sizes"].data.tolist()
        return self.info.get_num_image_tokens(image_width=width, image_height=height)


@MULTIMODAL_REGISTRY.register_processor(
    PioFvlmLlavaNextProcessor,
    info=LlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class PioFvlmLlavaNextForConditionalGeneration(
    PioFvlmModel, LlavaNextForConditionalGeneration, SupportsMRoPE, SupportsMultiModalPruning
):
    pass
