"""LLaVA-1.5 (llava-hf/llava-1.5-*-hf): one CLIP view, a fixed N = 576 tokens per image."""

from __future__ import annotations

from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModalPruning
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..model import PioFvlmModel
from ..processor import PioFvlmProcessor


class PioFvlmLlavaProcessor(PioFvlmProcessor, LlavaMultiModalProcessor):
    def item_num_tokens(self, item) -> int:
        # The image processor resizes and crops every image to the tower's square.
        height, width = item["pixel_values"].data.shape[-2:]
        return self.info.get_num_image_tokens(image_width=width, image_height=height)


def _build_processor(info, dummy_inputs):
    if isinstance(info, LlavaProcessingInfo):
        return PioFvlmLlavaProcessor(info, dummy_inputs)
    # vLLM serves Pixtral-HF checkpoints under the same architecture: served as stock serves them.
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(
    _build_processor,
    info=_build_llava_or_pixtral_hf_info,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class PioFvlmLlavaForConditionalGeneration(
    PioFvlmModel, LlavaForConditionalGeneration, SupportsMRoPE, SupportsMultiModalPruning
):
    pass
