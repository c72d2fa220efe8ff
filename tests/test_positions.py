"""Original positions and the hand-off, below the engine: the pure functions, the pruning hook
the engine calls, and Model Runner V2's own pruning helper driving it on CPU tensors."""

from types import SimpleNamespace

import pytest
import torch

from pio_fvlm_vllm.positions import (
    POSITION_COLUMNS, ImageSpan, decode_digits, encode_digits, handoff_rows, original_positions,
)
from pio_fvlm_vllm.vllm_ext.context import CONTEXT_FIELD, KEEP_ALL, NO_HANDOFF, PromptContext
from pio_fvlm_vllm.vllm_ext.handoff import HandoffBuffers
from pio_fvlm_vllm.vllm_ext.positions_hook import PositionsHook, initial_positions, served_rows

pytestmark = pytest.mark.vllm_seams

D = 8


def test_original_positions_one_image():
    # served: 3 text, 4 kept of 10 image tokens, 5 text
    pos, shift = original_positions(12, [ImageSpan(3, 4, 10)])
    assert shift == 6
    assert pos.tolist() == [0, 1, 2, 3, 4, 5, 6, 13, 14, 15, 16, 17]


def test_original_positions_two_adjacent_images_and_text_only():
    pos, shift = original_positions(9, [ImageSpan(1, 2, 5), ImageSpan(3, 3, 4), ])
    assert shift == 4
    assert pos.tolist() == [0, 1, 2, 6, 7, 8, 10, 11, 12]
    assert original_positions(4, [])[0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="outside a prompt"):
        original_positions(4, [ImageSpan(3, 4, 10)])


def test_handoff_rows_never_exceed_the_dropped_tokens():
    assert handoff_rows(text_after=20, num_tokens=100, num_keep=11) == 20
    assert handoff_rows(text_after=20, num_tokens=30, num_keep=15) == 15
    assert handoff_rows(text_after=0, num_tokens=30, num_keep=3) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_digits_round_trip_exactly_in_every_dtype(dtype):
    values = torch.tensor([0, 255, 256, 257, 2927, 65535, 10**6, 256**3 - 1])
    assert torch.equal(decode_digits(encode_digits(values, dtype)), values)
    # A plain cast would not be exact: this is why positions travel as digits.
    assert dtype == torch.float32 or not torch.equal(values.to(dtype).long(), values)
    with pytest.raises(ValueError, match="does not fit"):
        encode_digits(torch.tensor([256**3]), dtype)


def test_context_round_trip_and_malformed():
    ctx = PromptContext(5, 40, 3, 7, 2, [1, 2, 3], [9, 8], image_key=2**60 - 1)
    assert PromptContext.unpack(ctx.pack()) == ctx
    assert ctx.pruned and ctx.handoff
    assert not PromptContext(KEEP_ALL, 40, 3, 3, NO_HANDOFF, [], []).pruned
    with pytest.raises(ValueError, match="malformed"):
        PromptContext.unpack(torch.tensor([5, 40, 3, 7, 2, 99, 1]))


def _feature(ctx: PromptContext, offset: int, length: int):
    from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem, PlaceholderRange

    elem = MultiModalFieldElem(data=ctx.pack(), field=MultiModalBatchedField(keep_on_cpu=True))
    return SimpleNamespace(data={CONTEXT_FIELD: elem}, mm_position=PlaceholderRange(offset=offset, length=length))


def _prompt_with_one_image(handoff: int):
    """served prompt: 3 text, 4 kept of N=10 image tokens, then 5 text (handoff of them in range)."""
    ctx = PromptContext(4, 10, 3, 3, handoff, [11, 12, 13], [21, 22, 23, 24, 25])
    return ctx, [_feature(ctx, 3, 4 + max(handoff, 0))]


def _rows(ctx, kept, states=None):
    embeds = torch.randn(kept.numel() + max(ctx.handoff_rows, 0), D)
    return embeds, served_rows(embeds, kept, ctx, states)


def test_hook_writes_original_positions_of_kept_rows_in_any_chunking():
    ctx, features = _prompt_with_one_image(NO_HANDOFF)
    positions, delta = initial_positions(12, features)
    assert delta == 6 and positions.shape == (3, 12)
    kept = torch.tensor([0, 4, 5, 9])
    embeds, rows = _rows(ctx, kept)
    assert rows.shape == (4, D + POSITION_COLUMNS)
    hook = PositionsHook(D)
    expected = [0, 1, 2, 3, 7, 8, 12, 13, 14, 15, 16, 17]
    whole, new, d = hook.recompute([rows], positions)
    assert new[0].tolist() == new[1].tolist() == expected and d == 6
    assert torch.equal(whole[0], embeds)
    # The image split across two chunks: each chunk's rows place themselves.
    step = positions
    for part in (rows[:1], rows[1:]):
        _, step, d = hook.recompute([part], step)
    assert step[0].tolist() == expected and d == 6
    # Steps without pruned rows (decode, text-only) return the same tensor and delta.
    same, again, d = hook.recompute([], new)
    assert again is new and d == 6 and same == []


