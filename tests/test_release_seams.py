"""The plugin's seams into vLLM, driven by the installed release's own code below any engine.

`scripts/test_releases.sh` runs these (and the other `vllm_seams` tests) against the Python
sources of every supported release laid over the CPU environment, so each release's renderer,
processor, pruners and weight-loading pass exercise the plugin, not copies of them.
"""

import base64
import importlib
import io
from types import SimpleNamespace

import pytest
import torch

from .test_positions import D, _prompt_with_one_image, _rows

pytestmark = pytest.mark.vllm_seams


def test_register_loads_on_this_release_without_the_override(monkeypatch):
    import vllm
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    import pio_fvlm_vllm
    from pio_fvlm_vllm.vllm_ext.families import FAMILIES

    monkeypatch.delenv(pio_fvlm_vllm.ALLOW_UNSUPPORTED_VLLM_ENV, raising=False)
    assert pio_fvlm_vllm.unsupported_vllm(vllm.__version__) is None
    pio_fvlm_vllm.register()
    for architecture in FAMILIES:
        assert architecture in ModelRegistry.get_supported_archs()
        assert getattr(MODELS_CONFIG_MAP[architecture], "__pio_fvlm__", False)


# -- weights: the proxy's snapshot sees raw weights and hides no other module's hook -----------

class _Recorder:
    def __init__(self):
        self.calls = []


def _toy_model(log: _Recorder):
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    class Repack(QuantizeMethodBase):  # as CPU linear layers do: the weights become opaque
        def create_weights(self, *args, **kwargs):
            raise NotImplementedError

        def apply(self, *args, **kwargs):
            raise NotImplementedError

        def process_weights_after_loading(self, layer):
            log.calls.append("repack")
            layer.weight.data = torch.empty(0)

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.arange(6.0).view(2, 3))
            self.quant_method = Repack()

    class Scales(torch.nn.Module):  # a module's own post-load hook (attention sinks, FP8 scales)
        def process_weights_after_loading(self, *args):
            log.calls.append("module hook")

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Linear()
            self.attn = Scales()

    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = Decoder()

        def snapshot(self):
            log.calls.append(("snapshot", self.language_model.proj.weight.detach().clone()))

    return Root()


def _post_load(model):
    """The release's own post-load pass, as its loaders call it."""
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    config = SimpleNamespace(word_embeddings_untied_by_checkpoint=False, quantization=None, dtype=torch.float32,
                             model="toy")
    process_weights_after_loading(model, config, torch.device("cpu"))


def _finalize_skips_quantized_subtrees() -> bool:
    from vllm.model_executor.model_loader import weight_utils

    return hasattr(weight_utils, "finalize_model_weights")


def test_the_snapshot_reads_raw_weights_and_every_other_post_load_hook_still_runs():
    from pio_fvlm_vllm.vllm_ext.weights import attach_proxy_snapshot

    log = _Recorder()
    model = _toy_model(log)
    attach_proxy_snapshot(model, model.snapshot)
    _post_load(model)
    (first, weights), *rest = log.calls
    assert first == "snapshot" and torch.equal(weights, torch.arange(6.0).view(2, 3))
    assert "repack" in rest
    if _finalize_skips_quantized_subtrees():  # 0.34 on: module hooks run in finalize_model_weights
        assert "module hook" in rest
    assert dict(model.named_parameters()).keys() == {"language_model.proj.weight"}


def test_a_quant_method_on_the_root_would_hide_the_models_module_hooks():
    """The hazard the snapshot module avoids: on a release whose finalize pass skips what lies
    below a quant method, a hook on the root silences every module hook of the model."""
    if not _finalize_skips_quantized_subtrees():
        pytest.skip("this release runs module hooks over all modules (no finalize_model_weights)")
    from pio_fvlm_vllm.vllm_ext.weights import ProxySnapshotHook

    log = _Recorder()
    model = _toy_model(log)
    model.quant_method = ProxySnapshotHook()
    model.take = model.snapshot
    _post_load(model)
    assert "module hook" not in log.calls


# -- the CPU runner: V1 gets its pruning flag; the CPU Model Runner V2 prunes by itself ------------

def test_the_cpu_runner_adapter_matches_the_runner_this_release_has():
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    from pio_fvlm_vllm.vllm_ext import cpu_runner
    from pio_fvlm_vllm.vllm_ext.families import FAMILIES

    from .test_positions import _engine_config

    cpu_runner.enable_pruning_hook()
    if cpu_runner.has_v1_cpu_runner():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        assert getattr(CPUModelRunner.load_model, "__pio_fvlm__", False)
        return
    # 0.34 on: the CPU model state creates the pruner for a pruning model with pruning enabled,
    # which the plugin's engine config switches on.
    from vllm.v1.worker.cpu.mm_pruning import MultiModalPruner, maybe_create_mm_pruner

    from pio_fvlm_vllm.vllm_ext.engine_config import supply_engine_config

    config = _engine_config()
    module, name = FAMILIES["LlavaNextForConditionalGeneration"].model_class.split(":")
    model_class = getattr(importlib.import_module(module), name)
    model = model_class.__new__(model_class)  # the class is what the check reads
    assert supports_multimodal_pruning(model)
    config.model_config.get_inputs_embeds_size = lambda: D
    assert maybe_create_mm_pruner(config.model_config, model, object(), object()) is None  # hook off
    supply_engine_config(config)
    assert isinstance(maybe_create_mm_pruner(config.model_config, model, object(), object()), MultiModalPruner)


