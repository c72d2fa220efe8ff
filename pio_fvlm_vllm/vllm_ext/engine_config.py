"""What the engine needs for pruned tokens to keep their original positions, supplied per model.

vLLM lets a model rewrite a request's positions after its multimodal embeddings are
computed (the M-RoPE pruning hook video pruning uses), on Model Runner V2 (and V1 before
0.34). Two engine settings turn that hook on, and the plugin sets both through vLLM's
per-architecture config hook (`MODELS_CONFIG_MAP`), so `vllm serve DIR --plugin pio_fvlm` and
`LLM(DIR)` need no extra flag:

- `mrope_section` at the top level of the LLaVA config: the runners then carry 3-row
  positions; `text_config` is untouched, so the language model keeps its plain rotary
  embedding (the model passes it row 0).
- `video_pruning_rate` > 0: the runners call `recompute_mrope_positions`. LLaVA models have
  no video input, so the value only switches the hook on.

The V1 CPU runner of vLLM 0.32 and 0.33 never sets the flag that calls the hook;
`cpu_runner.py` sets it (the CPU runner of 0.34 on prunes by itself).
"""

from __future__ import annotations

from vllm.logger import init_logger

from .families import model_prunes

logger = init_logger("vllm.pio_fvlm")

# Only the length (3 position rows) matters: the language model reads row 0 alone.
_MROPE_SECTION = [1, 1, 1]
_HOOK_SWITCH_RATE = 0.5


def supply_engine_config(vllm_config) -> None:
    model_config = vllm_config.model_config
    if not model_prunes(model_config):
        return
    hf_config = model_config.hf_config
    if not model_config.uses_mrope:
        hf_config.mrope_section = list(_MROPE_SECTION)
    mm_config = model_config.multimodal_config
    if mm_config is not None and not mm_config.is_multimodal_pruning_enabled():
        mm_config.video_pruning_rate = _HOOK_SWITCH_RATE


def check_server_settings(model_config) -> None:
    """Start-up checks of the server-wide settings, so a bad one stops `vllm serve` with a
    message naming it instead of failing requests or a worker later."""
    from ..settings import PioFvlmSettings
    from .processor import server_default_keep

    settings = PioFvlmSettings.from_env()  # raises naming the variable
    settings.handoff_layer_for(model_config.hf_config.text_config.num_hidden_layers)  # K and h fit the model
    server_default_keep(model_config, settings)  # valid, and agreeing with the environment
    for name in PioFvlmSettings.unknown_env():
        logger.warning("%s is not a pio_fvlm setting and is ignored (see README's settings table)", name)


def missing_engine_config(vllm_config) -> list[str]:
    """What is missing for original positions, as the flags that would add it."""
    model_config = vllm_config.model_config
    missing = []
    if not model_config.uses_mrope:
        missing.append("""--hf-overrides '{"mrope_section": [1, 1, 1]}'""")
    mm_config = model_config.multimodal_config
    if mm_config is None or not mm_config.is_multimodal_pruning_enabled():
        missing.append("--video-pruning-rate 0.5")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        missing.append("--pipeline-parallel-size 1 (the positions hook runs on the first stage only)")
    return missing


def install_engine_config(architecture: str) -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    previous = MODELS_CONFIG_MAP.get(architecture)
    if previous is not None and getattr(previous, "__pio_fvlm__", False):
        return

    class PioFvlmEngineConfig(previous or VerifyAndUpdateConfig):
        __pio_fvlm__ = True

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            if previous is not None:
                previous.verify_and_update_config(vllm_config)
            supply_engine_config(vllm_config)
            if model_prunes(vllm_config.model_config):
                check_server_settings(vllm_config.model_config)

    MODELS_CONFIG_MAP[architecture] = PioFvlmEngineConfig

