"""The glue between the engine-independent algorithm and vLLM 0.32."""

from __future__ import annotations

ARCHITECTURE = "LlavaNextForConditionalGeneration"
MODEL_CLASS = "pio_fvlm_vllm.vllm_ext.model:PioFvlmLlavaNextForConditionalGeneration"


def install() -> None:
    import multiprocessing

    from vllm import ModelRegistry

    from .engine_config import enable_cpu_pruning_hook, install_engine_config
    from .stats import ensure_stats_dir, register_collector

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    install_engine_config(ARCHITECTURE)
    enable_cpu_pruning_hook()
    if multiprocessing.parent_process() is not None:
        return  # engine and worker processes: the model is all they need
    # The front-end process: parses the command line, renders requests, serves HTTP.
    from .cli import install_cli_flag
    from .observability import install_response_header
    from .requests import install_request_routing

    ensure_stats_dir()  # before the engine processes start, so they inherit it
    register_collector()
    install_cli_flag()
    install_request_routing()
    install_response_header()
