"""PIO-FVLM visual-token reduction for vLLM.

vLLM calls `register()` through the `vllm.general_plugins` entry point `pio_fvlm` in every
process it starts. Importing this package stays cheap: vLLM and torch load only in register().
"""

from __future__ import annotations

__version__ = "0.1.0"
PLUGIN_NAME = "pio_fvlm"

_registered = False


def register() -> None:
    """Registers the PIO-FVLM LLaVA-NeXT model, its processor and request routing with vLLM.

    Idempotent: vLLM may load plugins more than once per process.
    """
    global _registered
    if _registered:
        return
    from .vllm_ext import install

    install()
    _registered = True
