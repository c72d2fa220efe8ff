"""Builds LLaVA-NeXT and LLaVA-1.5 checkpoint directories in the layout of the published llava-hf ones.

    python -m pio_fvlm_vllm.checkpoints tiny checkpoints/tiny              # LLaVA-NeXT
    python -m pio_fvlm_vllm.checkpoints small checkpoints/small
    python -m pio_fvlm_vllm.checkpoints 7b-shape checkpoints/7b-shape      # config only
    python -m pio_fvlm_vllm.checkpoints tiny-llava-1.5 checkpoints/tiny-llava-1.5
    python -m pio_fvlm_vllm.checkpoints 7b-shape-llava-1.5 checkpoints/7b-shape-llava-1.5
    python -m pio_fvlm_vllm.checkpoints tiny-qwen2.5-vl checkpoints/tiny-qwen2.5-vl   # see checkpoints_qwen.py
    python -m pio_fvlm_vllm.checkpoints 7b-shape-qwen2.5-vl checkpoints/7b-shape-qwen2.5-vl
    python -m pio_fvlm_vllm.checkpoints tiny-qwen3-vl checkpoints/tiny-qwen3-vl
    python -m pio_fvlm_vllm.checkpoints 8b-shape-qwen3-vl checkpoints/8b-shape-qwen3-vl

A directory holds config.json, generation_config.json, model.safetensors (keys as in
llava-hf/llava-v1.6-vicuna-7b-hf and llava-hf/llava-1.5-7b-hf: `language_model.model.*`,
`language_model.lm_head.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`, and
`image_newline` for LLaVA-NeXT), the processor's
preprocessor_config.json / processor_config.json, and a byte-level BPE tokenizer trained
offline with a chat template. Weights are random (seeded); `7b-shape` writes no weights and is
meant for `vllm serve DIR --load-format dummy`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_TOKEN = "<image>"
# The llava-hf vicuna checkpoints keep the Llama-2 tokenizer (32000 tokens) and add <image>
# at 32000; the embedding table is padded to 32064.
LLAVA_V16_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{{ item['text'] }}{% endfor %}{% endif %}"
    "{{ ' ' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    "USER: What is shown in this image? ASSISTANT: The image shows a red square on the left, "
    "a blue circle at the top right and two green triangles. How many objects are there? "
    "Is there a yellow star? Yes. No. What color is the square? Where is the circle? "
    "left right top bottom center red green blue yellow purple orange white black "
    "zero one two three four five six seven eight nine ten square circle triangle star cross"
)


LLAVA_NEXT = "LlavaNextForConditionalGeneration"
LLAVA = "LlavaForConditionalGeneration"  # LLaVA-1.5
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Preset:
    vision: dict
    text: dict
    vocab_size: int  # text tokens, before <image>
    write_weights: bool = True
    description: str = ""
    image_size: int = 336  # the vision tower's tile; anyres grids are multiples of it
    grid_pinpoints: list = field(default_factory=lambda: LLAVA_V16_GRID_PINPOINTS)
    architecture: str = LLAVA_NEXT


_TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
_TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4)
_7B_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  projection_dim=768)
_7B_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        vision=_TINY_VISION, text=_TINY_TEXT, vocab_size=1000,
        description="LLaVA-NeXT, random, seconds to build, for tests",
    ),
    "small": Preset(
        vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=32, num_attention_heads=8,
                  num_key_value_heads=8),
        vocab_size=4000,
        description="LLaVA-NeXT, random; a 32-layer LLM (the 7B's depth, narrower) so the LLM dominates prefill",
    ),
    "7b-shape": Preset(
        vision=_7B_VISION, text=_7B_TEXT, vocab_size=32000, write_weights=False,
        description="llava-v1.6-vicuna-7b config, no weights (use --load-format dummy)",
    ),
    "tiny-llava-1.5": Preset(
        vision=_TINY_VISION, text=_TINY_TEXT, vocab_size=1000, architecture=LLAVA,
        description="LLaVA-1.5 (576 tokens per image), random, seconds to build, for tests",
    ),
    "7b-shape-llava-1.5": Preset(
        vision=_7B_VISION, text=_7B_TEXT, vocab_size=32000, write_weights=False, architecture=LLAVA,
        description="llava-1.5-7b-hf config, no weights (use --load-format dummy)",
    ),
}


@dataclass(frozen=True)
class QwenPreset:
    shape: object  # checkpoints_qwen.QwenShape
    write_weights: bool
    description: str


def _qwen_presets() -> dict[str, QwenPreset]:
    from . import checkpoints_qwen as q

    return {
        "tiny-qwen2.5-vl": QwenPreset(q.TINY, True, "Qwen2.5-VL, random, seconds to build, for tests"),
        "7b-shape-qwen2.5-vl": QwenPreset(q.SEVEN_B, False, "Qwen2.5-VL-7B-Instruct shapes, no weights (use "
                                          "--load-format dummy; token ids are the small tokenizer's)"),
        "tiny-qwen3-vl": QwenPreset(q.TINY_3, True, "Qwen3-VL, random, seconds to build, for tests"),
        "8b-shape-qwen3-vl": QwenPreset(q.EIGHT_B_3, False, "Qwen3-VL-8B-Instruct shapes, no weights (use "
                                        "--load-format dummy; token ids are the small tokenizer's)"),
    }


QWEN_PRESET_NAMES = ("tiny-qwen2.5-vl", "7b-shape-qwen2.5-vl", "tiny-qwen3-vl", "8b-shape-qwen3-vl")


def _log(msg: str) -> None:
    print(f"[checkpoints] {msg}", file=sys.stderr, flush=True)


def build_tokenizer(vocab_size: int, corpus: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus or [_CORPUS] * 4, trainer=trainer)
    # Pad the vocabulary to the requested size so ids are stable across tokenizers versions.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<extra_{i}>" for i in range(missing)])
    tok.add_special_tokens([IMAGE_TOKEN])
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<unk>", extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(preset: Preset, image_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(image_size=preset.image_size, patch_size=14, hidden_act="quick_gelu",
                              projection_dim=preset.vision.get("projection_dim", 64),
                              **{k: v for k, v in preset.vision.items() if k != "projection_dim"})
    # Round the embedding table up to a multiple of 64 past <image>, as llava-hf does.
    padded_vocab = ((image_token_id + 1 + 63) // 64) * 64
    text = LlamaConfig(vocab_size=padded_vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                       **preset.text)
    common = dict(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token_id,
                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                  projector_hidden_act="gelu", tie_word_embeddings=False)
    layouts = {LLAVA_NEXT: lambda: LlavaNextConfig(image_grid_pinpoints=preset.grid_pinpoints, **common),
               LLAVA: lambda: LlavaConfig(**common)}
    return layouts[preset.architecture]()


def hub_key(name: str) -> str:
    """transformers 5 state-dict key -> the key published llava-hf checkpoints use."""
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name.startswith("lm_head."):
        return "language_model." + name
    if name.startswith("model.vision_tower."):
        rest = name[len("model.vision_tower."):]
        return "vision_tower." + (rest if rest.startswith("vision_model.") else "vision_model." + rest)
    if name.startswith("model."):
        return name[len("model."):]
    return name


def make_processor(preset: Preset, tokenizer):
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    square = dict(size={"shortest_edge": preset.image_size},
                  crop_size={"height": preset.image_size, "width": preset.image_size},
                  image_mean=CLIP_MEAN, image_std=CLIP_STD)
    layouts = {
        LLAVA_NEXT: lambda: (LlavaNextProcessor,
                             LlavaNextImageProcessor(image_grid_pinpoints=preset.grid_pinpoints, **square)),
        # llava-hf/llava-1.5-7b-hf: resize the short side, centre-crop the tower's square.
        LLAVA: lambda: (LlavaProcessor, CLIPImageProcessor(resample=3, do_center_crop=True, **square)),
    }
    processor_class, image_processor = layouts[preset.architecture]()
    return processor_class(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )


def save_checkpoint(out: Path, config, processor, state_dict=None, note: str = "") -> None:
    """Writes a directory in the llava-hf layout: config, generation config, processor,
    tokenizer, and (when given) the weights under the published key names."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json, as published checkpoints have
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(out)
    if state_dict is not None:
        state = {hub_key(k): v.contiguous() for k, v in state_dict.items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if note:
        (out / "README.md").write_text(note)


def preset_config(preset: Preset, tokenizer, dtype: str = "float32"):
    config = build_config(preset, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    config.dtype = dtype
    config.architectures = [preset.architecture]
    return config


def build(preset_name: str, out: Path, *, seed: int = 0, dtype: str = "float32", weights: bool = True) -> Path:
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    if preset_name in QWEN_PRESET_NAMES:
        return _build_qwen(preset_name, out, seed=seed, dtype=dtype, weights=weights)
    if preset_name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted([*PRESETS, *QWEN_PRESET_NAMES])}, got {preset_name!r}")
    preset = PRESETS[preset_name]
    start = time.perf_counter()
    _log(f"building {preset_name!r} ({preset.description}) in {out}")
    tokenizer = build_tokenizer(preset.vocab_size)
    config = preset_config(preset, tokenizer, dtype)
    state = None
    if preset.write_weights and weights:
        torch.manual_seed(seed)
        model_class = {LLAVA_NEXT: LlavaNextForConditionalGeneration, LLAVA: LlavaForConditionalGeneration}
        state = model_class[preset.architecture](config).to(getattr(torch, dtype)).state_dict()
        _log(f"{sum(v.numel() for v in state.values()) / 1e6:.1f}M random parameters")
    save_checkpoint(out, config, make_processor(preset, tokenizer), state,
                    f"# {preset_name}\n\nBuilt by `python -m pio_fvlm_vllm.checkpoints {preset_name} DIR` "
                    f"(seed {seed}): {preset.description}.\n")
    _log(f"written ({time.perf_counter() - start:.1f}s)")
    return out


def _build_qwen(preset_name: str, out: Path, *, seed: int, dtype: str, weights: bool) -> Path:
    from .checkpoints_qwen import build as build_qwen

    preset = _qwen_presets()[preset_name]
    start = time.perf_counter()
    _log(f"building {preset_name!r} ({preset.description}) in {out}")
    count = build_qwen(preset.shape, out, seed=seed, dtype=dtype, weights=preset.write_weights and weights)
    if count:
        _log(f"{count / 1e6:.1f}M random parameters")
    (out / "README.md").write_text(f"# {preset_name}\n\nBuilt by `python -m pio_fvlm_vllm.checkpoints {preset_name} "
                                   f"DIR` (seed {seed}): {preset.description}.\n")
    _log(f"written ({time.perf_counter() - start:.1f}s)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pio_fvlm_vllm.checkpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted([*PRESETS, *QWEN_PRESET_NAMES]))
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--no-weights", action="store_true",
                        help="config, processor and tokenizer only (serve with --load-format dummy)")
    args = parser.parse_args(argv)
    build(args.preset, args.out, seed=args.seed, dtype=args.dtype, weights=not args.no_weights)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