def test_prompt_ending_in_image_rows_decodes_after_the_unpruned_prompt():
    ctx = PromptContext(4, 10, 3, 3, NO_HANDOFF, [11, 12, 13], [])
    positions, delta = initial_positions(7, [_feature(ctx, 3, 4)])
    _, rows = _rows(ctx, torch.tensor([0, 2, 4, 6]))  # the last kept token is not the image's last
    _, new, d = PositionsHook(D).recompute([rows], positions)
    assert new[0].tolist() == [0, 1, 2, 3, 5, 7, 9]
    assert d == delta == 6  # decode starts at 7 + 6 = 13, right after the unpruned prompt


def test_hook_keeps_handoff_states_on_their_rows_for_the_embedding_step():
    ctx, features = _prompt_with_one_image(handoff=3)
    positions, _ = initial_positions(12, features)
    kept = torch.tensor([1, 2, 6, 7])
    states = torch.randn(4 + 3, D)  # the kept rows', then the three text rows'
    embeds, rows = _rows(ctx, kept, states)
    assert rows.shape == (7, 2 * D + POSITION_COLUMNS)
    (stripped,), new, delta = PositionsHook(D).recompute([rows], positions)
    assert new[0].tolist() == [0, 1, 2, 4, 5, 9, 10, 13, 14, 15, 16, 17] and delta == 6
    assert torch.equal(new[1], new[0])  # no position row carries anything else
    assert torch.equal(stripped, torch.cat([embeds, states], dim=-1))


def test_embedding_step_loads_states_at_the_rows_of_the_flattened_batch():
    """Two requests in one step: text rows, a chunk of a pruned image (hand-off states), an
    unpruned image, another pruned chunk; the multimodal mask orders them as the items are."""
    buffers = HandoffBuffers(max_tokens=32, hidden_size=D, dtype=torch.float32)
    is_mm = torch.zeros(20, dtype=torch.bool)
    is_mm[[2, 3, 4, 8, 9, 14, 15]] = True
    first, whole, second = torch.randn(3, 2 * D), torch.randn(2, D), torch.randn(2, 2 * D)
    stripped = buffers.load([first, whole, second], is_mm, D)
    assert [tuple(e.shape) for e in stripped] == [(3, D), (2, D), (2, D)]
    assert torch.equal(stripped[0], first[:, :D]) and stripped[1] is whole
    assert buffers.mask.nonzero().flatten().tolist() == [2, 3, 4, 14, 15]
    assert torch.equal(buffers.states[[2, 3, 4]], first[:, D:]) and torch.equal(buffers.states[[14, 15]], second[:, D:])
    hidden, residual = torch.randn(20, D), torch.randn(20, D)
    out_h, out_r = buffers.after_layer(None, (), (hidden, residual))
    assert torch.equal(out_h[[2, 3, 4]] + out_r[[2, 3, 4]], first[:, D:])
    keep = torch.ones(20, dtype=torch.bool)
    keep[[2, 3, 4, 14, 15]] = False
    assert torch.equal(out_h[keep], hidden[keep]) and torch.equal(out_r[keep], residual[keep])
    buffers.clear()
    assert not buffers.mask.any()
    out_h, out_r = buffers.after_layer(None, (), (hidden, residual))
    assert torch.equal(out_h, hidden) and torch.equal(out_r, residual)
    # A step without hand-off rows returns its embeddings as they are, loading nothing.
    plain = [whole]
    assert buffers.load(plain, is_mm, D) is plain and not buffers.mask.any()


