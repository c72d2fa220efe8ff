"""PIO-FVLM visual-token reduction for vLLM.

vLLM calls `register()` through the `vllm.general_plugins` entry point `pio_fvlm` in every
process it starts. Importing this package stays cheap: vLLM and torch load only in register().
"""

from __future__ import annotations

__version__ = "0.1.0"
PLUGIN_NAME = "pio_fvlm"

# The vLLM releases whose internals the plugin hooks into were reviewed, touch point by touch
# point (`vllm_touch_points.py`, docs/vllm-releases.md): 0.32, 0.33 and 0.34.
SUPPORTED_VLLM = ">=0.32,<0.35"
ALLOW_UNSUPPORTED_VLLM_ENV = "PIO_FVLM_ALLOW_UNSUPPORTED_VLLM"

_registered = False


def unsupported_vllm(version: str) -> str | None:
    """Why the plugin will not run on this vLLM version, or None when it is supported."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if Version(Version(version).base_version) in SpecifierSet(SUPPORTED_VLLM):
        return None
    return (f"pio_fvlm {__version__} supports vLLM {SUPPORTED_VLLM}, found vLLM {version}: install a "
            f"supported vLLM, or set {ALLOW_UNSUPPORTED_VLLM_ENV}=1 to try this one anyway")


def register() -> None:
    """Registers the plugin's model families (`vllm_ext/families`), their processors and the
    request routing with vLLM.

    Idempotent: vLLM may load plugins more than once per process.
    """
    global _registered
    if _registered:
        return
    import os

    from vllm import __version__ as vllm_version

    problem = unsupported_vllm(vllm_version)
    if problem is not None:
        if os.environ.get(ALLOW_UNSUPPORTED_VLLM_ENV, "").lower() not in ("1", "true"):
            raise RuntimeError(problem)
        import logging

        logging.getLogger("vllm.pio_fvlm").warning("%s (continuing: %s is set)", problem, ALLOW_UNSUPPORTED_VLLM_ENV)
    from .vllm_ext import install

    install()
    _registered = True
