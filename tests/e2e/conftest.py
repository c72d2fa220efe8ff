"""One `vllm serve` with the plugin for the whole session, on loopback."""

import pytest

from pio_fvlm_vllm.serving import VllmServer

# fp32 keeps CPU numerics stable enough to compare logprobs across servers; a small
# batched-token budget makes every image prompt (~2.3k tokens) prefill in chunks.
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "4096", "--max-num-batched-tokens", "1024",
               "--max-num-seqs", "8", "--seed", "0"]


# Selection raises for images followed by this word (the server's testing hook), so fault
# handling is exercised on the shared server; no other test sends it.
FAULT_MARKER = "XQZJ"


@pytest.fixture(scope="session")
def fault_marker_ids(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    return tok(" " + FAULT_MARKER, add_special_tokens=False).input_ids


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory, fault_marker_ids):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    env = {"PIO_FVLM_TEST_FAIL_ON_TOKENS": ",".join(map(str, fault_marker_ids))}
    with VllmServer(tiny_checkpoint, args=SERVER_ARGS, log_path=log, env=env) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def model_name(tiny_checkpoint):
    return str(tiny_checkpoint)
