"""The model families the plugin prunes, one module each over the shared machinery.

A family module subclasses vLLM's model and multimodal processor for one architecture with
`PioFvlmModel` (`../model.py`) and `PioFvlmProcessor` (`../processor.py`) and registers the
processor; this table tells vLLM which class serves which architecture, and which checkpoints
of that architecture are pruned (vLLM serves Pixtral-HF under LLaVA's name, for instance:
the plugin leaves those exactly as stock vLLM serves them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_class: str  # "module:Class"
    # Vision config classes of checkpoints of this architecture that are left to stock vLLM.
    stock_vision_configs: tuple[str, ...] = ()

    def prunes(self, hf_config) -> bool:
        return type(getattr(hf_config, "vision_config", None)).__name__ not in self.stock_vision_configs


FAMILIES: dict[str, Family] = {
    "LlavaNextForConditionalGeneration": Family(
        "pio_fvlm_vllm.vllm_ext.families.llava_next:PioFvlmLlavaNextForConditionalGeneration"),
    "LlavaForConditionalGeneration": Family(
        "pio_fvlm_vllm.vllm_ext.families.llava:PioFvlmLlavaForConditionalGeneration",
        stock_vision_configs=("PixtralVisionConfig",)),
    "Qwen2_5_VLForConditionalGeneration": Family(
        "pio_fvlm_vllm.vllm_ext.families.qwen2_5_vl:PioFvlmQwen2_5_VLForConditionalGeneration"),
    "Qwen3VLForConditionalGeneration": Family(
        "pio_fvlm_vllm.vllm_ext.families.qwen3_vl:PioFvlmQwen3VLForConditionalGeneration"),
}


def pruned_architecture(architectures: Iterable[str] | None, hf_config) -> str | None:
    """The architecture under which the plugin prunes this model, or None when it does not."""
    arch = next((a for a in architectures or () if a in FAMILIES), None)
    return arch if arch is not None and FAMILIES[arch].prunes(hf_config) else None


def model_prunes(model_config) -> bool:
    return pruned_architecture(model_config.architectures, model_config.hf_config) is not None


def supported_list() -> str:
    return ", ".join(FAMILIES)