def test_model_runner_v2_pruning_helper_drives_the_hook_on_cpu_tensors():
    """MRV2's `MultiModalPruner.recompute` (the CUDA default runner) segments the step's
    embeddings per request, calls the model's hook and writes the positions back."""
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

    ctx, features = _prompt_with_one_image(handoff=3)
    positions, delta = initial_positions(12, features)
    kept = torch.tensor([0, 3, 6, 9])
    states = torch.randn(7, D)
    embeds, rows = _rows(ctx, kept, states)
    hook = PositionsHook(D)

    class RopeState:  # RopeState's two methods the pruner uses, over a CPU int32 table
        table = positions.to(torch.int32).clone()
        deltas = {}

        def read_prefill_positions(self, req_idx, length):
            return self.table[:, :length]

        def update_prefill_positions(self, req_idx, new, delta):
            self.table[:, : new.shape[1]].copy_(new)
            self.deltas[req_idx] = delta

    model = SimpleNamespace(recompute_mrope_positions=lambda input_ids, multimodal_embeddings, mrope_positions,
                            num_computed_tokens: hook.recompute(multimodal_embeddings, mrope_positions))
    rope = RopeState()
    encoder_cache = SimpleNamespace(mm_features={"r": features})
    batch = SimpleNamespace(req_ids=["r"], idx_mapping_np=torch.tensor([0]).numpy(),
                            prefill_len_np=torch.tensor([12]).numpy(),
                            num_computed_prefill_tokens_np=torch.tensor([0]).numpy(),
                            num_scheduled_tokens=torch.tensor([12]).numpy())
    req_states = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=torch.arange(12)[None]))
    pruner = MultiModalPruner(model, rope, encoder_cache, inputs_embeds_size=D)
    (cleaned,) = pruner.recompute([rows], batch, req_states)
    assert torch.equal(cleaned, torch.cat([embeds, states], dim=-1))  # the states go on to embed_input_ids
    assert rope.table[0].tolist() == [0, 1, 2, 3, 6, 9, 12, 13, 14, 15, 16, 17]
    # MRV2 decode positions are num_computed + i + delta (rope.py's kernel): 12 + 6, the unpruned ones.
    assert rope.deltas[0] == delta == 6


def _engine_config(pipeline_parallel_size=1, hf_config=None, architecture="LlavaNextForConditionalGeneration"):
    from transformers import LlavaNextConfig
    from vllm.config.multimodal import MultiModalConfig
    from vllm.transformers_utils.config import uses_mrope

    hf_config = hf_config or LlavaNextConfig()

    class ModelConfig:
        multimodal_config = MultiModalConfig()
        architectures = [architecture]

        @property
        def uses_mrope(self):
            return uses_mrope(hf_config)

    model_config = ModelConfig()
    model_config.hf_config = hf_config
    return SimpleNamespace(model_config=model_config,
                           parallel_config=SimpleNamespace(pipeline_parallel_size=pipeline_parallel_size))


def test_the_plugin_supplies_the_engine_settings_of_the_positions_hook():
    from pio_fvlm_vllm.vllm_ext.engine_config import missing_engine_config, supply_engine_config

    config = _engine_config()
    assert missing_engine_config(config) == ["""--hf-overrides '{"mrope_section": [1, 1, 1]}'""",
                                             "--video-pruning-rate 0.5"]
    supply_engine_config(config)
    assert missing_engine_config(config) == []
    # The language model keeps its plain rotary embedding: only the top level changed.
    assert config.model_config.hf_config.text_config.rope_parameters["rope_type"] == "default"
    pipelined = _engine_config(pipeline_parallel_size=2)
    supply_engine_config(pipelined)
    assert missing_engine_config(pipelined) == [
        "--pipeline-parallel-size 1 (the positions hook runs on the first stage only)"]


def test_checkpoints_a_family_leaves_to_stock_vllm_get_no_engine_settings():
    """vLLM serves Pixtral-HF under LLaVA's architecture name: the plugin must leave it as is."""
    from transformers import CLIPVisionConfig, LlavaConfig, PixtralVisionConfig

    from pio_fvlm_vllm.vllm_ext.engine_config import supply_engine_config
    from pio_fvlm_vllm.vllm_ext.families import model_prunes

    pixtral = _engine_config(hf_config=LlavaConfig(vision_config=PixtralVisionConfig().to_dict()),
                             architecture="LlavaForConditionalGeneration")
    supply_engine_config(pixtral)
    assert not model_prunes(pixtral.model_config)
    assert not pixtral.model_config.uses_mrope
    assert not pixtral.model_config.multimodal_config.is_multimodal_pruning_enabled()
    clip = _engine_config(hf_config=LlavaConfig(vision_config=CLIPVisionConfig().to_dict()),
                          architecture="LlavaForConditionalGeneration")
    supply_engine_config(clip)
    assert model_prunes(clip.model_config) and clip.model_config.uses_mrope
    assert clip.model_config.multimodal_config.is_multimodal_pruning_enabled()
