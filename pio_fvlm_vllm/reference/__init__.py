"""Hugging Face reference paths: the method as the paper applies it, used as the test oracle
and in algorithm benchmarks."""

from .hf import HFReference, proxy_weights_from_hf

__all__ = ["HFReference", "proxy_weights_from_hf"]
