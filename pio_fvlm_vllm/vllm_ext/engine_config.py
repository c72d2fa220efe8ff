"""What the engine needs for pruned tokens to keep their original positions, supplied per model.

vLLM 0.32 lets a model rewrite a request's positions after its multimodal embeddings are
computed (the M-RoPE pruning hook video pruning uses), on the V1 runner and on Model Runner
V2. Two engine settings turn that hook on, and the plugin sets both through vLLM's
per-architecture config hook (`MODELS_CONFIG_MAP`), so `vllm serve DIR --plugin pio_fvlm` and
`LLM(DIR)` need no extra flag:

- `mrope_section` at the top level of the LLaVA config: the runners then carry 3-row
  positions; `text_config` is untouched, so the language model keeps its plain rotary
  embedding (the model passes it row 0).
- `video_pruning_rate` > 0: the runners call `recompute_mrope_positions`. LLaVA models have
  no video input, so the value only switches the hook on.

vLLM 0.32's CPU runner never sets the flag that calls the hook (`CPUModelRunner.load_model`
skips what `GPUModelRunner.load_model` does); `enable_cpu_pruning_hook` sets it the same way.
"""

from __future__ import annotations

import functools

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


def enable_cpu_pruning_hook() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    load_model = CPUModelRunner.load_model
    if getattr(load_model, "__pio_fvlm__", False):
        return

    @functools.wraps(load_model)
    def wrapper(self, *args, **kwargs):
        result = load_model(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        # As GPUModelRunner.load_model does; the CPU runner leaves it False.
        self.is_multimodal_pruning_enabled = (
            supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )
        return result

    wrapper.__pio_fvlm__ = True
    CPUModelRunner.load_model = wrapper
