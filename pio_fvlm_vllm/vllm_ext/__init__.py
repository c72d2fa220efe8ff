"""The glue between the engine-independent algorithm and vLLM (0.32 to 0.34)."""

from __future__ import annotations



def is_front_end_process() -> bool:
    """The process that parses the command line, or one of the API-server processes vLLM
    spawns with `--api-server-count N` (named `ApiServer_<i>`): both render requests and serve
    HTTP. Engine and worker processes need the model only."""
    import multiprocessing

    return multiprocessing.parent_process() is None or multiprocessing.current_process().name.startswith("ApiServer")


def install() -> None:
    from vllm import ModelRegistry

    from .cpu_runner import enable_pruning_hook
    from .engine_config import install_engine_config
    from .families import FAMILIES
    from .stats import ensure_stats_dir, register_collector

    for architecture, family in FAMILIES.items():
        ModelRegistry.register_model(architecture, family.model_class)
        install_engine_config(architecture)
    enable_pruning_hook()
    if not is_front_end_process():
        return
    from .cli import install_cli_flag
    from .observability import install_http_middleware
    from .requests import install_request_routing

    ensure_stats_dir()  # before the engine processes start, so they inherit it
    register_collector()
    install_cli_flag()
    install_request_routing()
    install_http_middleware()
