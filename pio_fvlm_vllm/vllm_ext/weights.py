"""The weight-loading seam: the proxy's weights are copied after loading, before any post-load
processing, on every supported vLLM release.

vLLM's post-load pass (`model_loader/utils.process_weights_after_loading`) walks
`named_modules()` from the root and runs `quant_method.process_weights_after_loading(module)`
on each module that has one; on CPU those calls repack the linear weights into opaque
handles, so the first visited quant method is the last moment they are readable. The hook
therefore lives on a childless module placed first among the root's children: visited right
after the root, for real and dummy weights alike.

It must not sit on the root itself: from 0.34 on, `finalize_model_weights` then runs the
module-level hooks (attention sinks, FP8 encoder-attention scales, compressed-tensors
transforms) children-first and skips every descendant of a module that has a quant method,
which would be the whole model. A childless module hides nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

SNAPSHOT_MODULE = "pio_fvlm_snapshot"


class ProxySnapshotHook(QuantizeMethodBase):
    requires_device_loading = False
    supports_pre_processed_weights = True

    def create_weights(self, layer, *args, **kwargs):  # pragma: no cover - never a layer
        raise NotImplementedError

    def apply(self, layer, *args, **kwargs):  # pragma: no cover - never a layer
        raise NotImplementedError

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.take()


class ProxySnapshot(torch.nn.Module):
    """No parameters, no children: only the quant method the post-load pass calls."""

    def __init__(self, take: Callable[[], None]) -> None:
        super().__init__()
        self.quant_method = ProxySnapshotHook()
        self.take = take


def attach_proxy_snapshot(model: torch.nn.Module, take: Callable[[], None]) -> None:
    """Calls `take()` when vLLM post-processes `model`'s loaded weights, before any other
    module's quant method runs."""
    # named_modules() yields the root, then its children in registration order: first it is.
    children = dict(model._modules)
    children.pop(SNAPSHOT_MODULE, None)
    model._modules.clear()
    model._modules[SNAPSHOT_MODULE] = ProxySnapshot(take)
    model._modules.update(children)
