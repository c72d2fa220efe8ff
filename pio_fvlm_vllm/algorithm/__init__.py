"""PIO-FVLM visual-token selection as pure PyTorch, independent of any serving engine."""

from .decoder import DecoderLayerWeights, DecoderShape, ProxyWeights, decoder_layer
from .handoff import HandoffInput, layer_output_at
from .nms import nms_select
from .saliency import ImageContext, Saliency, gradient_saliency, proxy_loss
from .select import (Selection, all_ranks_agree, seeded_random, select, select_on_every_rank, select_tokens,
                     uniform_stride, uniform_stride_among)
from .visionzip import VisionZipResult, cls_attention, visionzip_compress

__all__ = [
    "DecoderLayerWeights",
    "DecoderShape",
    "HandoffInput",
    "ImageContext",
    "ProxyWeights",
    "Saliency",
    "Selection",
    "VisionZipResult",
    "cls_attention",
    "decoder_layer",
    "gradient_saliency",
    "layer_output_at",
    "nms_select",
    "proxy_loss",
    "select",
    "select_on_every_rank",
    "all_ranks_agree",
    "seeded_random",
    "select_tokens",
    "uniform_stride",
    "uniform_stride_among",
    "visionzip_compress",
]
