"""The glue between the engine-independent algorithm and vLLM 0.32."""

from __future__ import annotations

ARCHITECTURE = "LlavaNextForConditionalGeneration"
MODEL_CLASS = "pio_fvlm_vllm.vllm_ext.model:PioFvlmLlavaNextForConditionalGeneration"


def install() -> None:
    from vllm import ModelRegistry

    from .cli import install_cli_flag
    from .requests import install_request_routing

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    install_request_routing()
    install_cli_flag()
