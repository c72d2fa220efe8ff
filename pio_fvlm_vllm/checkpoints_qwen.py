"""Qwen-VL checkpoint directories in the layout of the published Qwen/Qwen2.5-VL-*-Instruct and
Qwen/Qwen3-VL-*-Instruct.

Built by `python -m pio_fvlm_vllm.checkpoints tiny-qwen2.5-vl DIR` / `tiny-qwen3-vl DIR` (random
weights) or `7b-shape-qwen2.5-vl DIR` / `8b-shape-qwen3-vl DIR` (no weights; serve with
`--load-format dummy`). The directory holds the published files: config.json, generation_config.json,
preprocessor_config.json, chat_template.json (each image as
`<|vision_start|><|image_pad|><|vision_end|>`), a byte-level BPE tokenizer with Qwen's special
tokens in their published order, and model.safetensors with the published key names.

- Qwen2.5-VL: the flat config layout (`rope_scaling.mrope_section`, `vision_config`, the vision
  token ids at the top level), `Qwen2VLImageProcessor`, a template with a default system turn,
  keys `model.*` and `visual.*` (no `lm_head` where tied).
- Qwen3-VL: a nested `text_config` (`model_type: qwen3_vl_text`, interleaved `mrope_section`)
  and a `vision_config` with `deepstack_visual_indexes`, `Qwen2VLImageProcessorFast` plus a
  `video_preprocessor_config.json`, the Instruct template (no default system turn), keys as
  transformers names them (`model.language_model.*`, `model.visual.*`, `lm_head` unless tied).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Qwen2's pre-tokenizer split, as published in its tokenizer.json.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
OTHER_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"]
QWEN3_OTHER_TOKENS = [*OTHER_TOKENS, "<tool_response>", "</tool_response>", "<think>", "</think>"]

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The Qwen3-VL Instruct template without its tools branch: no default system turn.
QWEN3_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Picture ' + image_count.value|string + ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'video' or 'video' in content %}{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Video ' + video_count.value|string + ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

_CORPUS = ("You are a helpful assistant. What is shown in this image? The image shows a red square, a blue "
           "circle and two green triangles. How many objects are there? Describe the picture. Yes. No. "
           "left right top bottom center red green blue yellow zero one two three four five six seven")


@dataclass(frozen=True)
class QwenShape:
    text: dict  # hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads
    vision: dict  # depth, hidden_size, intermediate_size, num_heads, and fullatt_block_indexes (2.5) or
    # deepstack_visual_indexes (3)
    mrope_section: list[int]  # sums to head_dim / 2
    vocab_size: int  # the embedding table (published: 152064 for 2.5, 151936 for 3)
    text_vocab: int = 1000  # BPE entries before the special tokens (tiny tokenizers)
    generation: str = "2.5"  # "2.5" or "3"
    tie_word_embeddings: bool = True


TINY = QwenShape(
    text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2),
    vision=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1, 3]),
    mrope_section=[4, 6, 6], vocab_size=1024,
)
# Qwen/Qwen2.5-VL-7B-Instruct
SEVEN_B = QwenShape(
    text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=[7, 15, 23, 31]),
    mrope_section=[16, 24, 24], vocab_size=152064, tie_word_embeddings=False,
)
TINY_3 = QwenShape(
    text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32),
    vision=dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, deepstack_visual_indexes=[0, 1, 2]),
    mrope_section=[6, 5, 5], vocab_size=1088, generation="3",
)
# Qwen/Qwen3-VL-8B-Instruct
EIGHT_B_3 = QwenShape(
    text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128),
    vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=[8, 16, 24]),
    mrope_section=[24, 20, 20], vocab_size=151936, generation="3", tie_word_embeddings=False,
)


def build_tokenizer(text_vocab: int, other_tokens: list[str] = OTHER_TOKENS, corpus: list[str] | None = None):
    """A byte-level BPE of `text_vocab` entries learnt from `corpus` (default: a few English
    sentences), then Qwen's special tokens in their published order."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=text_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus or [_CORPUS] * 8, trainer=trainer)
    missing = text_vocab - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<extra_{i}>" for i in range(missing)])
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(other_tokens)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, model_max_length=131072)


