"""The CPU runner's side of the positions hook, one adapter for every supported release.

vLLM 0.32 and 0.33 run Model Runner V1 on CPU (`v1/worker/cpu_model_runner.py`), whose
`load_model` never sets the flag that calls the model's `recompute_mrope_positions`
(`GPUModelRunner.load_model` sets it on CUDA); the adapter sets it the same way. From 0.34 on,
the CPU backend runs its own Model Runner V2 (`v1/worker/cpu/`): its model state creates the
pruner itself when the model supports pruning and the config enables it
(`cpu/mm_pruning.maybe_create_mm_pruner`), exactly as CUDA's MRV2 does, so there is nothing
to patch. Which runner a release has is read from the release, not from its version number.
"""

from __future__ import annotations

import functools
import importlib.util

V1_CPU_RUNNER = "vllm.v1.worker.cpu_model_runner"


def has_v1_cpu_runner() -> bool:
    return importlib.util.find_spec(V1_CPU_RUNNER) is not None


def enable_pruning_hook() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not has_v1_cpu_runner():
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
        # As GPUModelRunner.load_model does; the V1 CPU runner leaves it False.
        self.is_multimodal_pruning_enabled = (
            supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )
        return result

    wrapper.__pio_fvlm__ = True
    CPUModelRunner.load_model = wrapper