def test_the_cpu_model_runner_v2_pruner_drives_the_hook():
    """0.34's CPU runner: its own RopeState takes the hook's initial positions, its pruner
    segments the step's embeddings and writes the kept tokens' original positions back."""
    pruning = pytest.importorskip("vllm.v1.worker.cpu.mm_pruning", reason="no CPU Model Runner V2 before 0.34")
    from vllm.v1.worker.cpu.rope import RopeState

    from pio_fvlm_vllm.vllm_ext.positions_hook import PositionsHook

    ctx, features = _prompt_with_one_image(handoff=3)
    kept = torch.tensor([0, 3, 6, 9])
    states = torch.randn(7, D)
    embeds, rows = _rows(ctx, kept, states)
    hook = PositionsHook(D)
    model = SimpleNamespace(
        get_mrope_input_positions=lambda ids, mm_features: hook.initial(ids, mm_features),
        recompute_mrope_positions=lambda input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens:
            hook.recompute(multimodal_embeddings, mrope_positions))
    rope = RopeState(num_dims=3, max_num_reqs=2, max_num_tokens=32, max_model_len=32, device=torch.device("cpu"))
    rope.init_prefill_positions(1, model, list(range(12)), features)
    assert int(rope.prefill_delta[1]) == 6
    batch = SimpleNamespace(req_ids=["r"], idx_mapping_np=torch.tensor([1]).numpy(),
                            prefill_len_np=torch.tensor([12]).numpy(),
                            num_computed_prefill_tokens_np=torch.tensor([0]).numpy(),
                            num_scheduled_tokens=torch.tensor([12]).numpy())
    req_states = SimpleNamespace(all_token_ids=torch.arange(24).view(2, 12))
    pruner = pruning.MultiModalPruner(model, rope, SimpleNamespace(mm_features={"r": features}), D)
    (cleaned,) = pruner.recompute([rows], batch, req_states)
    # The hand-off states stay on their rows for the model's embed_input_ids.
    assert torch.equal(cleaned, torch.cat([embeds, states], dim=-1))
    table = rope.read_prefill_positions(1, 12)
    assert table[0].tolist() == [0, 1, 2, 3, 6, 9, 12, 13, 14, 15, 16, 17]
    assert int(rope.prefill_delta[1]) == 6


# -- the front end: the release's renderer and processor with the plugin's wrappers -------------

@pytest.fixture
def front_end(tiny_checkpoint, monkeypatch):
    """The release's renderer and multimodal processor for the tiny checkpoint, built as the
    API server builds them (no engine)."""
    import pio_fvlm_vllm
    from vllm.config import ModelConfig, VllmConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.platforms import current_platform
    from vllm.renderers.registry import renderer_from_config

    if getattr(current_platform, "uses_standalone_cpu_model_runner", None) is not None:
        # 0.34 on x86 wants triton-cpu, which no registry ships; its no-Triton configuration
        # (the one with its own CPU pruner) is what this machine can build.
        from vllm.platforms.interface import CpuArchEnum
        from vllm.triton_utils import HAS_TRITON

        if not HAS_TRITON:
            monkeypatch.setattr(type(current_platform), "get_cpu_architecture", classmethod(lambda cls: CpuArchEnum.ARM))
    pio_fvlm_vllm.register()
    model_config = ModelConfig(model=str(tiny_checkpoint), dtype="float32")
    renderer = renderer_from_config(VllmConfig(model_config=model_config))
    return renderer, MULTIMODAL_REGISTRY.create_processor(model_config)


def _image_url(colour) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _process(processor, prompt, keep):
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    items = processor.info.parse_mm_data(prompt["multi_modal_data"])
    inputs = ProcessorInputs(prompt=list(prompt["prompt_token_ids"]), mm_data_items=items,
                             hf_processor_mm_kwargs={"visual_keep": keep})
    return processor.apply(inputs, TimingContext())


def test_a_later_turn_reuses_its_first_turns_item_and_adds_a_delta(front_end):
    from vllm.renderers.params import ChatParams

    from pio_fvlm_vllm.vllm_ext.turns import CHAT_TURNS

    renderer, processor = front_end
    params = ChatParams(chat_template_kwargs={"add_generation_prompt": True})
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_url((200, 10, 10))}},
                                          {"type": "text", "text": "What colour is it?"}]}]
    later = [*first, {"role": "assistant", "content": "Red."}, {"role": "user", "content": "And its shape?"}]
    _, prompt_1 = renderer.render_messages(first, params)
    _, prompt_2 = renderer.render_messages(later, params)
    turns = CHAT_TURNS.get(prompt_2["prompt_token_ids"])
    assert turns is not None and len(turns.spans) == 2
    out_1, out_2 = _process(processor, prompt_1, 0.25), _process(processor, prompt_2, 0.25)
    (base_1,), (base_2, delta) = out_1["mm_placeholders"]["image"], out_2["mm_placeholders"]["image"]
    # The first turn's item comes back with the same hash and length: its KV blocks are reused.
    assert out_2["mm_hashes"]["image"][0] == out_1["mm_hashes"]["image"][0]
    assert (base_2.offset, base_2.length) == (base_1.offset, base_1.length)
    assert out_2["prompt_token_ids"][:base_1.offset + base_1.length] == \
        out_1["prompt_token_ids"][:base_1.offset + base_1.length]
    assert delta.offset > base_2.offset + base_2.length and 0 < delta.length < base_2.length
    assert out_2["mm_hashes"]["image"][1] not in out_1["mm_hashes"]["image"]
    # keep 1.0: the stock processor's output, one item, no delta.
    (whole,) = _process(processor, prompt_2, 1.0)["mm_placeholders"]["image"]
    assert whole.length > base_2.length + delta.length
