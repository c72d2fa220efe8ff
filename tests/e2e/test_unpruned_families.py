"""A multimodal model of a family the plugin does not prune (Qwen2.5-VL) is served exactly as
stock vLLM serves it with the plugin installed, and a keep ratio sent to it is a clear 400."""

import json

import pytest

from pio_fvlm_vllm.serving import VllmServer

from .helpers import QUESTION_A, chat, messages, post_chat

ARGS = ["--dtype", "float32", "--max-model-len", "4096", "--enforce-eager", "--generation-config", "vllm",
        "--limit-mm-per-prompt", '{"video": 0}']


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from pio_fvlm_vllm.checkpoints import build

    return build("tiny-qwen2.5-vl", tmp_path_factory.mktemp("ckpt") / "tiny-qwen2.5-vl")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with VllmServer(checkpoint, args=ARGS, log_path=tmp_path_factory.mktemp("logs") / "qwen.log") as srv:
        yield srv


def test_the_checkpoint_is_served_as_its_processor_counts_it(server, checkpoint):
    from openai import OpenAI
    from transformers import AutoProcessor

    from pio_fvlm_vllm.images import synthetic_image

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    reply = chat(client, str(checkpoint), messages(QUESTION_A, seed=3, size=(640, 480)), max_tokens=2)
    processor = AutoProcessor.from_pretrained(checkpoint)
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION_A}]}]
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[synthetic_image(640, 480, seed=3)], return_tensors="pt")
    assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1] > 300


@pytest.mark.parametrize("extra", [{"visual_keep": 0.5}, {"pio_fvlm_kept_indices": True}])
def test_plugin_fields_sent_to_it_are_400s_saying_so(server, checkpoint, extra):
    body = {"model": str(checkpoint), "messages": messages(seed=4), "max_tokens": 1, **extra}
    status, payload, _ = post_chat(server, body)
    assert status == 400, payload
    text = json.dumps(payload)
    assert "does not prune" in text and "Qwen2_5_VLForConditionalGeneration" in text
    assert server.healthy()