def _check_sections(shape: QwenShape) -> None:
    head_dim = shape.text.get("head_dim") or shape.text["hidden_size"] // shape.text["num_attention_heads"]
    if 2 * sum(shape.mrope_section) != head_dim:
        raise ValueError(f"mrope_section {shape.mrope_section} must sum to head_dim / 2")


def config_dict(shape: QwenShape, ids: dict[str, int], dtype: str) -> dict:
    _check_sections(shape)
    if shape.generation == "3":
        return config_dict_3(shape, ids, dtype)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 128000,
        "max_window_layers": 28,
        "model_type": "qwen2_5_vl",
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": shape.tie_word_embeddings,  # the 3B ties, the 7B does not
        "torch_dtype": dtype,
        "transformers_version": "4.49.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "hidden_act": "silu", "in_chans": 3, "out_hidden_size": shape.text["hidden_size"], "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "tokens_per_second": 2,
            **shape.vision,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(shape.mrope_section)},
        "vocab_size": shape.vocab_size,
        **shape.text,
    }


def config_dict_3(shape: QwenShape, ids: dict[str, int], dtype: str) -> dict:
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": ids["<|image_pad|>"],
        "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"],
            "dtype": dtype, "eos_token_id": ids["<|im_end|>"], "hidden_act": "silu", "initializer_range": 0.02,
            "max_position_embeddings": 262144, "model_type": "qwen3_vl_text", "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": list(shape.mrope_section),
                             "rope_type": "default"},
            "rope_theta": 5000000, "use_cache": True, "vocab_size": shape.vocab_size,
            **shape.text,
        },
        "tie_word_embeddings": shape.tie_word_embeddings,
        "transformers_version": "4.57.0.dev0",
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {
            "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "initializer_range": 0.02, "model_type": "qwen3_vl",
            "num_position_embeddings": 2304, "out_hidden_size": shape.text["hidden_size"], "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2, **shape.vision,
        },
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
    }


PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


PREPROCESSOR_3 = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}
VIDEO_PREPROCESSOR_3 = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
}


def hub_key(name: str) -> str | None:
    """transformers 5 state-dict key -> the published key; None for the tied LM head."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def build(shape: QwenShape, out: Path, *, seed: int, dtype: str, weights: bool, corpus: list[str] | None = None,
          preprocessor: dict | None = None, state: dict | None = None) -> int:
    """Writes the directory; returns the number of parameters written (0 without weights).

    `corpus`: the text the tokenizer's BPE learns from; `preprocessor`: entries that override the
    published preprocessor config (min_pixels, say); `state`: the weights to write, a state dict
    of the transformers model (default: random from `seed`)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    out.mkdir(parents=True, exist_ok=True)
    qwen3 = shape.generation == "3"
    tokenizer = build_tokenizer(shape.text_vocab, QWEN3_OTHER_TOKENS if qwen3 else OTHER_TOKENS, corpus)
    tokenizer.save_pretrained(out)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="Qwen2Tokenizer", errors="replace", split_special_tokens=False)
    tokenizer_config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3_CHAT_TEMPLATE if qwen3
                                                        else CHAT_TEMPLATE}, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(
        {**(PREPROCESSOR_3 if qwen3 else PREPROCESSOR), **(preprocessor or {})}, indent=2))
    if qwen3:
        (out / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR_3, indent=2))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = config_dict(shape, ids, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
         "pad_token_id": ids["<|endoftext|>"], "do_sample": False}, indent=2))
    if not weights:
        return 0
    if state is None:
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(out)).to(getattr(torch, dtype))
        state = model.state_dict()
    published = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue
        # Qwen3-VL is published under the names transformers 5 uses.
        published[name if qwen3 else hub_key(name)] = tensor.to(getattr(torch, dtype)).contiguous()
    save_file(published, str(out / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in published.values())
