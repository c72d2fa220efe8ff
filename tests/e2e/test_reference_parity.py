"""The plugin computes what the reference computes: the same selection, the same first token."""

import math

import pytest
import torch

from pio_fvlm_vllm.images import synthetic_image
from pio_fvlm_vllm.settings import PioFvlmSettings

from .helpers import QUESTION_B, chat, messages


@pytest.mark.parametrize("keep", [0.3, 0.111])
def test_server_matches_hf_reference_with_served_placement(client, model_name, tiny_checkpoint, keep):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from pio_fvlm_vllm.reference import HFReference

    seed = 50
    msgs = messages(QUESTION_B, seed=seed)
    # Token ids, not texts: a byte-level token's text differs between vLLM and the tokenizer.
    reply = chat(client, model_name, msgs, keep, logprobs=True, max_tokens=1,
                 extra={"cache_salt": f"parity-{keep}", "return_tokens_as_token_ids": True})
    first = reply.choices[0].logprobs.content[0]

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    ref = HFReference(model, processor, PioFvlmSettings())
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION_B}]}]
    prompt = processor.apply_chat_template(hf_messages, add_generation_prompt=True)
    prepared = ref.prepare(prompt, [synthetic_image(640, 480, seed=seed)], add_special_tokens=False)
    assert prepared.input_ids.numel() - sum(e - s for s, e in prepared.image_spans) + \
        sum(k.numel() for k in ref.select(prepared, keep)) == reply.usage.prompt_tokens
    logprobs = torch.log_softmax(ref.last_logits(prepared, ref.select(prepared, keep), "handoff").double(), -1)
    token = int(logprobs.argmax())
    assert first.token == f"token_id:{token}", (first.token, token)
    assert math.isclose(float(logprobs[token]), first.logprob, abs_tol=2e-3)
