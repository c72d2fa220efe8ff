"""PIO-FVLM on Hugging Face `LlavaNextForConditionalGeneration` (and LLaVA-1.5) and
`Qwen2_5_VLForConditionalGeneration`, as the paper applies it.

`HFReference` prunes *inside* the LLM: every token runs through the first K decoder layers,
the proxy loss at layer K scores the image tokens, NMS selects them, and only the kept tokens
(at their original positions) continue through layers K+1..L. The serving plugin instead
prunes before layer 0 so the KV allocation shrinks in every layer, keeps every token at its
unpruned position, and after layer h hands the first image's kept tokens and the text after it
the states the unpruned prompt gives them; `placement="handoff"` reproduces that on the same
model, so the two can be compared token for token (and `input_positions` / `input` the
placements without the hand-off and with renumbered positions). Qwen2.5-VL prompts keep
the multimodal rotary positions its processor and `get_rope_index` give them (kept tokens their
(t, h, w) cells), as the served model does.

The selection itself is the engine-independent code in `pio_fvlm_vllm.algorithm`; only the
weight extraction and the forward pass are Hugging Face specific.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import torch

from ..algorithm import DecoderLayerWeights, ImageContext, ProxyWeights, select_tokens
from ..algorithm.visionzip import cls_attention, visionzip_compress
from ..budget import budget
from ..positions import handoff_rows
from ..settings import PioFvlmSettings
from ..vllm_ext.proxy_weights import decoder_shape

# layer_k: the paper. handoff: the plugin (pruned before layer 0, original positions, and after
# layer h the first image's kept tokens and the text after it take their unpruned states).
# input_positions: the same without the hand-off. input: pruned before layer 0 and positions
# renumbered, as a shorter prompt numbers them.
Placement = Literal["layer_k", "handoff", "input_positions", "input"]
PLACEMENTS = get_args(Placement)


def proxy_weights_from_hf(model, num_layers: int) -> ProxyWeights:
    """Views of the first `num_layers` decoder layers, the final norm and the LM head."""
    lm = model.model.language_model

    def w(t):
        return None if t is None else t.detach()

    layers = [
        DecoderLayerWeights(
            input_norm=w(layer.input_layernorm.weight), q_proj=w(layer.self_attn.q_proj.weight),
            k_proj=w(layer.self_attn.k_proj.weight), v_proj=w(layer.self_attn.v_proj.weight),
            o_proj=w(layer.self_attn.o_proj.weight), post_norm=w(layer.post_attention_layernorm.weight),
            gate_proj=w(layer.mlp.gate_proj.weight), up_proj=w(layer.mlp.up_proj.weight),
            down_proj=w(layer.mlp.down_proj.weight), q_bias=w(layer.self_attn.q_proj.bias),
            k_bias=w(layer.self_attn.k_proj.bias), v_bias=w(layer.self_attn.v_proj.bias),
        )
        for layer in lm.layers[:num_layers]
    ]
    return ProxyWeights(decoder_shape(model.config.text_config), layers, w(lm.norm.weight), w(model.lm_head.weight))


@dataclass
class PreparedPrompt:
    input_ids: torch.Tensor  # (L,) with one run of image tokens per image
    embeds: torch.Tensor  # (L, D) image features scattered in
    image_spans: list[tuple[int, int]]  # [start, end) of each image's tokens
    importance: list[torch.Tensor] | None  # per image (N,) CLS attention, when computed
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (H, W) per image, when known
    # Multimodal rotary (Qwen2.5-VL): (3, L) positions and each image's (t, h, w) token grid.
    positions: torch.Tensor | None = None
    grids: list[tuple[int, int, int]] | None = None


class HFReference:
    def __init__(self, model, processor, settings: PioFvlmSettings | None = None):
        self.model = model.eval()
        self.processor = processor
        self.settings = settings or PioFvlmSettings()
        text_config = model.config.text_config
        self.proxy_layers = self.settings.proxy_layer_for(text_config.num_hidden_layers)
        self.proxy = proxy_weights_from_hf(model, self.proxy_layers)
        self.image_token_id = model.config.image_token_id
        # Qwen-VL models carry their vision tower as `visual` and read three position rows.
        self.multimodal_rotary = hasattr(model.model, "visual")
        if self.multimodal_rotary and getattr(model.config.vision_config, "deepstack_visual_indexes", None):
            raise ValueError("the reference covers Qwen2.5-VL; Qwen3-VL's deepstack features are not modelled")

    # -- inputs -------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, prompt: str, images: list, *, with_importance: bool = False,
                add_special_tokens: bool = True) -> PreparedPrompt:
        """`add_special_tokens=False` for prompts rendered by a chat template, as vLLM does."""
        inputs = self.processor(text=prompt, images=images, return_tensors="pt",
                                add_special_tokens=add_special_tokens)
        if self.multimodal_rotary:
            if with_importance:
                raise ValueError("CLS-attention importance (the encoder-involved stage) is LLaVA's: Qwen2.5-VL's "
                                 "tower has no CLS token")
            return self._prepare_multimodal_rotary(inputs)
        device = self.model.device
        ids = inputs["input_ids"][0].to(device)
        out = self.model.model.get_image_features(
            inputs["pixel_values"].to(device, self.model.dtype), inputs["image_sizes"],
            vision_feature_layer=self.model.config.vision_feature_layer,
            vision_feature_select_strategy=self.model.config.vision_feature_select_strategy,
        )
        embeds = self.model.get_input_embeddings()(ids).clone()
        spans, start = [], 0
        mask = ids == self.image_token_id
        for feats in out.pooler_output:
            pos = mask.nonzero().squeeze(-1)[start : start + feats.shape[0]]
            spans.append((int(pos[0]), int(pos[-1]) + 1))
            embeds[pos] = feats.to(embeds.dtype)
            start += feats.shape[0]
        importance = self._importance(out, inputs["image_sizes"]) if with_importance else None
        sizes = [(int(h), int(w)) for h, w in inputs["image_sizes"]]
        return PreparedPrompt(ids, embeds, spans, importance, sizes)

    def _prepare_multimodal_rotary(self, inputs) -> PreparedPrompt:
        device = self.model.device
        ids = inputs["input_ids"][0].to(device)
        grid_thw = inputs["image_grid_thw"]
        out = self.model.model.get_image_features(inputs["pixel_values"].to(device, self.model.dtype),
                                                  grid_thw.to(device))
        embeds = self.model.get_input_embeddings()(ids).clone()
        spans, start = [], 0
        pos = (ids == self.image_token_id).nonzero().squeeze(-1)
        for feats in out.pooler_output:
            rows = pos[start : start + feats.shape[0]]
            spans.append((int(rows[0]), int(rows[-1]) + 1))
            embeds[rows] = feats.to(embeds.dtype)
            start += feats.shape[0]
        positions, _ = self.model.model.get_rope_index(inputs["input_ids"], inputs.get("mm_token_type_ids"), grid_thw,
                                                       attention_mask=inputs["attention_mask"])
        merge = self.model.config.vision_config.spatial_merge_size
        grids = [(t, h // merge, w // merge) for t, h, w in grid_thw.tolist()]
        return PreparedPrompt(ids, embeds, spans, None, positions=positions[:, 0].to(device), grids=grids)

    def _importance(self, vision_out, image_sizes) -> list[torch.Tensor]:
        """CLS attention of the feature layer, packed into the LLM's token layout (newline
        tokens score 0)."""
        tower = self.model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # transformers < 5 nests the encoder
        layer_idx = self.model.config.vision_feature_layer % len(vision_out.hidden_states)
        layer = tower.encoder.layers[layer_idx - 1]
        attn, _ = cls_attention(
            vision_out.hidden_states[layer_idx - 1], layer.layer_norm1.weight, layer.layer_norm1.bias,
            layer.self_attn.q_proj.weight, layer.self_attn.q_proj.bias, layer.self_attn.k_proj.weight,
            layer.self_attn.k_proj.bias, layer.self_attn.num_heads, layer.layer_norm1.eps,
        )
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        counts = [image_size_to_num_patches(s, self.model.config.image_grid_pinpoints,
                                            self.model.config.vision_config.image_size) for s in image_sizes]
        packed, _ = self.model.model.pack_image_features(
            list(attn[..., None].split(counts)), image_sizes, "default",
            image_newline=torch.zeros(1, dtype=attn.dtype, device=attn.device),
        )
        return [p.squeeze(-1) for p in packed]

    # -- selection ----------------------------------------------------------------------
    def select(self, prepared: PreparedPrompt, visual_keep: float,
               budgets: list[int] | None = None) -> list[torch.Tensor]:
        """Kept indices per image (ascending), from the layer-K proxy over the full prompt.
        `budgets` overrides budget(N, visual_keep) per image (the encoder-involved stage 2)."""
        ids, embeds = prepared.input_ids, prepared.embeds
        contexts = []
        for start, end in prepared.image_spans:
            text = torch.ones_like(ids, dtype=torch.bool)
            for s, e in prepared.image_spans:
                text[s:e] = False
            before = text.clone()
            before[start:] = False
            after = text.clone()
            after[:end] = False
            grid = prepared.grids[len(contexts)] if prepared.grids is not None else None
            contexts.append(ImageContext(embeds[start:end], embeds[before], embeds[after], grid=grid))
        if budgets is None:
            budgets = [budget(end - start, visual_keep) for start, end in prepared.image_spans]
        return select_tokens(self.proxy, contexts, budgets, self.settings)

    # -- forward ------------------------------------------------------------------------
    @torch.no_grad()
    def last_logits(self, prepared: PreparedPrompt, kept: list[torch.Tensor] | None,
                    placement: Placement = "layer_k", *, handoff_layer: int | None = None,
                    handoff_text: bool = True) -> torch.Tensor:
        """Next-token logits after the prompt, image tokens pruned to `kept` (None: all).

        `handoff_layer` / `handoff_text` vary the "handoff" placement for experiments: the
        layer after which states are handed off (default: the settings'), and whether the
        text after the image takes part (the plugin: yes) or only the kept image tokens."""
        lm = self.model.model.language_model
        x = prepared.embeds[None]
        # (1, L), or (3, 1, L) multimodal rotary rows
        positions = (torch.arange(x.shape[1], device=x.device)[None] if prepared.positions is None
                     else prepared.positions[:, None])
        keep_mask = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
        if kept is not None:
            for (start, end), idx in zip(prepared.image_spans, kept):
                keep_mask[start:end] = False
                keep_mask[start + idx.to(x.device)] = True
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        # The paper prunes after the layer whose output the gradient is taken at.
        prune_at = self.proxy_layers - (self.settings.scoring == "official") if placement == "layer_k" else 0
        layer_h = self.handoff_layer if handoff_layer is None else handoff_layer
        handoff = (self._handoff_rows(prepared, kept, layer_h, handoff_text)
                   if placement == "handoff" and kept is not None else None)

        def run(layer, x, positions):
            rope = lm.rotary_emb(x, positions)
            x = layer(x, attention_mask=None, position_ids=positions if positions.ndim == 2 else None,
                      position_embeddings=rope)
            return x[0] if isinstance(x, tuple) else x

        if handoff is not None:
            full, full_positions = x, positions
            for layer in lm.layers[:layer_h]:
                full = run(layer, full, full_positions)
        for i, layer in enumerate(lm.layers):
            if i == prune_at and kept is not None:
                x, positions = x[:, keep_mask], positions[..., keep_mask]
                if placement == "input":  # a shorter prompt, numbered from 0
                    positions = torch.arange(x.shape[1], device=x.device).expand(*positions.shape[:-1], -1)
            if handoff is not None and i == layer_h:
                served_rows, original_rows = handoff
                x = x.clone()
                x[:, served_rows] = full[:, original_rows]
            x = run(layer, x, positions)
        h = lm.norm(x[:, -1])
        return self.model.lm_head(h)[0]

    @property
    def handoff_layer(self) -> int:
        return self.settings.handoff_layer_for(self.model.config.text_config.num_hidden_layers)

    def _handoff_rows(self, prepared: PreparedPrompt, kept: list[torch.Tensor], layer: int, text: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows of the pruned sequence, rows of the unpruned one) that the served prefill hands
        off after layer h: the first image's kept tokens and the text after it (as the plugin's
        processor and model choose them), or None when nothing is handed off."""
        if layer == 0 or not prepared.image_spans:
            return None
        (start, end), idx = prepared.image_spans[0], kept[0].to(prepared.embeds.device)
        n, k = end - start, idx.numel()
        if k == n:
            return None
        text_end = prepared.image_spans[1][0] if len(prepared.image_spans) > 1 else prepared.embeds.shape[0]
        rows = handoff_rows(text_end - end, n, k) if text else 0
        original = torch.cat([start + idx, end + torch.arange(rows, device=idx.device)])
        return start + torch.arange(k + rows, device=idx.device), original

    @torch.no_grad()
    def generate(self, prepared: PreparedPrompt, kept: list[torch.Tensor] | None, max_new_tokens: int = 8,
                 placement: Placement = "layer_k") -> list[int]:
        """Greedy decoding by re-running the pruned forward (no KV cache: a reference, not fast)."""
        emb = self.model.get_input_embeddings()
        out: list[int] = []
        current = prepared
        for _ in range(max_new_tokens):
            token = int(self.last_logits(current, kept, placement).argmax())
            out.append(token)
            if token == self.model.config.text_config.eos_token_id:
                break
            tok = torch.tensor([token], device=current.embeds.device)
            current = replace(current, input_ids=torch.cat([current.input_ids, tok]),
                              embeds=torch.cat([current.embeds, emb(tok)]))
        return out

    @staticmethod
    def with_image_tokens(prepared: PreparedPrompt, images: list[torch.Tensor]) -> PreparedPrompt:
        """The same prompt with each image's tokens replaced by `images[i]` (M_i, D)."""
        ids, embeds = prepared.input_ids, prepared.embeds
        pieces_ids, pieces_emb, spans = [], [], []
        cursor = length = 0
        for (start, end), tokens in zip(prepared.image_spans, images):
            image_id = ids[start:start + 1]
            pieces_ids += [ids[cursor:start], image_id.expand(tokens.shape[0])]
            pieces_emb += [embeds[cursor:start], tokens.to(embeds.dtype)]
            length += start - cursor
            spans.append((length, length + tokens.shape[0]))
            length += tokens.shape[0]
            cursor = end
        pieces_ids.append(ids[cursor:])
        pieces_emb.append(embeds[cursor:])
        return PreparedPrompt(torch.cat(pieces_ids), torch.cat(pieces_emb), spans, None)

    def visionzip_stage(self, prepared: PreparedPrompt, visual_keep: float,
                        num_contextual: list[int] | None = None) -> tuple[PreparedPrompt, list[int]]:
        """Encoder-involved mode, stage 1: each image becomes [dominant tokens by CLS attention,
        a few contextual tokens merged from the rest]. Returns the shortened prompt and each
        image's final budget, computed from its original token count. `num_contextual`
        overrides the settings' share (VisionZip alone uses k - c dominant + c contextual).

        The keys used to group the remainder are the projected embeddings (what the LLM sees)
        rather than the vision tower's attention keys: one feature space for both stages.
        """
        if prepared.importance is None:
            raise ValueError("prepare(..., with_importance=True) is needed for the VisionZip stage")
        images, budgets = [], []
        for i, ((start, end), importance) in enumerate(zip(prepared.image_spans, prepared.importance)):
            n = end - start
            k = budget(n, visual_keep)
            if num_contextual is None:
                contextual = round(n * self.settings.visionzip_contextual)
                dominant = min(n, max(k, round(n * self.settings.visionzip_dominant)))
            else:
                contextual = min(num_contextual[i], k - 1)
                dominant = k - contextual
            zipped = visionzip_compress(prepared.embeds[start:end], importance.to(prepared.embeds.device),
                                        prepared.embeds[start:end], dominant, contextual)
            images.append(zipped.embeds)
            budgets.append(min(k, zipped.embeds.shape[0]))
        return self.with_image_tokens(prepared, images), budgets
